"""Speed benchmark of a compressed model against its original: latency, throughput, memory, FLOPs, energy.

    python -m benchmarks.speed --output-dir benchmarks/results/speed

Runs `optimum_rmtkd.benchmark.benchmark_models` over the full grid (batch 1/8/32 × sequence length 32/128, or
image size 32/224 for image models) on PyTorch and ONNX Runtime (CPU, and CUDA where available), by default on the
Rotten Tomatoes models that `python -m benchmarks.compress_rotten_tomatoes` writes (`--original`, `--compressed` choose
others), prints the Markdown table and writes benchmark.json, benchmark.md and benchmark.png under --output-dir.

It then checks the two targets of the issue and writes them to targets.json:
- speed-up ÷ FLOP ratio at the target cell (default: ONNX Runtime CPU, batch 32, sequence length 128 or image size
  224) of at least 0.8. 1.0 means the FLOPs saved became time saved; below it, the narrower matrices run less
  efficiently per FLOP (or fixed costs dominate);
- export + validation of the compressed model in under 60 s. Both models are exported and validated afresh
  (timed) unless `--reuse-onnx` is given, in which case a cached export keeps the time measured when it was made.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from optimum_rmtkd.benchmark import BACKENDS, DEFAULT_BACKENDS, BenchmarkReport, benchmark_models
from optimum_rmtkd.utils.io import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROTTEN_TOMATOES_DIR = RESULTS_DIR / "rotten_tomatoes"
# The issue's targets: the speed-up reaches 80% of the FLOP ratio; export + validation takes under a minute.
MIN_SPEEDUP_OVER_FLOP_RATIO = 0.8
MAX_EXPORT_SECONDS = 60.0


def speedup_target(report: BenchmarkReport, backend: str, batch_size: int, size: int) -> dict[str, Any]:
    """The speed-up, FLOP ratio and their ratio at one cell against `MIN_SPEEDUP_OVER_FLOP_RATIO`."""
    size_name = "image size" if report.size_key == "image_size" else "sequence length"
    cell = f"{backend}, batch {batch_size}, {size_name} {size}"
    row = report.speedup_for(backend, batch_size, size)
    if row is None:
        return {"cell": cell, "measured": False, "reason": "that cell is not in the grid"}
    ratio = row.speedup_over_flop_ratio
    return {
        "cell": cell,
        "measured": True,
        **row.to_dict(),
        "target": MIN_SPEEDUP_OVER_FLOP_RATIO,
        "met": ratio >= MIN_SPEEDUP_OVER_FLOP_RATIO,
    }


def export_target(report: BenchmarkReport) -> dict[str, Any]:
    """The compressed model's export + validation time against `MAX_EXPORT_SECONDS`."""
    models = report.models["compressed"]
    if "onnx_export" not in models:
        return {"measured": False, "reason": "no ONNX Runtime backend ran, so nothing was exported"}
    record = models["onnx_export"]
    if record is None:
        return {"measured": False, "reason": "the folder's own ONNX file was used (run without --reuse-onnx)"}
    return {
        "measured": True,
        **record,
        "target_seconds": MAX_EXPORT_SECONDS,
        "met": record["seconds"] < MAX_EXPORT_SECONDS,
    }


def _describe(targets: dict[str, Any]) -> list[str]:
    speed, export = targets["speedup"], targets["export"]
    if speed["measured"]:
        low, high = speed["speedup_ci95"]
        speed_line = (
            f"Speed-up at {speed['cell']}: {speed['speedup']:.2f}× (95% CI {low:.2f}–{high:.2f}), FLOP ratio "
            f"{speed['flop_ratio']:.2f}×, speed-up ÷ FLOP ratio {speed['speedup_over_flop_ratio']:.2f} "
            f"(target ≥ {speed['target']}: {'met' if speed['met'] else 'not met'})."
        )
    else:
        speed_line = f"Speed-up at {speed['cell']}: not measured, {speed['reason']}."
    if export["measured"]:
        when = " (cached export of an earlier run)" if export["reused"] else ""
        export_line = (
            f"Export + validation of the compressed model: {export['seconds']:.1f} s{when}, max |Δ| "
            f"{max(export['max_abs_diff'].values()):.1e} (target < {export['target_seconds']:.0f} s: "
            f"{'met' if export['met'] else 'not met'})."
        )
    else:
        export_line = f"Export + validation of the compressed model: not measured, {export['reason']}."
    return [speed_line, export_line]


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, default=ROTTEN_TOMATOES_DIR / "original",
                        help="the uncompressed model's folder (default: the Rotten Tomatoes original)")
    parser.add_argument("--compressed", type=Path, default=ROTTEN_TOMATOES_DIR / "compressed",
                        help="the compressed model's folder (default: the compressed Rotten Tomatoes model)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR / "speed")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(DEFAULT_BACKENDS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--sequence-lengths", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: library defaults)")
    parser.add_argument("--energy-seconds", type=float, default=2.0)
    parser.add_argument(
        "--onnx-cache-dir", type=Path, default=None, help="where to keep ONNX exports (default: OUTPUT_DIR/onnx)"
    )
    parser.add_argument("--reuse-onnx", action="store_true",
                        help="reuse a folder's own or a cached ONNX export instead of exporting and timing afresh")
    parser.add_argument("--ort-disabled-optimizers", nargs="*", default=None, metavar="NAME",
                        help="ONNX Runtime rewrites to leave off (default: the library's, SkipLayerNormFusion on "
                             "CPU); the flag alone keeps ONNX Runtime's stock behaviour")
    parser.add_argument("--target-backend", choices=BACKENDS, default="onnxruntime-cpu")
    parser.add_argument("--target-batch-size", type=int, default=32)
    parser.add_argument(
        "--target-size", type=int, default=None, help="sequence length or image size (default: 128, or 224 for images)"
    )
    args = parser.parse_args(argv)

    report = benchmark_models(
        args.original,
        args.compressed,
        backends=args.backends,
        batch_sizes=args.batch_sizes,
        sequence_lengths=args.sequence_lengths,
        image_sizes=args.image_sizes,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        output_dir=args.output_dir,
        energy_seconds=args.energy_seconds,
        onnx_cache_dir=args.onnx_cache_dir,
        reuse_onnx=args.reuse_onnx,
        ort_disabled_optimizers=args.ort_disabled_optimizers,
    )
    print(report.to_markdown())

    target_size = args.target_size or (224 if report.size_key == "image_size" else 128)
    targets = {
        "speedup": speedup_target(report, args.target_backend, args.target_batch_size, target_size),
        "export": export_target(report),
    }
    atomic_write_json(args.output_dir / "targets.json", targets)
    print("\n".join(_describe(targets)))
    print(f"Wrote benchmark.json, benchmark.md, benchmark.png and targets.json under {args.output_dir}.")
    return targets


if __name__ == "__main__":
    main()
