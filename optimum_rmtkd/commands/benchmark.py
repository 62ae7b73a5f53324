"""`rmtkd benchmark`: latency, throughput, memory, FLOPs and energy of a compressed model against its original."""
from __future__ import annotations

import argparse
from pathlib import Path

from optimum.commands.base import CommandInfo

from ..utils.io import check_output_folder

from .base import COMMON_API_FLAGS, RMTKDBaseCommand, add_common_arguments, describe

BACKENDS = ("pytorch", "pytorch-cuda", "onnxruntime-cpu", "onnxruntime-cuda")

EXAMPLES = """examples:
  rmtkd benchmark --original ./minilm-sst2 --compressed minilm-rmtkd --backends pytorch onnxruntime-cpu
  rmtkd benchmark --original ./minilm-sst2 --compressed minilm-rmtkd --batch-sizes 1 32 -o bench
  rmtkd benchmark --original ./smollm2 --compressed smollm2-rmtkd --batch-sizes 1 8 --sequence-lengths 128
"""


class BenchmarkCommand(RMTKDBaseCommand):
    COMMAND = CommandInfo(name="benchmark", help="Time a compressed model against its original, in one process.")
    API_FLAGS = {
        **COMMON_API_FLAGS, "original_dir": "--original", "compressed_dir": "--compressed", "output_dir": "--output",
        "onnx_cache_dir": "--onnx-cache-dir", "backends": "--backends", "batch_sizes": "--batch-sizes",
        "sequence_lengths": "--sequence-lengths", "image_sizes": "--image-sizes", "warmup": "--warmup",
        "repeats": "--repeats", "threads": "--threads", "energy_seconds": "--energy-seconds",
        "ort_disabled_optimizers": "--ort-disabled-optimizers", "new_tokens": "--new-tokens", "seed": "--seed",
    }

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(
            parser,
            "Load both models in one process and time them on the same inputs, interleaved after warm-up, for "
            "every backend, batch size and sequence length (or image size). Prints a Markdown table (median, "
            "p90, p99 latency, speed-up with its 95% interval, FLOP ratio, throughput, peak memory, energy when "
            "a meter is readable) and, with --output, writes benchmark.json, benchmark.md and benchmark.png. A "
            "backend this machine lacks is skipped with the reason. A causal LM is timed twice per cell: prefill "
            "(the prompt of --sequence-lengths tokens) and decode (--new-tokens greedy steps after it, in tokens per "
            "second).",
            EXAMPLES,
        )
        parser.add_argument("--original", required=True, help="Folder of the uncompressed model.")
        parser.add_argument("--compressed", required=True, help="Folder of the compressed model.")
        parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                            help=f"Backends to measure (default: {' '.join(BACKENDS)}).")
        parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                            help="Batch sizes of the grid (default: 1 8 32).")
        parser.add_argument("--sequence-lengths", nargs="+", type=int, default=None,
                            help="Token counts of the grid, for text models (default: 32 128).")
        parser.add_argument("--image-sizes", nargs="+", type=int, default=None,
                            help="Square image sides of the grid, for image models (default: 32 224).")
        parser.add_argument("--warmup", type=int, default=None,
                            help="Untimed calls per model and cell before timing (default: 5).")
        parser.add_argument("--repeats", type=int, default=None,
                            help="Timed calls per model and cell (default: 50).")
        parser.add_argument("--threads", type=int, default=None,
                            help="Intra-op threads of PyTorch and ONNX Runtime (default: each library's own).")
        parser.add_argument("--energy-seconds", type=float, default=None,
                            help="Length of each energy window, spent only where a meter is readable (default: 2.0).")
        parser.add_argument("--ort-disabled-optimizers", nargs="*", default=None, metavar="NAME",
                            help="ONNX Runtime graph rewrites to leave off in both models' sessions; give the flag "
                                 "with no name for ONNX Runtime's stock behaviour (default: SkipLayerNormFusion on "
                                 "CPU, whose kernel is slower than the ops it fuses; none on CUDA).")
        parser.add_argument("--new-tokens", type=int, default=None,
                            help="Greedy decode steps per decode call, for causal LMs (default: 64).")
        parser.add_argument("--seed", type=int, default=None,
                            help="Seed of the random inputs and of the bootstrap (default: 0).")
        parser.add_argument("-o", "--output", default=None,
                            help="Folder for benchmark.json, .md and .png; neither a model's folder, a parent of "
                                 "one nor a folder inside one (default: print the table only).")
        parser.add_argument("--onnx-cache-dir", default=None,
                            help="Where models without model.onnx are exported (default: <output>/onnx, else a "
                                 "temporary folder).")
        add_common_arguments(parser)

    def execute(self) -> None:
        args = self.args
        for flag, folder in (("--original", args.original), ("--compressed", args.compressed)):
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(
                    f"`{flag}` {folder!r} is not a model folder (no config.json); pass a folder written by "
                    "`save_pretrained` or `rmtkd compress`."
                )
        # The report and the ONNX caches (exports, a file of absolute paths) are added to these folders: they must
        # neither hold a model nor lie inside one. Files are added, not replaced, so a non-empty folder is fine.
        for flag, folder in (("--output", args.output), ("--onnx-cache-dir", args.onnx_cache_dir)):
            if folder is not None:
                check_output_folder(folder, [args.original, args.compressed], overwrite=None, name=flag)

        # The registered rmtkd_<base> types, so that a per-layer folder (config and weights) loads too.
        from .. import modeling  # noqa: F401
        from ..benchmark import benchmark_models

        # Only the flags given are passed, so the defaults are benchmark_models' own.
        names = ("backends", "batch_sizes", "sequence_lengths", "image_sizes", "warmup", "repeats", "threads",
                 "energy_seconds", "ort_disabled_optimizers", "new_tokens", "seed", "onnx_cache_dir")
        options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        report = benchmark_models(args.original, args.compressed, output_dir=args.output, **options)
        print(report.to_markdown())
        if args.output is not None:
            print(f"Wrote {Path(args.output) / 'benchmark.json'}, benchmark.md and, with matplotlib, benchmark.png")
