"""Run by tests/test_distributed.py under `torchrun --nproc_per_node N`: compress a tiny saved decoder end to end
(calibration all-reduced, distillation through Accelerate's data-parallel wrapper) and write, from every rank, the
world size, the kept widths and a checksum of the compressed weights."""
import json
import sys

import torch
from _models import counting_texts

from optimum_rmtkd import RMTKDCompressor, RMTKDConfig


def main(model_dir: str, output: str) -> None:
    config = RMTKDConfig(batch_size=4, max_length=16, max_distillation_steps=3, width_multiple=4, min_width=4,
                         estimator="mp-median", max_metric_drop=None, sites=("ffn", "heads"))
    compressor = RMTKDCompressor.from_pretrained(model_dir)
    result = compressor.compress(counting_texts(64, 0), counting_texts(16, 1), config, save_directory=output)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    checksum = float(sum(p.detach().double().sum() for p in result.model.parameters()))
    record = {"world": world, "widths": {s["name"]: s["kept_width"] for s in result.report["sites"]},
              "checksum": checksum, "stages": len(result.report["stages"])}
    with open(f"{output}.rank{rank}.json", "w", encoding="utf-8") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
