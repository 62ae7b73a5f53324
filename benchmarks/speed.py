"""Speed benchmark of a compressed model against its original: latency, throughput, memory, FLOPs, energy.

    python benchmarks/speed.py --original ORIGINAL_DIR --compressed COMPRESSED_DIR \
        --output-dir benchmarks/results/speed

Runs `optimum_rmtkd.benchmark.benchmark_models` over the full grid (batch 1/8/32 × sequence length 32/128, or
image size 32/224 for image models) on PyTorch and ONNX Runtime (CPU, and CUDA where available), prints the
Markdown table and writes benchmark.json, benchmark.md and benchmark.png under --output-dir.

It also prints the target ratio: the measured speed-up at the target cell (default: ONNX Runtime CPU, batch 32,
sequence length 128 or image size 224) divided by the FLOP ratio. 1.0 means the FLOPs saved became time saved;
below 1.0, the narrower matrices run less efficiently per FLOP (or fixed costs dominate).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from optimum_rmtkd.benchmark import BACKENDS, DEFAULT_BACKENDS, benchmark_models
from optimum_rmtkd.exporters.onnx import is_image_config, read_config_dict


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="the uncompressed model's folder")
    parser.add_argument("--compressed", type=Path, required=True, help="the compressed model's folder")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/speed"))
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
    parser.add_argument("--target-backend", choices=BACKENDS, default="onnxruntime-cpu")
    parser.add_argument("--target-batch-size", type=int, default=32)
    parser.add_argument(
        "--target-size", type=int, default=None, help="sequence length or image size (default: 128, or 224 for images)"
    )
    args = parser.parse_args(argv)

    image = is_image_config(read_config_dict(args.original))
    target_size = args.target_size or (224 if image else 128)
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
    )
    print(report.to_markdown())

    size_name = "image size" if image else "sequence length"
    cell = f"{args.target_backend}, batch {args.target_batch_size}, {size_name} {target_size}"
    target = report.speedup_for(args.target_backend, args.target_batch_size, target_size)
    if target is None:
        print(f"Target ratio (speed-up ÷ FLOP ratio at {cell}): not measured, that cell is not in the grid.")
        summary = {"cell": cell, "measured": False}
    else:
        print(
            f"Target ratio (speed-up ÷ FLOP ratio at {cell}): {target.speedup:.2f} ÷ {target.flop_ratio:.2f} = "
            f"{target.speedup_over_flop_ratio:.2f} (speed-up 95% CI {target.speedup_ci95[0]:.2f}–"
            f"{target.speedup_ci95[1]:.2f})."
        )
        summary = {"cell": cell, "measured": True, **target.to_dict()}
    print(f"Wrote benchmark.json, benchmark.md and benchmark.png under {args.output_dir}.")
    return summary


if __name__ == "__main__":
    main()
