"""RMT-KD on a CNN: a ResNet-20-sized transformers ResNet trained from scratch on Fashion-MNIST, then compressed.

    python -m benchmarks.resnet_fashion_mnist --threads 1 --control --target-reduction 0.45

Needs the Debian package `dataset-fashion-mnist` (`apt-get update && apt-get install -y dataset-fashion-mnist`), or
`--source` naming an image folder or a Hub dataset id (see `fashion_mnist.py`). No pretrained CNN exists on these
machines, so the network is trained from scratch, as the paper did. Steps:
1. train `ResNetForImageClassification` (basic blocks, `--hidden-sizes 16 32 64`, `--depths 3 3 3`, stem 16
   channels, 10 classes; `--channels 1` grey or 3 replicated) for `--epochs` (8) on `--train-examples` images (all
   55,000 that the validation split leaves), and save it with its image processor (the "original");
2. compress it with `RMTKDCompressor` (`task="image-classification"`, `sites=("channels",)`); in the stock format
   each ResNet stage is one compressor stage (calibrate, cut, distil for `--distillation-epochs`), deepest first,
   until `--target-reduction` is reached or the validation accuracy falls more than `--max-metric-drop`;
3. with `--control`, self-distil the original for the same number of epochs (DESIGN §8: the fair baseline);
4. export the compressed model to ONNX (validated against PyTorch) and time both models with ONNX Runtime on the
   CPU, interleaved (`optimum_rmtkd.benchmark.benchmark_models`);
5. write `resnet_fashion_mnist.json` and `.md` to `--output-dir`.

`--threads 1` matters on a shared machine: with two intra-op threads and another process on the second core, each
convolution waits for the busy core (measured here: 1.5 s instead of 0.03 s per batch of 128). On a GPU machine,
`--preset gpu` trains a ResNet-56-sized network (depths 9 9 9) on all 55,000 training images for
30 epochs; every flag still overrides the preset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

from benchmarks.fashion_mnist import CLASSES, PADDED_SIDE, load_fashion_mnist
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.benchmark import benchmark_models
from optimum_rmtkd.distillation import train
from optimum_rmtkd.exporters.onnx import export_onnx
from optimum_rmtkd.tasks import get_task
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json, atomic_write_text

PRESETS = {
    "cpu": {"depths": [3, 3, 3], "train_examples": None, "epochs": 8.0},
    "gpu": {"depths": [9, 9, 9], "train_examples": None, "epochs": 30.0},
}
RESULT_NAME = "resnet_fashion_mnist"
TASK = get_task("image-classification")


def build_processor(train_images: np.ndarray, channels: int) -> ConvNextImageProcessorPil:
    """Normalise with the training set's pixel mean and std (after padding), one value per (replicated) channel."""
    pixels = train_images.astype(np.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    # shortest_edge 32 with crop_pct 1.0: 32×32 inputs pass unchanged, other sizes are resized then centre-cropped.
    return ConvNextImageProcessorPil(
        size={"shortest_edge": PADDED_SIDE}, crop_pct=1.0, image_mean=[mean] * channels, image_std=[std] * channels
    )


def build_model(args) -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=args.channels, embedding_size=args.hidden_sizes[0], hidden_sizes=args.hidden_sizes,
        depths=args.depths, layer_type="basic", downsample_in_first_stage=False, num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)), label2id={name: i for i, name in enumerate(CLASSES)},
    )
    torch.manual_seed(args.seed)
    return ResNetForImageClassification(config)


