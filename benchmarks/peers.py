"""The peer tools side by side at equal size: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes.

    make peers                                      # Torch-Pruning 1.6.1, TextPruner 1.1 (--no-deps)
    .venv/bin/python -m benchmarks.peers --output-dir benchmarks/results/peers

At each size (−50%, and the default run's −63.7%) every method prunes the same fine-tuned original to the same
parameter count (± 2%) with its own importance and calibration data, then every pruned model gets the same
self-distillation budget from the same teacher (the original) with the library's loop, for each seed, beside the
self-distilled control (the original distilled from itself for the same steps):

- `rmtkd`: the size-target mode (`target_reduction`): one global scale of every site's σ² found by bisection,
  the stages cut in order (FFN, then hidden) with fresh calibration statistics, no training in between;
- `rmtkd-uniform`: the same cut with the share of every site the same (the largest that meets the size), to tell
  what the spectra's allocation adds;
- `torch-pruning-magnitude`: Torch-Pruning's Hugging Face BERT recipe (`MetaPruner`, L2 magnitude, whole heads, the
  hidden width and every FFN pruned uniformly); `torch-pruning-taylor`: the same with first-order Taylor importance
  from the gradients of the task loss on the calibration sentences. The hidden width must stay a whole number of
  heads of 32 for the checkpoint to reload, so the head count is searched (best one-shot validation accuracy, seed
  0) and the FFN ratio set to meet the size;
- `textpruner`: TextPruner's vocabulary pruning (the tokens of the training sentences) plus its FFN pruning
  (iterative, loss-gradient importance); its head pruning calls `prune_heads`, which transformers 5 removed;
- NVIDIA ModelOpt prunes FFN and heads only: removing every one of them still leaves more parameters than either
  size allows (the count is printed in the table), so it is not run.

The peers are benchmark-only dependencies (`[peers]`), never imported by the library. Results are written per run
(`runs/`) so an interrupted benchmark resumes; tables go to results.md/.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from transformers import AutoModelForSequenceClassification

from benchmarks.distillation_runs import DistillationRuns, add_budget_arguments, percent, points, speedup_text
from benchmarks.results_io import write_results
from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.modeling.per_layer import as_output_format
from optimum_rmtkd.saving import save_compressed_model
from optimum_rmtkd.utils.io import atomic_write_json
from optimum_rmtkd.widths import allocate_widths

DEFAULT_OUTPUT = Path("benchmarks/results/peers")
#: Size name → share of the parameters removed; 63.7% is the default compression run's (8,240,882 of 22,713,986).
SIZES: Dict[str, float] = {"50%": 0.5, "63.7%": 1.0 - 8_240_882 / 22_713_986}
METHODS = ("rmtkd", "rmtkd-uniform", "torch-pruning-magnitude", "torch-pruning-taylor", "textpruner")
SIZE_TOLERANCE = 0.02  # a pruned model counts as "the same size" within ± 2% of the target count
MIN_FFN = 32
HEAD_DIM = 32  # MiniLM's; Torch-Pruning's recipe prunes whole heads and keeps their size
PEER_VERSIONS = ("torch-pruning", "textpruner")


@dataclass
class Pruned:
    """A method's pruned model and what it decided."""

    model: Any
    details: Dict[str, Any]
    #: Applied to the original tokenizer's input ids before the model sees them (a pruned vocabulary renumbers them).
    input_ids_map: Optional[torch.Tensor] = None
    #: Files a stock reload needs besides the weights (TextPruner writes its own vocabulary).
    save: Optional[Callable[[Path], None]] = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--table-only", action="store_true",
                        help="write the tables from the runs already finished in <output-dir>/runs, run nothing")
    add_budget_arguments(parser, distillation_steps=60)
    return parser.parse_args(argv)


def _heads_of(model) -> Dict[torch.nn.Module, int]:
    heads = {}
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            heads[linear] = attention.num_attention_heads
    return heads


