"""Peak memory of calibration on SmolLM2-135M: the whole model in memory against layer by layer with the weights on
disk (Accelerate offload), each in a fresh process.

    python -m benchmarks.layerwise_memory --model /tmp/smollm2/original --output-dir benchmarks/results/layerwise_memory

Both runs calibrate the same blocks of real text (the novels of `make decoder-data`) at the same sites. `whole`:
the model loaded normally, one forward per batch. `layerwise-offloaded`: every decoder layer, the final norm and
the head on disk (`device_map`, `offload_folder`; only the embedding stays in memory), the calibration run one layer
at a time (`layerwise_calibration=True`). Reported: the float32 weights' size, the resident size after loading,
the peak resident size during calibration, the accumulators' size (one float64 d × d sum per capture point, kept
until the widths are decided) and the largest relative difference between the two runs' sums.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = ("whole", "layerwise-offloaded")


def run_one(scheme: str, model_dir: Path, blocks: int, block_size: int, sites, stats_path: Path) -> dict:
    """Load, calibrate and measure in this process (called in a child process per scheme)."""
    import psutil
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import load_english_prose
    from optimum_rmtkd import RMTKDConfig
    from optimum_rmtkd.adapters import get_adapter
    from optimum_rmtkd.calibration import collect_statistics, layerwise_layout
    from optimum_rmtkd.tasks import get_task
    from optimum_rmtkd.tasks.base import Columns
    from optimum_rmtkd.utils.memory import peak_rss

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = get_task("text-generation")
    texts = load_english_prose()["train"].select(range(400))
    data = task.inputs(texts, tokenizer, Columns(), block_size, "calibration").select(range(blocks))
    loader = DataLoader(data.with_format("torch"), batch_size=4, collate_fn=task.collator(tokenizer))
    rss_start = psutil.Process().memory_info().rss
    if scheme == "whole":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                      "model.norm": "disk", "lm_head": "disk"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=str(stats_path.parent / f"offload-{scheme}"))
    model.eval()
    rss_loaded = psutil.Process().memory_info().rss
    adapter = get_adapter(model)
    config = RMTKDConfig(sites=tuple(sites), layerwise_calibration=scheme != "whole")
    points = adapter.required_captures([s for group in adapter.stages(model, config) for s in group])
    start = time.perf_counter()
    stats, before, peak = peak_rss(lambda: collect_statistics(
        model, loader, points, forward_kwargs=task.forward_kwargs(),
        layerwise=layerwise_layout(adapter, model, config)))
    seconds = time.perf_counter() - start
    torch.save({key: acc.sum_outer for key, acc in stats.items()}, stats_path)
    accumulator_bytes = sum(acc.sum_outer.numel() * 8 + acc.sum.numel() * 8 for acc in stats.values())
    weights = AutoModelForCausalLM.from_config(model.config)  # counted on a fresh copy: offloaded ones are on meta
    weight_bytes = sum(p.numel() * 4 for p in weights.parameters())
    return {
        "scheme": scheme, "weights_mb": weight_bytes / 1e6, "rss_before_load_mb": rss_start / 1e6,
        "rss_after_load_mb": rss_loaded / 1e6, "rss_before_calibration_mb": before / 1e6,
        "peak_rss_during_calibration_mb": peak / 1e6,
        "calibration_rise_mb": (peak - before) / 1e6, "peak_above_start_mb": (peak - rss_start) / 1e6,
        "accumulators_mb": accumulator_bytes / 1e6, "capture_points": len(stats), "seconds": seconds,
        "blocks": blocks, "block_size": block_size, "sites": list(sites),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2/original"))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/layerwise_memory"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/layerwise_memory"))
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sites", nargs="+", default=["heads"])
    parser.add_argument("--child", choices=SCHEMES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        row = run_one(args.child, args.model, args.blocks, args.block_size, args.sites,
                      args.work_dir / f"{args.child}.pt")
        print("RESULT " + json.dumps(row))
        return

    import torch

    from optimum_rmtkd.utils.io import atomic_write_json, atomic_write_text

    rows = []
    for scheme in SCHEMES:
        command = [sys.executable, "-m", "benchmarks.layerwise_memory", "--child", scheme, "--model", str(args.model),
                   "--work-dir", str(args.work_dir), "--blocks", str(args.blocks), "--block-size",
                   str(args.block_size), "--sites", *args.sites]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
    whole, layered = (torch.load(args.work_dir / f"{scheme}.pt") for scheme in SCHEMES)
    difference = max(float((layered[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole)
    summary = {"model": str(args.model), "rows": rows, "max_relative_difference_of_sums": difference}
    lines = [
        "# Calibration peak memory: whole model vs layer by layer with offloaded weights", "",
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {args.blocks} blocks of {args.block_size} tokens "
        f"of the training novels, sites {', '.join(args.sites)}; each scheme in a fresh process (2 threads).", "",
        "| scheme | float32 weights (MB) | resident after load (MB) | peak during calibration (MB) | peak above "
        "process start (MB) | accumulators (MB) | calibration time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['scheme']} | {row['weights_mb']:.0f} | {row['rss_after_load_mb']:.0f} | "
                     f"{row['peak_rss_during_calibration_mb']:.0f} | {row['peak_above_start_mb']:.0f} | "
                     f"{row['accumulators_mb']:.0f} | {row['seconds']:.1f} |")
    lines += ["", f"Largest difference of the two runs' sums, relative to each sum's largest entry: {difference:.1e}.",
              "", "'Peak above process start' counts everything the run added after the imports (model, "
              "activations, accumulators, allocator slack)."]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "results.json", summary)
    atomic_write_text(args.output_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
