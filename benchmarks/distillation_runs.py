"""What the Rotten Tomatoes benchmarks that compare cuts share: one fine-tuned MiniLM original, its data loaders,
scoring, the same self-distillation budget for every cut model, the self-distilled control, and the ONNX Runtime
speed of a saved model against the original. Every record is written as it finishes, so a run resumes."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.assets import load_rotten_tomatoes, minilm_path
from benchmarks.compress_rotten_tomatoes import TASK, ensure_original, loaders
from benchmarks.quality import mean_std
from benchmarks.results_io import finished_run
from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.benchmark import benchmark_models
from optimum_rmtkd.data import calibration_subset
from optimum_rmtkd.distillation import train
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json


def add_budget_arguments(parser: argparse.ArgumentParser, distillation_steps: int) -> None:
    """The options every such benchmark takes: the original, the seeds and the distillation budget."""
    parser.add_argument("--original", type=Path, default=None,
                        help="fine-tuned original (default: <output-dir>/original, fine-tuned 1 epoch if absent)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distillation-steps", type=int, default=distillation_steps,
                        help="optimizer steps of 32 sentences after each cut, and for the control")
    parser.add_argument("--learning-rate", type=float, default=TASK.default_learning_rate,
                        help="of the self-distillation (the original is fine-tuned at the task's default)")
    parser.add_argument("--calibration-examples", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--no-speed", action="store_true", help="skip the ONNX Runtime timing")
    parser.add_argument("--speed-repeats", type=int, default=20)


def percent(values: List[float]) -> str:
    """`mean ± std` of accuracies over seeds (the mean alone for one seed)."""
    mean, std = mean_std(values)
    return f"{mean:.2%}" if std is None else f"{mean:.2%} ± {std:.2%}"


def points(values: List[float]) -> str:
    """`mean ± std` of accuracy differences, in points."""
    mean, std = mean_std(values)
    return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}") + " pt"


def speedup_text(speed: Optional[Dict[str, Any]]) -> str:
    """`1.23× (1.10–1.30)`: a `DistillationRuns.speed` record with its 95% interval; `-` when not timed."""
    if not speed:
        return "-"
    low, high = speed["speedup_ci95"]
    return f"{speed['speedup']:.2f}× ({low:.2f}–{high:.2f})"


class DistillationRuns:
    """One fine-tuned original and its data; `distil` gives any cut model the same budget from the original."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = args.output_dir
        self.runs_dir = self.out / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.base_config = RMTKDConfig(max_length=args.max_length, batch_size=32, seed=0,
                                       max_distillation_steps=args.distillation_steps)
        self.splits = load_rotten_tomatoes(None, None, seed=0)  # the split the original is fine-tuned on
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        model_config = AutoConfig.from_pretrained(minilm_path(), num_labels=2)
        self.data = loaders(self.tokenizer, self.splits, self.base_config, model_config)
        self.accelerator = Accelerator()
        self.original_dir = args.original or self.out / "original"
        ensure_original(self.original_dir, self.data["train"], self.tokenizer, self.base_config, self.accelerator, 1.0)

    def finished(self, name: str) -> Optional[Dict[str, Any]]:
        """The record `runs/<name>.json` of a finished run, `None` when there is none."""
        return finished_run(self.runs_dir, name)

    def load_original(self):
        return AutoModelForSequenceClassification.from_pretrained(self.original_dir)

    def original_record(self) -> Dict[str, Any]:
        """The original's parameter count and accuracies, the first line of every table."""
        model = self.load_original()
        return {"parameters": model.num_parameters(), **self.scores(model)}

    def scores(self, model) -> Dict[str, float]:
        model.eval()
        return {split: TASK.evaluate(model, self.data[split], self.accelerator)["accuracy"]
                for split in ("validation", "test")}

    def calibration_loader(self, seed: int) -> DataLoader:
        """`calibration_examples` training sentences drawn by `seed`, batched as the compressor calibrates."""
        subset = calibration_subset(self.splits["train"], 1.0, self.args.calibration_examples, seed)
        model_config = AutoConfig.from_pretrained(self.original_dir)
        prepared = TASK.prepare({"calibration": subset}, self.tokenizer, model_config, Columns(), self.args.max_length)
        return DataLoader(prepared.splits["calibration"].with_format("torch"), batch_size=32,
                          collate_fn=TASK.collator(self.tokenizer))

    def distil(self, model, config: RMTKDConfig, description: str):
        """`args.distillation_steps` steps of the library's loop with the original as the teacher (as many passes
        over the training sentences as that takes: `max_distillation_steps` stops it at the step)."""
        teacher = self.load_original().eval()
        config = RMTKDConfig(**{**config.to_dict(), "learning_rate": self.args.learning_rate})
        torch.manual_seed(config.seed)
        epochs = math.ceil(config.max_distillation_steps / len(self.data["train"]))
        return train(model, self.data["train"], self.accelerator, config, TASK, teacher=teacher, epochs=epochs,
                     description=description)

    def control(self, seed: int) -> Dict[str, Any]:
        """The original distilled from itself for the same steps: what the training alone is worth."""
        record = self.finished(f"control-seed{seed}")
        if record is not None:
            return record
        config = RMTKDConfig(**{**self.base_config.to_dict(), "seed": seed})
        student = self.distil(self.load_original(), config, f"Control seed {seed}")
        record = {"seed": seed, "parameters": student.num_parameters(), "distilled": self.scores(student),
                  "distillation_steps": self.args.distillation_steps}
        atomic_write_json(self.runs_dir / f"control-seed{seed}.json", record)
        return record

    def speed(self, name: str, folder: Path) -> Optional[Dict[str, Any]]:
        """ONNX Runtime CPU speed-up of the model saved in `folder` over the original at 32 × 128, with its 95%
        interval (the seed does not change the speed: one model per name is timed)."""
        record = self.finished(f"speed-{name}")
        if record is not None:
            return record
        report = benchmark_models(
            self.original_dir, folder, backends=("onnxruntime-cpu",), batch_sizes=(32,), sequence_lengths=(128,),
            repeats=self.args.speed_repeats, threads=2, onnx_cache_dir=self.out / "onnx" / name,
        )
        row = report.speedup_for("onnxruntime-cpu", 32, 128)
        record = {"speedup": row.speedup, "speedup_ci95": list(row.speedup_ci95), "flop_ratio": row.flop_ratio,
                  "file_size_bytes": report.models["compressed"]["file_size_bytes"]}
        atomic_write_json(self.runs_dir / f"speed-{name}.json", record)
        return record
