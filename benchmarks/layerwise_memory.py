"""Peak memory of calibration on SmolLM2-135M: the whole model in memory against layer by layer with the weights on
disk (Accelerate offload), each in a fresh process.

    python -m benchmarks.layerwise_memory --model /tmp/smollm2/original --memory-cap-mb 900

Both runs calibrate the same blocks of real text (the novels of `make decoder-data`) at the same sites. `whole`:
the model loaded normally, one forward per batch. `layerwise-offloaded`: every decoder layer, the final norm and
the head on disk (`device_map`, `offload_folder`; only the embedding stays in memory), the calibration run one layer
at a time (`layerwise_calibration=True`, each finished layer's statistics offloaded to disk). Reported: the float32
weights' size, the resident and the anonymous size after loading and at their peak during calibration, the
statistics' size (one float64 d × d sum per capture point) and the largest relative difference between the two runs'
sums. With `--memory-cap-mb` (Linux, root) each scheme runs again inside a memory cgroup of that size: the test
that a calibration really fits in less memory than the weights need.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

SCHEMES = ("whole", "layerwise-offloaded")


def anonymous_kib() -> int:
    """This process's anonymous resident memory (`RssAnon`): what it cannot give back without swapping. File pages
    (the memory-mapped safetensors that offloaded weights are read from) count in the resident size but are cache
    the kernel reclaims under pressure."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


def run_one(scheme: str, model_dir: Path, blocks: int, block_size: int, sites, stats_path: Path,
            save_sums: bool = True) -> dict:
    """Load, calibrate and measure in this process (called in a child process per scheme); `save_sums` writes the
    sums for the comparison of the two schemes (all of them at once in memory: not under a memory cap)."""
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
    from optimum_rmtkd.utils.memory import peak_rss, polled_peak

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = get_task("text-generation")
    texts = load_english_prose()["train"].select(range(400))
    data = task.inputs(texts, tokenizer, Columns(), block_size, "calibration").select(range(blocks))
    loader = DataLoader(data.with_format("torch"), batch_size=4, collate_fn=task.collator(tokenizer))
    rss_start, anon_start = psutil.Process().memory_info().rss, anonymous_kib() * 1024
    if scheme == "whole":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                      "model.norm": "disk", "lm_head": "disk"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=str(stats_path.parent / f"offload-{scheme}"))
    model.eval()
    rss_loaded, anon_loaded = psutil.Process().memory_info().rss, anonymous_kib() * 1024
    adapter = get_adapter(model)
    config = RMTKDConfig(sites=tuple(sites), layerwise_calibration=scheme != "whole")
    points = adapter.required_captures([s for group in adapter.stages(model, config) for s in group])
    start = time.perf_counter()
    (stats, before, peak), anon_peak = polled_peak(lambda: peak_rss(lambda: collect_statistics(
        model, loader, points, forward_kwargs=task.forward_kwargs(),
        layerwise=layerwise_layout(adapter, model, config), offload_folder=stats_path.parent / f"sums-{scheme}")),
        lambda: anonymous_kib() * 1024, interval=0.002)
    seconds = time.perf_counter() - start
    if save_sums:
        torch.save({key: acc.sum_outer for key, acc in stats.items()}, stats_path)
    accumulator_bytes = sum((acc.dim + 1) * acc.dim * 8 for acc in stats.values())
    with torch.device("meta"):  # counted on an empty copy: offloaded weights are on meta in `model`
        weights = AutoModelForCausalLM.from_config(model.config)
    weight_bytes = sum(p.numel() * 4 for p in weights.parameters())
    return {
        "scheme": scheme, "weights_mb": weight_bytes / 1e6, "rss_before_load_mb": rss_start / 1e6,
        "rss_after_load_mb": rss_loaded / 1e6, "rss_before_calibration_mb": before / 1e6,
        "peak_rss_during_calibration_mb": peak / 1e6,
        "calibration_rise_mb": (peak - before) / 1e6, "peak_above_start_mb": (peak - rss_start) / 1e6,
        "anonymous_after_load_mb": anon_loaded / 1e6, "peak_anonymous_mb": anon_peak / 1e6,
        "peak_anonymous_above_start_mb": (anon_peak - anon_start) / 1e6,
        "offloaded_accumulators": sum(acc.is_offloaded for acc in stats.values()),
        "accumulators_mb": accumulator_bytes / 1e6, "capture_points": len(stats), "seconds": seconds,
        "blocks": blocks, "block_size": block_size, "sites": list(sites),
    }


