"""Full-size RMT-KD run: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, then compressed; writes a results table.

    python -m benchmarks.compress_rotten_tomatoes --output-dir benchmarks/results/rotten_tomatoes

Steps: fine-tune the pretrained encoder with a new 2-class head (`--finetune-epochs`), save it (the "original"),
compress it with `RMTKDCompressor`, optionally train the control (the original distilled from itself for the same
number of epochs, DESIGN §8: the fair baseline for a distilled student), score everything on the held-out test split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.assets import load_rotten_tomatoes, minilm_path
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.configuration import HEAD_REDUCTIONS
from optimum_rmtkd.distillation import train
from optimum_rmtkd.tasks import get_task
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json, atomic_write_text


TASK = get_task("text-classification")


def loaders(tokenizer, splits, config, model_config):
    """DataLoaders of every split through the library's task (labels checked and mapped as `compress` does)."""
    prepared = TASK.prepare(splits, tokenizer, model_config, Columns(), config.max_length)
    collator = TASK.collator(tokenizer)
    return {name: DataLoader(ds.with_format("torch"), batch_size=config.batch_size, shuffle=(name == "train"),
                             collate_fn=collator, generator=torch.Generator().manual_seed(config.seed))
            for name, ds in prepared.splits.items()}


def ensure_original(original_dir: Path, train_loader, tokenizer, config: RMTKDConfig, accelerator: Accelerator,
                    epochs: float) -> Optional[float]:
    """Fine-tune MiniLM with a new 2-class head into `original_dir` unless it already holds weights (they are not
    committed: a fresh clone fine-tunes); returns the seconds it took, `None` when reused."""
    if (original_dir / "model.safetensors").is_file():
        return None
    start = time.perf_counter()
    # The new head is drawn under the run's seed (PyTorch seeds its generator at random in each process).
    model, _ = TASK.load_model(minilm_path(), config.seed, num_labels=2)
    model = train(model, train_loader, accelerator, config, TASK, epochs=epochs, description="Fine-tuning")
    model.save_pretrained(original_dir)
    tokenizer.save_pretrained(original_dir)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/rotten_tomatoes"))
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training split (default: all)")
    parser.add_argument("--max-eval", type=int, default=None, help="subsample validation/test (default: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--distillation-epochs", type=float, default=3.0)
    parser.add_argument("--estimator", default="mp-median")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument("--sites", nargs="+", default=["ffn", "hidden"])
    parser.add_argument("--max-metric-drop", type=float, default=0.015)
    parser.add_argument("--on-metric-drop", choices=("stop", "skip"), default="skip",
                        help="undo a stage that breaks --max-metric-drop and stop, or skip it and go on")
    parser.add_argument("--head-reduction", choices=HEAD_REDUCTIONS, default=RMTKDConfig.head_reduction,
                        help="how attention follows the narrower hidden width: narrower heads or fewer whole heads")
    parser.add_argument("--control", action="store_true", help="also train the self-distilled control")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a finished compression in <output-dir>/compressed instead of compressing again")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    config = RMTKDConfig(
        estimator=args.estimator, quantile=args.quantile, sites=tuple(args.sites), max_length=args.max_length,
        distillation_epochs=args.distillation_epochs, max_metric_drop=args.max_metric_drop,
        on_metric_drop=args.on_metric_drop, head_reduction=args.head_reduction, seed=args.seed,
        learning_rate=5e-5, batch_size=32,
    )
    splits = load_rotten_tomatoes(args.max_train, args.max_eval, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = loaders(tokenizer, splits, config, AutoConfig.from_pretrained(minilm_path(), num_labels=2))
    accelerator = Accelerator()
    timings = {}

    original_dir = out / "original"
    finetune_s = ensure_original(original_dir, data["train"], tokenizer, config, accelerator, args.finetune_epochs)
    if finetune_s is not None:
        timings["finetune_s"] = finetune_s
    original = AutoModelForSequenceClassification.from_pretrained(original_dir)
    original_test = TASK.evaluate(original, data["test"], accelerator)["accuracy"]

    report_path = out / "compressed" / "rmtkd_report.json"
    if args.reuse and report_path.is_file():
        report = json.loads(report_path.read_text())
    else:
        start = time.perf_counter()
        compressor = RMTKDCompressor.from_pretrained(original_dir)
        result = compressor.compress(
            splits["train"], splits["validation"], config, save_directory=out / "compressed",
            test_dataset=splits["test"], overwrite=True,
        )
        timings["compress_s"] = time.perf_counter() - start
        report = result.report
    distill_epochs = sum(1 for s in report["stages"] if s["metric_after_distillation"] is not None) * args.distillation_epochs

    control_test = None
    if args.control and distill_epochs > 0:
        start = time.perf_counter()
        teacher = AutoModelForSequenceClassification.from_pretrained(original_dir).eval()
        student = AutoModelForSequenceClassification.from_pretrained(original_dir)
        student = train(student, data["train"], accelerator, config, TASK, teacher=teacher, epochs=distill_epochs,
                        description="Control: self-distilling the original")
        control_test = TASK.evaluate(student, data["test"], accelerator)["accuracy"]
        timings["control_s"] = time.perf_counter() - start

    params = report["parameters"]
    summary = {
        "budget": {"train_examples": len(splits["train"]), "test_examples": len(splits["test"]),
                   "max_length": args.max_length, "finetune_epochs": args.finetune_epochs,
                   "distillation_epochs_per_stage": args.distillation_epochs, "seed": args.seed},
        "config": config.to_dict(),
        "parameters": params,
        "test_accuracy": {"original": original_test, "compressed": report["metrics"]["compressed"],
                          "control_self_distilled": control_test},
        "sites": [{k: s[k] for k in ("name", "original_width", "kept_width", "rank", "ranks_by_estimator")}
                  for s in report["sites"]],
        "stages": report["stages"], "stop_reason": report["stop_reason"],
        "calibration_peak_rss_mb": report["calibration_peak_rss_mb"], "timings_s": timings,
    }
    atomic_write_json(out / "summary.json", summary)
    lines = [
        f"# RMT-KD on Rotten Tomatoes (all-MiniLM-L6-v2), estimator `{args.estimator}`",
        "",
        f"Budget: {len(splits['train'])} training sentences, max length {args.max_length}, fine-tune "
        f"{args.finetune_epochs} epoch, {args.distillation_epochs} distillation epoch per stage, attention heads "
        f"`{args.head_reduction}`, seed {args.seed}.",
        "",
        "| model | parameters | reduction | test accuracy |",
        "|---|---|---|---|",
        f"| original (fine-tuned) | {params['original']:,} | - | {original_test:.2%} |",
    ]
    if control_test is not None:
        lines.append(f"| control: original self-distilled {distill_epochs:g} epoch(s) | {params['original']:,} | - | "
                     f"{control_test:.2%} |")
    lines += [
        f"| RMT-KD compressed | {params['compressed']:,} | {params['reduction']:.1%} | "
        f"{report['metrics']['compressed']:.2%} |",
        "",
        "| site | width | kept | estimator rank | ranks by estimator |",
        "|---|---|---|---|---|",
    ]
    for s in summary["sites"]:
        ranks = ", ".join(f"{k}: {v}" for k, v in s["ranks_by_estimator"].items())
        lines.append(f"| {s['name']} | {s['original_width']} | {s['kept_width']} | {s['rank']} | {ranks} |")
    lines += ["", f"Stop reason: {report['stop_reason']}. Calibration peak RSS: "
              f"{report['calibration_peak_rss_mb']:.0f} MiB. Timings: "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", table)
    print(table)


if __name__ == "__main__":
    main()
