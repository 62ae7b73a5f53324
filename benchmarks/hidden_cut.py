"""The hidden (residual) cut of a post-LN encoder, variant by variant: all-MiniLM-L6-v2 on Rotten Tomatoes.

    python -m benchmarks.hidden_cut --output-dir benchmarks/results/hidden_cut

Every variant cuts the hidden width 384 → 192 and → 128 (attention heads pruned whole, the library's default) from
the same fine-tuned original, with the same calibration statistics per seed:

- `coordinates-qr`: keep k residual coordinates by pivoted QR on the kept eigenvectors (stock format);
- `coordinates-variance`: keep the k coordinates of largest second moment (stock format);
- `rotation`: rotate every segment of the stream onto its leading k directions and fold the LayerNorms exactly
  (registered per-layer format, two k×k matrices per LayerNorm);
- `coordinates-variance-shrink`, `rotation-shrink` (not run by default): the same cuts with
  `head_reduction="shrink"`, every head kept and narrowed to `k / heads` (192 → 12 heads of 16).

All readers of the stream (Q/K/V, FFN input, pooler) are refitted by least squares on their calibration second
moment in every variant. Each is scored one-shot and after the same self-distillation budget from the original, for
each seed, beside the self-distilled control (the original distilled from itself for the same steps). ONNX Runtime
CPU speed at 32 × 128 is measured once per variant at the first width (speed does not depend on the seed). Results are written
per run (`runs/`) so an interrupted benchmark resumes where it stopped; the tables go to results.md/.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.distillation_runs import DistillationRuns, add_budget_arguments, percent, points, speedup_text
from benchmarks.results_io import write_results
from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.modeling.per_layer import as_output_format
from optimum_rmtkd.saving import save_compressed_model
from optimum_rmtkd.utils.io import atomic_write_json

#: Variant name → the `RMTKDConfig` fields that select it.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "coordinates-qr": {"hidden_cut": "coordinates", "channel_selection": "qr"},
    "coordinates-variance": {"hidden_cut": "coordinates", "channel_selection": "variance"},
    "rotation": {"hidden_cut": "rotation", "output_format": "per-layer"},
    "coordinates-variance-shrink": {"hidden_cut": "coordinates", "channel_selection": "variance",
                                    "head_reduction": "shrink"},
    "rotation-shrink": {"hidden_cut": "rotation", "output_format": "per-layer", "head_reduction": "shrink"},
}
#: The variants run by default: heads pruned whole (the library's default); `-shrink` keeps all 12 heads, narrower.
DEFAULT_VARIANTS = ("coordinates-qr", "coordinates-variance", "rotation")
DEFAULT_OUTPUT = Path("benchmarks/results/hidden_cut")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--widths", type=int, nargs="+", default=[192, 128])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS))
    parser.add_argument("--one-shot-only", action="store_true",
                        help="cut and score every variant, no distillation and no control (minutes, not hours)")
    add_budget_arguments(parser, distillation_steps=60)
    return parser.parse_args(argv)


class HiddenCutBenchmark(DistillationRuns):
    """The runs of every (variant, width, seed), each saved as it finishes."""

    def statistics(self, seed: int):
        """Calibration statistics of the hidden site on `calibration_examples` training sentences drawn by `seed`."""
        model = self.load_original().eval()
        adapter = get_adapter(model)
        hidden = next(site for site in adapter.sites(model) if site.kind == "hidden")
        return hidden, collect_statistics(model, self.calibration_loader(seed), adapter.required_captures([hidden]))

    def config(self, variant: str, seed: int) -> RMTKDConfig:
        return RMTKDConfig(**{**self.base_config.to_dict(), **VARIANTS[variant], "seed": seed})

    def cut(self, variant: str, width: int, seed: int, hidden, stats):
        model = self.load_original().eval()
        config = self.config(variant, seed)
        model = get_adapter(model).reduce(model, [hidden], {hidden.name: width}, stats, config)
        return as_output_format(model, config.output_format), config

    def run(self, variant: str, width: int, seed: int, hidden, stats) -> Dict[str, Any]:
        """Cut, score one-shot, then (unless `--one-shot-only`) distil and score again; a finished step is read
        back from its file instead of redone."""
        path = self.runs_dir / f"{variant}-{width}-seed{seed}.json"
        record = self.finished(f"{variant}-{width}-seed{seed}")
        if record is not None and (record["distilled"] is not None or self.args.one_shot_only):
            return record
        start = time.perf_counter()
        model, config = self.cut(variant, width, seed, hidden, stats)
        if record is None:
            record = {"variant": variant, "width": width, "seed": seed, "parameters": model.num_parameters(),
                      "one_shot": self.scores(model), "cut_s": time.perf_counter() - start, "distilled": None}
            atomic_write_json(path, record)
        if self.args.one_shot_only:
            return record
        model = self.distil(model, config, f"Distilling {variant} {width} seed {seed}")
        record = {**record, "distilled": self.scores(model), "distillation_steps": self.args.distillation_steps}
        atomic_write_json(path, record)
        return record

    def speed_of(self, variant: str, width: int, hidden, stats) -> Optional[Dict[str, Any]]:
        """ONNX Runtime CPU speed-up of the one-shot model at 32 × 128 over the original (`DistillationRuns.speed`)."""
        folder = self.out / "models" / f"{variant}-{width}"
        if not (folder / "model.safetensors").is_file():
            model, config = self.cut(variant, width, 0, hidden, stats)
            save_compressed_model(model, self.tokenizer, folder, config.output_format)
        return self.speed(f"{variant}-{width}", folder)


def summarise(args, original: Dict[str, Any], runs: List[Dict[str, Any]], controls: List[Dict[str, Any]],
              speeds: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    control_test = [c["distilled"]["test"] for c in controls]
    rows = []
    for variant in args.variants:
        for width in args.widths:
            mine = sorted((r for r in runs if r["variant"] == variant and r["width"] == width), key=lambda r: r["seed"])
            if not mine:
                continue
            by_seed = {c["seed"]: c["distilled"]["test"] for c in controls}
            gaps = [r["distilled"]["test"] - by_seed[r["seed"]] for r in mine if r["distilled"] and r["seed"] in by_seed]
            rows.append({
                "variant": variant, "width": width, "parameters": mine[0]["parameters"],
                "seeds": [r["seed"] for r in mine],
                "one_shot_test": [r["one_shot"]["test"] for r in mine],
                "one_shot_validation": [r["one_shot"]["validation"] for r in mine],
                "distilled_test": [r["distilled"]["test"] for r in mine if r["distilled"]],
                "gap_to_control": gaps,
                "speed": speeds.get(f"{variant}-{width}"),
            })
    return {"budget": {"distillation_steps": args.distillation_steps, "learning_rate": args.learning_rate,
                       "batch_size": 32, "max_length": args.max_length,
                       "calibration_examples": args.calibration_examples, "seeds": args.seeds},
            "original": original, "control_test": control_test, "rows": rows}


def render(summary: Dict[str, Any]) -> str:
    budget, original = summary["budget"], summary["original"]
    lines = [
        "# The hidden cut of all-MiniLM-L6-v2 on Rotten Tomatoes, variant by variant",
        "",
        f"Original: {original['parameters']:,} parameters, test {original['test']:.2%}, validation "
        f"{original['validation']:.2%} (fine-tuned 1 epoch). Budget: calibration {budget['calibration_examples']} "
        f"training sentences, self-distillation {budget['distillation_steps']} steps × {budget['batch_size']} "
        f"sentences of {budget['max_length']} tokens from the original (lr {budget['learning_rate']:g}), "
        f"seeds {budget['seeds']} (mean ± std over "
        "seeds). Heads pruned whole (the default), or every head kept and narrowed in the `-shrink` variants; every "
        "reader of the stream refitted by least squares.",
        "",
    ]
    if summary["control_test"]:
        lines += [f"Self-distilled control (the original, same steps): test {percent(summary['control_test'])}.", ""]
    lines += [
        "| variant | hidden | parameters | one-shot test | after distillation | distilled − control (paired by seed) | "
        "ORT CPU speed-up 32×128 "
        "(95% CI) | FLOP ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        speed = row["speed"]
        speed_text = speedup_text(speed)
        flop_text = f"{speed['flop_ratio']:.2f}×" if speed else "-"
        gap = points(row["gap_to_control"]) if row["gap_to_control"] else "-"
        lines.append(
            f"| {row['variant']} | {row['width']} | {row['parameters']:,} ({1 - row['parameters'] / original['parameters']:.1%} "
            f"cut) | {percent(row['one_shot_test'])} | {percent(row['distilled_test']) if row['distilled_test'] else '-'} | {gap} | {speed_text} | {flop_text} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    bench = HiddenCutBenchmark(args)
    original = bench.original_record()
    runs, controls, speeds = [], [], {}
    for seed in args.seeds:
        hidden, stats = bench.statistics(seed)
        for variant in args.variants:
            for width in args.widths:
                runs.append(bench.run(variant, width, seed, hidden, stats))
        if not args.one_shot_only:
            controls.append(bench.control(seed))
        if seed == args.seeds[0] and not args.no_speed:
            for variant in args.variants:
                speeds[f"{variant}-{args.widths[0]}"] = bench.speed_of(variant, args.widths[0], hidden, stats)
        summary = summarise(args, original, runs, controls, speeds)
        print(write_results(args.output_dir, summary, render))
    return summary


if __name__ == "__main__":
    main()