def _sync_bert_config(model) -> None:
    """Write the pruned widths into the modules' attributes and the config, as Torch-Pruning's BERT example does
    for the modules (the config is what a stock reload reads)."""
    layers = model.bert.encoder.layer
    for layer in layers:
        attention = layer.attention.self
        attention.num_attention_heads = attention.query.out_features // HEAD_DIM
        attention.all_head_size = attention.query.out_features
    model.config.hidden_size = model.bert.embeddings.word_embeddings.embedding_dim
    model.config.num_attention_heads = layers[0].attention.self.num_attention_heads
    model.config.intermediate_size = layers[0].intermediate.dense.out_features
    model.config.vocab_size = model.bert.embeddings.word_embeddings.num_embeddings


class PeersBenchmark(DistillationRuns):
    """Every (size, method, seed) run, each saved as it finishes."""

    # ---- the methods ---------------------------------------------------------------------------------------------

    def prune_rmtkd(self, reduction: float, seed: int, uniform: bool = False) -> Pruned:
        config = RMTKDConfig(**{**self.base_config.to_dict(), "seed": seed, "target_reduction": reduction})
        model, details = rmtkd_cut(self.load_original().eval(), self.calibration_loader(seed), config, uniform)
        return Pruned(model, details,
                      save=lambda folder: save_compressed_model(model, self.tokenizer, folder, config.output_format))

    def _torch_pruning(self, heads: int, ffn: int, importance: str, seed: int):
        import torch_pruning as tp

        batch = next(iter(self.calibration_loader(seed)))
        example = {k: v for k, v in batch.items() if k != "labels"}
        if importance == "taylor":
            imp = tp.importance.GroupTaylorImportance()
            source = self._with_task_gradients(seed)
            model = copy.deepcopy(source)
            for copied, original_parameter in zip(model.parameters(), source.parameters()):
                copied.grad = original_parameter.grad.clone()  # `deepcopy` leaves `.grad` behind
        else:
            model = self.load_original().eval()
            imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        ratio = 1.0 - heads / model.config.num_attention_heads
        ffn_ratio = 1.0 - ffn / model.config.intermediate_size
        pruner = tp.pruner.MetaPruner(
            model, example, importance=imp, global_pruning=False, pruning_ratio=ratio,
            pruning_ratio_dict={layer.intermediate.dense: ffn_ratio for layer in model.bert.encoder.layer},
            num_heads=_heads_of(model), prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=ratio,
            output_transform=lambda out: out.logits.sum(), ignored_layers=[model.classifier],
        )
        for group in pruner.step(interactive=True):
            group.prune()
        model.zero_grad(set_to_none=True)
        _sync_bert_config(model)
        return model

    def _with_task_gradients(self, seed: int):
        """The original with the gradients of the task loss summed over the calibration sentences of `seed` (what
        Taylor importance reads), computed once per seed."""
        cache = self.__dict__.setdefault("_gradient_models", {})
        if seed not in cache:
            model = self.load_original().eval()
            for calibration_batch in self.calibration_loader(seed):
                model(**calibration_batch).loss.backward()
            cache.clear()  # one seed at a time: runs go seed by seed
            cache[seed] = model
        return cache[seed]

    def prune_torch_pruning(self, reduction: float, seed: int, importance: str) -> Pruned:
        original = self.load_original()
        target = int(original.num_parameters() * (1.0 - reduction))
        choice_path = self.runs_dir / f"torch-pruning-{importance}-{_size_name(reduction)}-choice.json"
        if choice_path.is_file():
            choice = json.loads(choice_path.read_text())
        else:  # the head count with the best one-shot validation accuracy, seed 0, FFN set to meet the size
            candidates = []
            full_ffn = original.config.intermediate_size
            for heads in range(1, original.config.num_attention_heads):
                magnitude = lambda ffn, heads=heads: self._torch_pruning(heads, ffn, "magnitude", 0)  # noqa: E731
                # (Torch-Pruning leaves a layer whole when asked to keep a single channel: 32 is the narrowest.)
                narrowest = magnitude(MIN_FFN).num_parameters()
                if narrowest > target:
                    continue
                # The count is linear in the FFN width: each channel is a row and a column of every layer's FFN.
                per_channel = original.config.num_hidden_layers * (2 * heads * HEAD_DIM + 1)
                ffn = min(full_ffn - 1, MIN_FFN + (target - narrowest) // per_channel)
                model = self._torch_pruning(heads, ffn, importance, 0)
                if abs(model.num_parameters() / target - 1) > SIZE_TOLERANCE:
                    continue  # even the whole FFN leaves it smaller than the size
                candidates.append({"heads": heads, "hidden": heads * HEAD_DIM, "ffn": ffn,
                                   "parameters": model.num_parameters(),
                                   "one_shot_validation": self.scores(model)["validation"]})
            choice = {"candidates": candidates,
                      **max(candidates, key=lambda c: c["one_shot_validation"])}
            atomic_write_json(choice_path, choice)
        model = self._torch_pruning(choice["heads"], choice["ffn"], importance, seed)
        details = {"heads": choice["heads"], "hidden": choice["hidden"], "ffn": choice["ffn"],
                   "candidates": choice["candidates"]}
        return Pruned(model, details, save=lambda folder: save_with_tokenizer(model, self.tokenizer, folder))

    def prune_textpruner(self, reduction: float, seed: int) -> Pruned:
        from textpruner import (GeneralConfig, TransformerPruner, TransformerPruningConfig, VocabularyPruner,
                                VocabularyPruningConfig)

        original = self.load_original()
        target = int(original.num_parameters() * (1.0 - reduction))
        work = self.out / "textpruner-work"
        general = GeneralConfig(use_device="cpu", output_dir=str(work))
        texts = list(self.splits["train"]["text"])
        # The vocabulary first (on a copy) tells how much the FFN must give.
        vocab_probe = copy.deepcopy(original)
        VocabularyPruner(vocab_probe, self.tokenizer, general_config=general,
                         vocabulary_pruning_config=VocabularyPruningConfig(min_count=1, prune_lm_head=False)
                         ).prune(dataiter=texts, save_model=False)
        per_channel = original.config.num_hidden_layers * (2 * original.config.hidden_size + 1)
        excess = vocab_probe.num_parameters() - target
        ffn = original.config.intermediate_size - -(-excess // per_channel)  # ceil division
        if ffn < 1:
            raise _CannotReach(
                f"vocabulary pruning to the {vocab_probe.get_input_embeddings().num_embeddings:,} tokens of the "
                f"training sentences and "
                f"FFN pruning to width 1 leave {vocab_probe.num_parameters() - per_channel * (original.config.intermediate_size - 1):,} "
                f"parameters, more than the {target:,} this size allows (it prunes neither the hidden width nor, "
                "under transformers 5, the heads)")
        model = self.load_original()
        # TextPruner calls `prune_heads` even when no head is pruned; transformers 5 removed it.
        model.bert.prune_heads = _prune_no_heads
        shutil.rmtree(work, ignore_errors=True)  # TextPruner caches importance scores there; every seed recomputes
        TransformerPruner(model, general_config=general, transformer_pruning_config=TransformerPruningConfig(
            target_ffn_size=ffn, target_num_of_heads=original.config.num_attention_heads, pruning_method="iterative",
            n_iters=4)).prune(dataloader=self.calibration_loader(seed), adaptor=lambda outputs: outputs.loss,
                              save_model=False)
        vocabulary = VocabularyPruner(model, self.tokenizer, general_config=general,
                                      vocabulary_pruning_config=VocabularyPruningConfig(min_count=1,
                                                                                         prune_lm_head=False))
        vocabulary.prune(dataiter=texts, save_model=False)
        kept = torch.tensor(vocabulary.pruned_token_ids)
        input_ids_map = torch.full((original.config.vocab_size,), kept.tolist().index(self.tokenizer.unk_token_id))
        input_ids_map[kept] = torch.arange(len(kept))
        # TextPruner's FFN pruning swaps the weight tensors but leaves the config (and `Linear.out_features`) as they
        # were; its vocabulary pruner then saves that config: give it the width the weights have.
        model.config.intermediate_size = model.bert.encoder.layer[0].intermediate.dense.weight.shape[0]
        model.config.vocab_size = len(kept)

        def save(folder: Path) -> None:
            # The weights, config and pruned vocabulary; an absolute path, or TextPruner nests it in its work dir.
            vocabulary.save_model(str(folder.resolve()))
        return Pruned(model, {"ffn": ffn, "vocabulary": len(kept)}, input_ids_map=input_ids_map, save=save)

    # ---- running them ----------------------------------------------------------------------------------------

    def prune(self, method: str, reduction: float, seed: int) -> Pruned:
        if method.startswith("rmtkd"):
            return self.prune_rmtkd(reduction, seed, uniform=method == "rmtkd-uniform")
        if method.startswith("torch-pruning-"):
            return self.prune_torch_pruning(reduction, seed, method.rsplit("-", 1)[1])
        return self.prune_textpruner(reduction, seed)

    def reload_check(self, pruned: Pruned, folder: Path) -> Dict[str, Any]:
        """Save as the tool does, reload with stock `from_pretrained`, and compare the logits on one batch."""
        shutil.rmtree(folder, ignore_errors=True)
        pruned.save(folder)
        batch = _mapped(next(iter(self.data["test"])), pruned.input_ids_map)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        try:
            reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            with torch.no_grad():
                difference = (reloaded(**inputs).logits - pruned.model.eval()(**inputs).logits).abs().max().item()
        except Exception as error:  # the table reports why a checkpoint does not reload
            return {"reloads": False, "why": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        return {"reloads": difference <= 1e-4, "max_abs_logit_difference": difference}

    def run(self, method: str, size: str, seed: int) -> Dict[str, Any]:
        path = self.runs_dir / f"{method}-{size}-seed{seed}.json"
        record = self.finished(f"{method}-{size}-seed{seed}")
        if record is not None and (record.get("distilled") is not None or record.get("cannot_reach")):
            return record
        start = time.perf_counter()
        try:
            pruned = self.prune(method, SIZES[size], seed)
        except _CannotReach as reason:
            record = {"method": method, "size": size, "seed": seed, "cannot_reach": str(reason)}
            atomic_write_json(path, record)
            return record
        prune_s = time.perf_counter() - start
        twin = self.runs_dir / f"rmtkd-{size}-seed{seed}.json"
        if method == "rmtkd-uniform" and twin.is_file():
            allocated = json.loads(twin.read_text())
            if allocated["details"]["widths"] == pruned.details["widths"] and allocated["distilled"]:
                # The same widths, channels and refits: the same model, so the same scores (not trained twice).
                record = {**allocated, "method": method, "same_model_as": "rmtkd"}
                atomic_write_json(path, record)
                return record
        folder = self.out / "models" / f"{method}-{size}-seed{seed}"
        reload = self.reload_check(pruned, folder)
        hooks = _map_input_ids(pruned.model, pruned.input_ids_map)
        record = {"method": method, "size": size, "seed": seed, "parameters": pruned.model.num_parameters(),
                  "prune_s": prune_s, "details": pruned.details, "one_shot": self.scores(pruned.model),
                  "reload": reload, "folder": str(folder), "distilled": None}
        atomic_write_json(path, record)
        config = RMTKDConfig(**{**self.base_config.to_dict(), "seed": seed})
        model = self.distil(pruned.model, config, f"Distilling {method} {size} seed {seed}")
        record = {**record, "distilled": self.scores(model), "distillation_steps": self.args.distillation_steps}
        for hook in hooks:
            hook.remove()
        atomic_write_json(path, record)
        return record


def rmtkd_cut(model, loader, config: RMTKDConfig, uniform: bool = False):
    """The size-target mode's cut of `model` to `config.target_reduction`, without training: one calibration pass,
    the allocation, then the compressor's stages in order, each on fresh statistics of the model cut so far.
    `uniform` takes the hidden width of the uniform cut instead (the same share of every site,
    `Allocation.uniform_widths`) and widens the FFN back to the size, so that both cut to the same count and differ
    only in where the spectra put it; channel selection and refits are the same. Returns the model and what was
    decided."""
    adapter = get_adapter(model)
    groups = adapter.stages(model, config)
    sites = [site for group in groups for site in group]
    stats = collect_statistics(model, loader, adapter.required_captures(sites))
    allocation = allocate_widths(adapter, model, stats, config, config.target_reduction)
    widths = _uniform_filled(adapter, model, sites, stats, config, allocation) if uniform else allocation.widths
    cut_yet = False
    for group in groups:
        names = {site.name for site in group}
        current = [s for s in adapter.sites(model) if s.name in names and widths[s.name] < s.dim]
        if current:
            if cut_yet:  # before the first cut the allocation's statistics are the model's own
                stats = collect_statistics(model, loader, adapter.required_captures(current))
            model = adapter.reduce(model, current, {s.name: widths[s.name] for s in current}, stats, config)
            cut_yet = True
    model = as_output_format(model, config.output_format)
    return model, {"scale": allocation.scale, "widths": widths, "uniform_share": allocation.uniform_share}


class _CannotReach(Exception):
    """A method cannot prune this model to the asked size."""


def _uniform_filled(adapter, model, sites, stats, config: RMTKDConfig, allocation) -> Dict[str, int]:
    """The uniform cut's widths with the FFN sites widened (one width, in `width_multiple` steps) as far as the
    allocation's parameter target allows: the hidden width moves in whole heads, so the uniform share alone lands
    several percent under the size."""
    ffn = [site for site in sites if site.kind == "ffn"]
    step = config.width_multiple

    def count(width: int) -> int:
        widths = {**allocation.uniform_widths, **{site.name: width for site in ffn}}
        return adapter.parameters_after_cut(model, sites, widths, stats, config)

    width = max(allocation.uniform_widths[site.name] for site in ffn)
    while width + step <= ffn[0].dim and count(width + step) <= allocation.target_parameters:
        width += step
    return {**allocation.uniform_widths, **{site.name: width for site in ffn}}


def _prune_no_heads(heads_to_prune: Dict[int, List[int]]) -> None:
    if any(heads_to_prune.values()):
        raise NotImplementedError("transformers 5 removed `prune_heads`: TextPruner's head pruning cannot run.")


def _size_name(reduction: float) -> str:
    return next(name for name, value in SIZES.items() if value == reduction)


def save_with_tokenizer(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _mapped(batch: Dict[str, torch.Tensor], input_ids_map: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    if input_ids_map is None:
        return batch
    return {**batch, "input_ids": input_ids_map[batch["input_ids"]]}


def _map_input_ids(model, input_ids_map: Optional[torch.Tensor]) -> List[Any]:
    """Renumber the original tokenizer's ids into a pruned vocabulary inside the model, so that the shared data
    loaders (and the teacher) stay as they are."""
    if input_ids_map is None:
        return []
    embedding = model.get_input_embeddings()
    return [embedding.register_forward_pre_hook(lambda module, args: (input_ids_map[args[0]],))]


def modelopt_floor(model) -> int:
    """Parameters left when every FFN channel and attention head is removed: the floor of a tool that prunes only
    those (ModelOpt's `gradnas`/`fastnas` search space for BERT)."""
    prunable = 0
    for layer in model.bert.encoder.layer:
        for module in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                       layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
            prunable += sum(p.numel() for p in module.parameters())
    return model.num_parameters() - prunable


def summarise(args, original: Dict[str, Any], runs: List[Dict[str, Any]], controls: List[Dict[str, Any]],
              speeds: Dict[str, Any], floor: int) -> Dict[str, Any]:
    control_by_seed = {c["seed"]: c["distilled"]["test"] for c in controls}
    rows = []
    for size in args.sizes:
        target = int(original["parameters"] * (1.0 - SIZES[size]))
        for method in args.methods:
            mine = sorted((r for r in runs if r["method"] == method and r["size"] == size), key=lambda r: r["seed"])
            if not mine:
                continue
            if mine[0].get("cannot_reach"):
                rows.append({"size": size, "method": method, "cannot_reach": mine[0]["cannot_reach"]})
                continue
            done = [r for r in mine if r["distilled"]]
            rows.append({
                "size": size, "method": method, "target_parameters": target,
                "parameters": [r["parameters"] for r in mine],
                "within_tolerance": all(abs(r["parameters"] / target - 1) <= SIZE_TOLERANCE for r in mine),
                "seeds": [r["seed"] for r in mine], "details": mine[0]["details"],
                "one_shot_test": [r["one_shot"]["test"] for r in mine],
                "distilled_test": [r["distilled"]["test"] for r in done],
                "gap_to_control": [r["distilled"]["test"] - control_by_seed[r["seed"]] for r in done
                                   if r["seed"] in control_by_seed],
                "reload": [r["reload"] for r in mine], "prune_s": [r["prune_s"] for r in mine],
                "speed": speeds.get(f"{method}-{size}"),
            })
        rows.append({"size": size, "method": "modelopt", "cannot_reach": (
            f"prunes FFN channels and heads only: removing all of them leaves {floor:,} parameters, more than the "
            f"{target:,} this size allows")} if floor > target else None)
    return {"budget": {"distillation_steps": args.distillation_steps, "batch_size": 32, "max_length": args.max_length,
                       "calibration_examples": args.calibration_examples, "seeds": args.seeds},
            "versions": _versions(), "original": original,
            "control_test": [c["distilled"]["test"] for c in controls], "rows": [r for r in rows if r]}


def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PEER_VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _widths_text(row: Dict[str, Any]) -> str:
    details = row["details"]
    if row["method"].startswith("rmtkd"):
        widths = details["widths"]
        hidden = next((w for name, w in widths.items() if "hidden" in name), None)
        ffn = sorted({w for name, w in widths.items() if "ffn" in name})
        return f"hidden {hidden}, FFN {'/'.join(map(str, ffn))}"
    if row["method"] == "textpruner":
        return f"vocabulary {details['vocabulary']:,}, FFN {details['ffn']}"
    return f"hidden {details['hidden']} ({details['heads']} heads), FFN {details['ffn']}"


def render(summary: Dict[str, Any]) -> str:
    budget, original = summary["budget"], summary["original"]
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in summary["versions"].items())
    lines = [
        "# Peers at equal size: all-MiniLM-L6-v2 on Rotten Tomatoes",
        "",
        f"Original: {original['parameters']:,} parameters, test {original['test']:.2%}, validation "
        f"{original['validation']:.2%} (fine-tuned 1 epoch). Every pruned model, then the same self-distillation "
        f"from the original: {budget['distillation_steps']} steps × {budget['batch_size']} sentences of "
        f"{budget['max_length']} tokens; calibration {budget['calibration_examples']} training sentences; seeds "
        f"{budget['seeds']} (mean ± std over seeds). Peers: {versions}.",
        "",
    ]
    if summary["control_test"]:
        lines += [f"Self-distilled control (the original, same steps): test {percent(summary['control_test'])}.", ""]
    lines += [
        "| size | method | widths | parameters | one-shot test | after distillation | distilled − control (paired) | "
        "stock reload | pruning wall time | ORT CPU speed-up 32×128 (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        if "cannot_reach" in row:
            lines.append(f"| −{row['size']} | {row['method']} | cannot reach this size: {row['cannot_reach']} "
                         "| | | | | | | |")
            continue
        speed = row["speed"]
        speed_text = speedup_text(speed)
        reload = row["reload"][0]
        reload_text = "yes" if reload["reloads"] else f"no ({reload.get('why', 'logits differ')})"
        parameters = row["parameters"][0]
        distilled = (f"{percent(row['distilled_test'])} (n={len(row['distilled_test'])})"
                     if row["distilled_test"] else "-")
        lines.append(
            f"| −{row['size']} | {row['method']} | {_widths_text(row)} | {parameters:,} "
            f"({1 - parameters / original['parameters']:.1%} cut) | {percent(row['one_shot_test'])} | "
            f"{distilled} | "
            f"{points(row['gap_to_control']) if row['gap_to_control'] else '-'} | {reload_text} | "
            f"{sum(row['prune_s']) / len(row['prune_s']):.0f} s | {speed_text} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    bench = PeersBenchmark(args)
    original = bench.original_record()
    floor = modelopt_floor(bench.load_original())
    runs, controls, speeds = [], [], {}
    for seed in args.seeds:
        for size in args.sizes:
            for method in args.methods:
                record = bench.finished(f"{method}-{size}-seed{seed}") if args.table_only else bench.run(
                    method, size, seed)
                if record is None:
                    continue
                runs.append(record)
                key = f"{method}-{size}"
                if key in speeds or args.no_speed or record.get("cannot_reach"):
                    continue
                twin = record.get("same_model_as")
                if twin:
                    speeds[key] = speeds.get(f"{twin}-{size}")
                else:  # timed once, on the first seed's model
                    speeds[key] = (bench.finished(f"speed-{key}") if args.table_only
                                   else bench.speed(key, Path(record["folder"])))
        control = bench.finished(f"control-seed{seed}") if args.table_only else bench.control(seed)
        if control is not None:
            controls.append(control)
        summary = summarise(args, original, runs, controls, speeds, floor)
        print(write_results(args.output_dir, summary, render))
    return summary


if __name__ == "__main__":
    main()
