"""`rmtkd export`: ONNX export of a saved (compressed or original) model, checked against PyTorch."""
from __future__ import annotations

import argparse
from pathlib import Path

from optimum.commands.base import CommandInfo

from ..utils.io import check_output_folder
from .base import COMMON_API_FLAGS, RMTKDBaseCommand, add_common_arguments, describe

EXAMPLES = """examples:
  rmtkd export minilm-rmtkd                      # writes minilm-rmtkd/onnx, which `rmtkd push` uploads
  rmtkd export minilm-rmtkd minilm-rmtkd-onnx --optimization-level extended
  rmtkd export smollm2-rmtkd                     # a causal LM: one graph with a key/value cache
"""


class ExportCommand(RMTKDBaseCommand):
    COMMAND = CommandInfo(name="export", help="Export a saved model to ONNX and validate it with ONNX Runtime.")
    API_FLAGS = {
        **COMMON_API_FLAGS, "output_dir": "output", "opset": "--opset", "atol": "--atol",
        "optimization_level": "--optimization-level", "fp16=True": "--fp16", "device": "--device",
        "validate=False": "--no-validate",
    }

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(
            parser,
            "Export with torch.onnx (dynamic batch and sequence axes) into the folder layout optimum's ONNX Runtime "
            "classes read (model.onnx, config.json, tokenizer files), then compare ONNX Runtime's logits with "
            "PyTorch's at two input shapes; a difference above --atol fails and leaves nothing behind. Needs "
            "`pip install optimum-rmtkd[onnx]`.",
            EXAMPLES,
        )
        parser.add_argument("model_dir", help="A folder written by `rmtkd compress` or `save_pretrained`.")
        parser.add_argument("output", nargs="?", default=None,
                            help="Folder to write; neither model_dir, a parent of it nor another folder inside it "
                                 "(default: <model_dir>/onnx, which `rmtkd push` uploads).")
        parser.add_argument("--opset", type=int, default=None,
                            help="ONNX opset, at least 18 (default: 23, which exports attention as the fused `Attention` op).")
        parser.add_argument("--atol", type=float, default=None,
                            help="Tolerance on max |ONNX Runtime - PyTorch| of the outputs (default: 1e-4; 2e-2 for "
                                 "causal LMs, whose large logits differ by ~1e-2 in float32; 1e-2 with --fp16).")
        parser.add_argument("--optimization-level", default=None, choices=("basic", "extended", "all"),
                            help="ONNX Runtime graph optimisations, saved as model_optimized.onnx (default: none).")
        parser.add_argument("--fp16", action="store_true",
                            help="Convert to float16, inputs and logits kept float32; needs --device cuda "
                                 "(default: off).")
        parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                            help="Where the validation runs (default: cpu).")
        parser.add_argument("--no-validate", action="store_true",
                            help="Skip the comparison with PyTorch (default: validate).")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty output folder (default: off).")
        add_common_arguments(parser)

    def execute(self) -> None:
        args = self.args
        model_dir = Path(args.model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"`model_dir` {args.model_dir!r} is not a model folder (no config.json); pass a folder written by "
                "`rmtkd compress` or `save_pretrained`."
            )
        output = Path(args.output) if args.output is not None else model_dir / "onnx"
        # <model_dir>/onnx is export's own folder inside the model (what `rmtkd push` uploads); any other folder must
        # neither hold the model nor lie inside it.
        check_output_folder(output, [model_dir], overwrite=args.overwrite, name="output", cli=True,
                            allowed=[model_dir / "onnx"])

        # The registered rmtkd_<base> types, so that a per-layer folder (config and weights) loads too.
        from .. import modeling  # noqa: F401
        from ..exporters.onnx import export_onnx

        options = {"opset": args.opset} if args.opset is not None else {}
        result = export_onnx(
            model_dir, output, validate=not args.no_validate, atol=args.atol,
            optimization_level=args.optimization_level, fp16=args.fp16, device=args.device,
            overwrite=args.overwrite, **options,
        )
        print(f"Wrote {result.onnx_path} (opset {result.opset}) in {result.seconds:.1f} s")
        if result.passed:
            shapes = ", ".join(f"{shape}: {diff:.2e}" for shape, diff in result.max_abs_diff.items())
            print(f"Validated with ONNX Runtime: max |Δ| of the outputs {shapes} (atol {result.atol:g})")
            if result.generation_checked:
                print("Greedy generation with ONNX Runtime gives PyTorch's tokens (32 new tokens, 2 prompts).")
        else:
            print("Not validated (--no-validate).")