class MemoryCgroup:
    """A Linux memory cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes` with swap capped too) that a child
    process joins before it starts; the kernel kills it when its memory, page cache included after reclaim, would
    pass the cap."""

    def __init__(self, name: str, cap_bytes: int) -> None:
        root = Path("/sys/fs/cgroup")
        v1 = root / "memory"
        self.path = (v1 if v1.is_dir() else root) / name
        self.path.mkdir()  # PermissionError / OSError where cgroups cannot be made (not root, read-only)
        if v1.is_dir():
            (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes))
            with contextlib.suppress(OSError):  # absent when swap accounting is off
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
            self.peak_file = self.path / "memory.max_usage_in_bytes"
        else:
            (self.path / "memory.max").write_text(str(cap_bytes))
            (self.path / "memory.swap.max").write_text("0")
            self.peak_file = self.path / "memory.peak"

    def join(self) -> None:
        """Run in the child between fork and exec (`preexec_fn`)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError):
            return int(self.peak_file.read_text())
        return None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def run_capped(command: List[str], scheme: str, cap_mb: int) -> dict:
    """Run one scheme's child inside a memory cgroup of `cap_mb`; whether it finished, and the cgroup's peak."""
    try:
        cgroup = MemoryCgroup(f"rmtkd-layerwise-{os.getpid()}-{scheme}", cap_mb * 2**20)
    except OSError as error:
        return {"scheme": scheme, "cap_mb": cap_mb, "finished": None, "why_not_run": f"no memory cgroup: {error}"}
    try:
        completed = subprocess.run(command + ["--skip-sums"], capture_output=True, text=True,
                                   preexec_fn=cgroup.join)
        return {"scheme": scheme, "cap_mb": cap_mb, "finished": completed.returncode == 0,
                "returncode": completed.returncode, "cgroup_peak_mb": (cgroup.peak_bytes() or 0) / 2**20}
    finally:
        cgroup.remove()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2/original"))
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/layerwise_memory"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/layerwise_memory"))
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sites", nargs="+", default=["ffn", "heads"])
    parser.add_argument("--memory-cap-mb", type=int, default=None,
                        help="also run each scheme in a Linux memory cgroup capped at this size (needs root)")
    parser.add_argument("--child", choices=SCHEMES, help=argparse.SUPPRESS)
    parser.add_argument("--skip-sums", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        row = run_one(args.child, args.model, args.blocks, args.block_size, args.sites,
                      args.work_dir / f"{args.child}.pt", save_sums=not args.skip_sums)
        print("RESULT " + json.dumps(row))
        return

    import torch

    from optimum_rmtkd.utils.io import atomic_write_json, atomic_write_text

    rows, capped = [], []
    for scheme in SCHEMES:
        command = [sys.executable, "-m", "benchmarks.layerwise_memory", "--child", scheme, "--model", str(args.model),
                   "--work-dir", str(args.work_dir), "--blocks", str(args.blocks), "--block-size",
                   str(args.block_size), "--sites", *args.sites]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
        if args.memory_cap_mb:
            capped.append(run_capped(command, scheme, args.memory_cap_mb))
    whole, layered = (torch.load(args.work_dir / f"{scheme}.pt") for scheme in SCHEMES)
    difference = max(float((layered[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole)
    summary = {"model": str(args.model), "rows": rows, "capped_runs": capped,
               "max_relative_difference_of_sums": difference}
    lines = [
        "# Calibration peak memory: whole model vs layer by layer with offloaded weights", "",
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {args.blocks} blocks of {args.block_size} tokens "
        f"of the training novels, sites {', '.join(args.sites)}; each scheme in a fresh process (2 threads).", "",
        "| scheme | float32 weights (MB) | resident after load (MB) | peak resident (MB) | anonymous after load (MB) "
        "| peak anonymous (MB) | peak anonymous above process start (MB) | statistics (MB; sites on disk) | "
        "calibration time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['scheme']} | {row['weights_mb']:.0f} | {row['rss_after_load_mb']:.0f} | "
                     f"{row['peak_rss_during_calibration_mb']:.0f} | {row['anonymous_after_load_mb']:.0f} | "
                     f"{row['peak_anonymous_mb']:.0f} | {row['peak_anonymous_above_start_mb']:.0f} | "
                     f"{row['accumulators_mb']:.0f}; {row['offloaded_accumulators']} of {row['capture_points']} | "
                     f"{row['seconds']:.1f} |")
    lines += ["", f"Largest difference of the two runs' sums, relative to each sum's largest entry: {difference:.1e}.",
              "", "Resident = anonymous + file pages. The file pages are the memory-mapped safetensors the offloaded "
              "weights are read from: they count as resident until the kernel needs them back, then it drops them "
              "(they are cache). Anonymous memory (`RssAnon`, polled every 2 ms) is what the process cannot give "
              "back: model tensors in memory, activations, statistics, allocator slack. 'Above process start' "
              "subtracts what the imports already held. Statistics: one float64 d × d sum and d-vector per capture "
              "point; layer by layer, each finished layer's go to disk before the next layer runs."]
    if capped:
        lines += ["", f"The same runs in a memory cgroup capped at {args.memory_cap_mb} MiB (page cache included, no "
                  "swap), less than the process's anonymous memory after the imports plus the float32 weights:", "",
                  "| scheme | under the cap | cgroup peak (MiB) |", "|---|---|---|"]
        for run in capped:
            if run["finished"] is None:
                outcome = f"not run ({run['why_not_run']})"
            else:
                outcome = "finished" if run["finished"] else f"killed (exit {run['returncode']})"
            lines.append(f"| {run['scheme']} | {outcome} | {run.get('cgroup_peak_mb', 0):.0f} |")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "results.json", summary)
    atomic_write_text(args.output_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
