"""Run by tests/test_distributed.py under `torchrun --nproc_per_node N`: calibrate a tiny saved model (an encoder
classifier or a decoder LM; the task comes from its config) on a shard of a CSV file per process, and save the
all-reduced second moments (and the world size) from the main process; a fourth argument `layerwise` calibrates
one layer at a time (each layer's sums all-reduced as soon as it is done)."""
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.calibration import collect_statistics, layerwise_layout, process_shard
from optimum_rmtkd.data import load_split
from optimum_rmtkd.tasks.base import Columns


def main(model_dir: str, data_file: str, output: str, mode: str = "whole") -> None:
    accelerator = Accelerator(cpu=True)
    compressor = RMTKDCompressor.from_pretrained(model_dir)
    model, task, preprocessor = compressor.model, compressor.task, compressor.preprocessor
    data = task.inputs(load_split(data_file), preprocessor, Columns(), max_length=16, name="calibration")
    shard = process_shard(data, accelerator)
    loader = DataLoader(shard.with_format("torch"), batch_size=5, collate_fn=task.collator(preprocessor))
    adapter = compressor.adapter
    layout = layerwise_layout(adapter, model, RMTKDConfig(layerwise_calibration=True)) if mode == "layerwise" else None
    stats = collect_statistics(model, loader, adapter.required_captures(adapter.sites(model)), accelerator=accelerator,
                               forward_kwargs=task.forward_kwargs(), layerwise=layout)
    if accelerator.is_main_process:
        torch.save({"num_processes": accelerator.num_processes, "rows": len(data),
                    "stats": {k: acc.state() for k, acc in stats.items()}}, output)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # without it a gloo run often aborts at exit (DESIGN §7)


if __name__ == "__main__":
    main(*sys.argv[1:5])
