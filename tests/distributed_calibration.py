"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: calibrate a tiny BERT on a shard per process
and save the all-reduced second moments (and the world size) from the main process."""
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics, process_shard
from optimum_rmtkd.tasks.sequence_classification import tokenize_texts

sys.path.insert(0, sys.argv[3])
from conftest import make_text_dataset  # noqa: E402


def main(model_dir: str, output: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # 37 examples: an odd count, so even_batches-style padding would have duplicated one.
    data = tokenize_texts(make_text_dataset(37, seed=3), tokenizer, text_column="text")
    shard = process_shard(data, accelerator)
    loader = DataLoader(shard.with_format("torch"), batch_size=5, collate_fn=DataCollatorWithPadding(tokenizer))
    adapter = get_adapter(model)
    stats = collect_statistics(model, loader, adapter.required_captures(adapter.sites(model)), accelerator=accelerator)
    if accelerator.is_main_process:
        torch.save({"num_processes": accelerator.num_processes, "shard_sizes": len(shard),
                    "stats": {k: acc.state() for k, acc in stats.items()}}, output)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # without it a gloo run often aborts at exit (DESIGN §7)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