def loader(dataset, processor, model_config, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader through the library's image-classification task (labels checked against the model's)."""
    processed = TASK.prepare({"dataset": dataset}, processor, model_config, Columns(), max_length=0).splits["dataset"]
    return DataLoader(processed.with_format("torch"), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=TASK.collator(processor), generator=torch.Generator().manual_seed(seed))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--source", default=None, help="image folder or Hub dataset id (default: the Debian files)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/resnet_fashion_mnist"),
                        help="models, checkpoints and ONNX files (not committed)")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs from scratch")
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--validation-examples", type=int, default=5000)
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="training from scratch (AdamW)")
    parser.add_argument("--distillation-learning-rate", type=float, default=1e-3)
    parser.add_argument("--distillation-epochs", type=float, default=1.0)
    parser.add_argument("--estimator", default="paper")
    parser.add_argument("--quantile", type=float, default=0.5)
    parser.add_argument("--sigma2-scale", type=float, default=1.0)
    parser.add_argument("--output-format", choices=("stock", "per-layer"), default="stock")
    parser.add_argument("--max-metric-drop", type=float, default=0.01)
    parser.add_argument("--target-reduction", type=float, default=None,
                        help="stop once this share of the parameters is gone (e.g. 0.45)")
    parser.add_argument("--control", action="store_true", help="also self-distil the original (fair baseline)")
    parser.add_argument("--latency-repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime intra-op threads (1 avoids stalls on a busy machine)")
    parser.add_argument("--retrain", action="store_true", help="train again even if --work-dir has a model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if len(args.depths) != len(args.hidden_sizes):
        parser.error(f"--depths {args.depths} and --hidden-sizes {args.hidden_sizes} must have the same length.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work, out = args.work_dir, args.output_dir
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    splits = load_fashion_mnist(args.source, train_examples=args.train_examples,
                                validation_examples=args.validation_examples, test_examples=args.test_examples,
                                seed=args.seed)
    timings["load_s"] = time.perf_counter() - start
    train_config = RMTKDConfig(learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed)
    accelerator = Accelerator()

    # The trained original is reused by later runs (to try other compression settings); its record says how it
    # was trained, so the table never reports this run's flags for a model trained with others.
    original_dir, record_path = work / "original", work / "original_training.json"
    if args.retrain or not ((original_dir / "config.json").is_file() and record_path.is_file()):
        start = time.perf_counter()
        processor = build_processor(np.asarray(splits["train"].with_format("numpy")["image"]), args.channels)
        model = build_model(args)
        train_loader = loader(splits["train"], processor, model.config, args.batch_size, True, args.seed)
        model = train(model, train_loader, accelerator, train_config, TASK, epochs=args.epochs,
                      description="Training from scratch")
        model.save_pretrained(original_dir)
        processor.save_pretrained(original_dir)
        timings["train_s"] = time.perf_counter() - start
        training = {
            "epochs": args.epochs, "train_examples": len(splits["train"]), "learning_rate": args.learning_rate,
            "batch_size": args.batch_size, "channels": args.channels, "hidden_sizes": args.hidden_sizes,
            "depths": args.depths, "seed": args.seed, "train_s": timings["train_s"], "reused": False,
        }
        atomic_write_json(record_path, training)
    else:
        training = dict(json.loads(record_path.read_text()), reused=True)

    compressor = RMTKDCompressor.from_pretrained(original_dir, task="image-classification")
    test_loader = loader(splits["test"], compressor.preprocessor, compressor.model.config, args.batch_size * 2, False,
                         args.seed)
    original_test = TASK.evaluate(compressor.model, test_loader, accelerator)["accuracy"]

    config = RMTKDConfig(
        sites=("channels",), estimator=args.estimator, quantile=args.quantile, sigma2_scale=args.sigma2_scale,
        output_format=args.output_format, learning_rate=args.distillation_learning_rate,
        batch_size=args.batch_size, distillation_epochs=args.distillation_epochs,
        max_metric_drop=args.max_metric_drop, target_reduction=args.target_reduction, seed=args.seed,
        on_metric_drop="stop",  # the recorded runs stop at a stage that costs too much (deepest stage first)
    )
    start = time.perf_counter()
    result = compressor.compress(
        splits["train"], eval_dataset=splits["validation"], config=config, save_directory=work / "compressed",
        test_dataset=splits["test"], image_column="image", label_column="label", overwrite=True,
    )
    timings["compress_s"] = time.perf_counter() - start
    report = result.report
    distilled_epochs = args.distillation_epochs * sum(
        1 for stage in report["stages"] if stage["metric_after_distillation"] is not None
    )

    control_test = None
    if args.control and distilled_epochs > 0:
        start = time.perf_counter()
        teacher = ResNetForImageClassification.from_pretrained(original_dir).eval()
        student = ResNetForImageClassification.from_pretrained(original_dir)
        distill_config = RMTKDConfig(learning_rate=args.distillation_learning_rate, batch_size=args.batch_size,
                                     seed=args.seed)
        train_loader = loader(splits["train"], compressor.preprocessor, student.config, args.batch_size, True,
                              args.seed)
        student = train(student, train_loader, accelerator, distill_config, TASK, teacher=teacher,
                        epochs=distilled_epochs, description="Control: self-distilling the original")
        control_test = TASK.evaluate(student, test_loader, accelerator)["accuracy"]
        timings["control_s"] = time.perf_counter() - start

    start = time.perf_counter()
    export = export_onnx(work / "compressed", work / "compressed-onnx", overwrite=True)
    speed = benchmark_models(
        original_dir, work / "compressed", backends=("onnxruntime-cpu",), batch_sizes=(1, 32),
        image_sizes=(PADDED_SIDE,), repeats=args.latency_repeats, threads=args.threads, output_dir=work / "speed",
    )
    timings["export_and_latency_s"] = time.perf_counter() - start
    latency = [
        {"batch_size": row.batch_size, "image_size": row.image_size, "speedup": row.speedup,
         "speedup_ci95": list(row.speedup_ci95), "latency_ratio": 1.0 / row.speedup, "flop_ratio": row.flop_ratio}
        for row in speed.speedups
    ]
    medians = {(r.model, r.batch_size): r.median_ms for r in speed.results}

    params = report["parameters"]
    summary = {
        "command": " ".join(["python", "-m", "benchmarks.resnet_fashion_mnist"] + list(sys.argv[1:] if argv is None else argv)),
        "budget": {
            "training_from_scratch": training, "train_examples": len(splits["train"]),
            "validation_examples": len(splits["validation"]), "test_examples": len(splits["test"]),
            "batch_size": args.batch_size, "distillation_epochs_per_stage": args.distillation_epochs,
            "seed": args.seed, "torch_threads": torch.get_num_threads(),
        },
        "config": config.to_dict(),
        "parameters": params,
        "test_accuracy": {"original": original_test, "compressed": report["metrics"]["compressed"],
                          "control_self_distilled": control_test},
        "validation_accuracy": {"original": report["metrics"]["original_validation"],
                                "compressed": report["metrics"]["compressed_validation"]},
        "compressed_config": {"embedding_size": result.model.config.embedding_size,
                              "hidden_sizes": list(result.model.config.hidden_sizes)},
        "sites": [{k: s[k] for k in ("name", "original_width", "kept_width", "rank", "ranks_by_estimator", "n_samples")}
                  for s in report["sites"]],
        "stages": report["stages"], "stop_reason": report["stop_reason"],
        "onnx": {"max_abs_diff": export.max_abs_diff, "atol": export.atol, "opset": export.opset},
        "onnxruntime_cpu_latency": latency,
        "onnxruntime_cpu_median_ms": {f"{model} batch {batch}": ms for (model, batch), ms in medians.items()},
        "timings_s": timings,
    }
    atomic_write_json(out / f"{RESULT_NAME}.json", summary)

    drop = original_test - report["metrics"]["compressed"]
    lines = [
        "# RMT-KD on a ResNet trained from scratch on Fashion-MNIST",
        "",
        f"Budget: ResNet hidden sizes {training['hidden_sizes']}, depths {training['depths']} (basic blocks), "
        f"{training['channels']} input channel(s), trained {training['epochs']:g} epochs on "
        f"{training['train_examples']:,} images (batch {training['batch_size']}, AdamW lr "
        f"{training['learning_rate']:g}, {training['train_s']:.0f} s"
        + (", reused from an earlier run" if training["reused"] else "") + f"); compressed with "
        f"{len(splits['train']):,} training, {len(splits['validation']):,} validation and "
        f"{len(splits['test']):,} test images; estimator `{args.estimator}`, `{args.output_format}` format, "
        f"{args.distillation_epochs:g} distillation epoch per stage (lr {args.distillation_learning_rate:g}), "
        f"max validation drop {args.max_metric_drop}, target reduction {args.target_reduction}, seed {args.seed}; "
        f"{torch.get_num_threads()} torch threads.",
        "",
        f"Command: `{summary['command']}`",
        "",
        "| model | parameters | reduction | test accuracy |",
        "|---|---|---|---|",
        f"| original (trained from scratch) | {params['original']:,} | - | {original_test:.2%} |",
    ]
    if control_test is not None:
        lines.append(f"| control: original self-distilled {distilled_epochs:g} epoch(s) | {params['original']:,} | - "
                     f"| {control_test:.2%} |")
    lines += [
        f"| RMT-KD compressed | {params['compressed']:,} | {params['reduction']:.1%} | "
        f"{report['metrics']['compressed']:.2%} ({-drop * 100:+.2f} pt) |",
        "",
        "| site | width | kept | rank (estimator) | ranks by estimator |",
        "|---|---|---|---|---|",
    ]
    for site in summary["sites"]:
        ranks = ", ".join(f"{k}: {v}" for k, v in site["ranks_by_estimator"].items())
        lines.append(f"| {site['name']} | {site['original_width']} | {site['kept_width']} | {site['rank']} | {ranks} |")
    lines += [
        "",
        "| ONNX Runtime CPU | original median ms | compressed median ms | latency ratio (compressed / original) "
        "| speed-up (95% CI) | FLOP ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in latency:
        low, high = row["speedup_ci95"]
        lines.append(
            f"| batch {row['batch_size']}, {row['image_size']}×{row['image_size']} "
            f"| {medians[('original', row['batch_size'])]:.3f} | {medians[('compressed', row['batch_size'])]:.3f} "
            f"| {row['latency_ratio']:.2f} | {row['speedup']:.2f}× ({low:.2f}–{high:.2f}) | {row['flop_ratio']:.2f}× |"
        )
    lines += [
        "",
        f"Compressed config: embedding_size {summary['compressed_config']['embedding_size']}, hidden_sizes "
        f"{summary['compressed_config']['hidden_sizes']}. ONNX export max |Δ| vs PyTorch: "
        + ", ".join(f"{k}: {v:.1e}" for k, v in export.max_abs_diff.items())
        + f". Stop reason: {report['stop_reason']}. Timings (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
    ]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / f"{RESULT_NAME}.md", table)
    print(table)
    print(json.dumps({"reduction": params["reduction"], "test_drop_pt": drop * 100}))


if __name__ == "__main__":
    main()
