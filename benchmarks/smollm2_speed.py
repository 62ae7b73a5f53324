"""Serving speed of the compressed SmolLM2-135M against the original: prefill and decode, PyTorch and ONNX Runtime.

    python -m benchmarks.compress_smollm2 --target-reduction 0.25 ...   # writes /tmp/smollm2/{original,compressed}
    python -m benchmarks.smollm2_speed --output-dir benchmarks/results/smollm2_speed

Both models are exported afresh (`reuse_onnx=False`, so the export + validation wall time is this run's: the graph
with a key/value cache, logits and cache checked with and without a past, a greedy generation of 32 tokens equal to
PyTorch's), then `benchmark_models` times prefill (batch 1 and 8 × 128 prompt tokens) and decode (64 greedy tokens
after the prompt, tokens per second), original and compressed interleaved. The targets of the decoder export issue
are checked at the end: ONNX Runtime CPU decode speed-up at batch 1 ≥ 0.8 × the FLOP ratio of one decode step, and
export + validation under 2 minutes. The ONNX files (hundreds of MB) go to `--onnx-cache-dir`, not the results.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from optimum_rmtkd.benchmark import benchmark_models
from optimum_rmtkd.utils.io import atomic_write_json

SPEEDUP_OVER_FLOP_TARGET = 0.8
EXPORT_SECONDS_TARGET = 120.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, default=Path("/tmp/smollm2/original"))
    parser.add_argument("--compressed", type=Path, default=Path("/tmp/smollm2/compressed"))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/smollm2_speed"))
    parser.add_argument("--onnx-cache-dir", type=Path, default=Path("/tmp/smollm2/onnx"))
    parser.add_argument("--backends", nargs="+", default=["pytorch", "onnxruntime-cpu"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    report = benchmark_models(
        args.original, args.compressed, backends=args.backends, batch_sizes=args.batch_sizes,
        sequence_lengths=(args.prompt_tokens,), new_tokens=args.new_tokens, warmup=args.warmup,
        repeats=args.repeats, output_dir=args.output_dir, onnx_cache_dir=args.onnx_cache_dir, reuse_onnx=False,
    )
    targets = {}
    decode = report.speedup_for("onnxruntime-cpu", 1, args.prompt_tokens, phase="decode")
    if decode is not None:
        targets["decode_b1_speedup_over_flop_ratio"] = {
            "value": decode.speedup_over_flop_ratio, "target": SPEEDUP_OVER_FLOP_TARGET,
            "met": decode.speedup_over_flop_ratio >= SPEEDUP_OVER_FLOP_TARGET,
            "speedup": decode.speedup, "speedup_ci95": list(decode.speedup_ci95), "flop_ratio": decode.flop_ratio,
        }
    for name in ("original", "compressed"):
        export = report.models[name].get("onnx_export")
        if export is not None:
            targets[f"{name}_export_seconds"] = {"value": export["seconds"], "target": EXPORT_SECONDS_TARGET,
                                                 "met": export["seconds"] < EXPORT_SECONDS_TARGET}
    atomic_write_json(args.output_dir / "targets.json", targets)
    print(report.to_markdown())
    for name, row in targets.items():
        print(f"{name}: {row['value']:.3g} (target {row['target']}) {'met' if row['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
