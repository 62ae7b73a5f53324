"""`RMTKDConfig`: every choice of an RMT-KD run in one validated, JSON round-trippable dataclass.

Imports nothing heavy (no numpy, scipy, torch or transformers): the CLI reads the option sets below to build its
parsers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .utils.io import atomic_write_json

# The closed option sets live here, beside the config that checks them, so that the CLI can offer them as `choices`
# without importing scipy or transformers; `optimum_rmtkd.rmt` imports `ESTIMATORS` from here.
ESTIMATORS = ("paper", "mp-median", "gavish-donoho", "kritchman-nadler", "mppca")
SAMPLE_UNITS = ("tokens", "cls", "mean")
SITE_KINDS = ("hidden", "ffn", "heads", "channels")
OUTPUT_FORMATS = ("stock", "per-layer")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
METRIC_DROP_ACTIONS = ("stop", "skip")
HEAD_REDUCTIONS = ("shrink", "prune")
CHANNEL_SELECTIONS = ("variance", "qr")
HIDDEN_CUTS = ("coordinates", "rotation")
TARGET_MODES = ("stop", "allocate")
CONFIG_NAME = "rmtkd_config.json"
# Named sets of fields, applied under explicit values (`RMTKDConfig.preset`, `--preset`): `paper` is the recipe of
# the RMT-KD paper, which the defaults depart from (see `RMTKDConfig`).
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {"estimator": "paper", "sites": ("hidden", "ffn"), "on_metric_drop": "stop"},
}
# numpy seeds (`transformers.set_seed`) are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


def _check_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


def _type_text(value: Any, expected: str = "number") -> str:
    """`str '32'`: the type and value given, for a message; a quoted number (or `"true"` for a bool, `expected="bool"`),
    as a JSON file may hold it, gets the fix."""
    text = f"{type(value).__name__} {value!r}"
    if isinstance(value, str):
        quoted = value.strip().lower() in ("true", "false") if expected == "bool" else _is_number_text(value)
        if quoted:
            text += "; write it without quotes"
    return text


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_number(name: str, value: Any, kind: str, optional: bool) -> Any:
    """`value` as a Python `float` (`kind="float"`, ints accepted) or `int`, refusing bools, other types and non-finite
    numbers: NaN compares false with every bound, so it would pass the range checks and switch a rule off silently."""
    if optional and value is None:
        return None
    or_none = " or None" if optional else ""
    expected = numbers.Integral if kind == "int" else numbers.Real
    if isinstance(value, bool) or not isinstance(value, expected):
        article = "an integer" if kind == "int" else "a number"
        raise TypeError(f"`{name}` must be {article}{or_none}, got {_type_text(value)}.")
    if kind == "int":
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number{or_none}, got {value}.")
    return float(value)


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"`{name}` must be in {left}{low}, {high}{right}, got {value}.")


@dataclass
class RMTKDConfig:
    """Configuration of an RMT-KD compression run (spectral rule, calibration, surgery, distillation, stop rules).

    The defaults are the recipe of this repository's BERT-family benchmarks and demo (README, Results): the
    `mp-median` estimator, the FFN sites before the hidden width (`sites=("ffn", "hidden")`), and
    `on_metric_drop="skip"`, which undoes a stage that costs more than `max_metric_drop` and goes on with the next.
    The paper's recipe (`paper` estimator, hidden width first, stop at the first such stage) cut the hidden width
    first on a new task, lost accuracy, undid that stage and stopped with 0% fewer parameters. It stays one call
    away: `RMTKDConfig.preset("paper")` (`--preset paper` on the command line); values given explicitly win over it.

    Args:
        estimator (`str`, *optional*, defaults to `"mp-median"`): how σ² and the kept rank are estimated, one of
            `paper` (the paper's), `mp-median`, `gavish-donoho`, `kritchman-nadler`, `mppca` (see
            `optimum_rmtkd.rmt`).
        quantile (`float`, *optional*, defaults to 0.5): τ, the eigenvalue quantile that starts the `paper` fit;
            higher compresses harder.
        tw_alpha (`float`, *optional*, defaults to 0.005): level of the Tracy–Widom test of `kritchman-nadler`.
        histogram_bins (`int`, *optional*): bins of the `paper` histogram fit (defaults to the estimator's rule).
        sigma2_scale (`float`, *optional*, defaults to 1.0): multiplies the fitted σ²; > 1 compresses harder.
        centered (`bool`, *optional*, defaults to `False`): centre activations (covariance) instead of the
            paper's uncentred second moment.
        sample_unit (`str`, *optional*, defaults to `"tokens"`): what one sample is for text models: every
            non-padding token, the `[CLS]` token, or the mean over each sequence's tokens. It changes n, so q and
            the bulk edge.
        calibration_fraction (`float`, *optional*, defaults to 0.1): share of the training split used to
            calibrate when no calibration set is given (the paper's 10%).
        max_calibration_examples (`int`, *optional*, defaults to 2048): cap on calibration examples.
        layerwise_calibration (`bool`, *optional*, defaults to `False`): calibrate one layer at a time over the
            whole calibration set (the first layer's inputs are kept, then each layer runs once over all of them),
            so that a model loaded with offloaded weights (`device_map="auto"`, `offload_folder=...`) needs about
            one layer in memory, not the whole model; the statistics equal the whole-model pass's to round-off.
            Each finished layer's float64 sums go to disk (`<save_directory>.checkpoints/statistics` for `compress`,
            the temporary folder, `$TMPDIR`, for `analyze`) and are read back one site at a time. Needs an adapter
            with `layerwise_layout` (the decoders).
        sites (`tuple[str]`, *optional*, defaults to `("ffn", "hidden")`): kinds of site to reduce, in the order
            the stages run (the paper cuts `hidden` first). `heads` is a decoder's attention heads (whole key/value
            groups or query heads per group), `channels` the CNN site kind.
        width_multiple (`int`, *optional*, defaults to 8): kept widths are rounded up to this multiple
            (matrix-unit friendly), never above the original width.
        min_width (`int`, *optional*, defaults to 8): no site is reduced below this width.
        head_reduction (`str`, *optional*, defaults to `"prune"`): how attention follows a narrower hidden width
            (`hidden = heads × head size` in the stock format): `prune` keeps whole heads of unchanged size, those
            whose output carries the most energy, and rounds the width to a multiple of the head size; `shrink`
            keeps every head, each narrower, rotated onto its leading query/key and value directions. Same
            parameters and FLOPs; fewer, wider heads run attention faster (its softmax work scales with the number
            of heads), and on Rotten Tomatoes pruning lost no accuracy where shrinking lost 1.4 points (README).
        channel_selection (`str`, *optional*, defaults to `"variance"`): which channels a site that cannot be
            rotated keeps: `variance` (the largest diagonal of the second moment) or `qr` (pivoted QR on the kept
            eigenvectors: the coordinates that best span them). Readers are refitted by least squares either way.
            On MiniLM / Rotten Tomatoes the two tied on the FFN sites and `variance` kept more at the hidden width
            (`benchmarks/results/hidden_cut/`).
        hidden_cut (`str`, *optional*, defaults to `"coordinates"`): how a post-LayerNorm encoder's residual
            stream (the hidden width) is cut: `coordinates` keeps k of its coordinates and slices the LayerNorms
            (stock format, exact only at k = d); `rotation` rotates every stretch of the stream between two
            LayerNorms onto its leading k directions and folds the LayerNorms exactly (`optimum_rmtkd.layers`),
            which needs `output_format="per-layer"` (two k×k matrices per LayerNorm). Pre-RMSNorm decoders always
            rotate, in the stock format.
        ridge (`float`, *optional*, defaults to 1e-4): ridge of the least-squares refit of readers, relative
            to the mean diagonal of the kept second moment.
        output_format (`str`, *optional*, defaults to `"stock"`): `stock` saves the stock architecture with
            uniform widths (plain `from_pretrained`); `per-layer` keeps each layer's own width in a registered
            `rmtkd_<base>` model type.
        alpha (`float`, *optional*, defaults to 0.7): weight of the cross-entropy in
            `alpha * CE + (1 - alpha) * T² * KL(p_old || p_new)`.
        temperature (`float`, *optional*, defaults to 1.0): softening temperature T of the KL term.
        distillation_epochs (`float`, *optional*, defaults to 1.0): self-distillation after each reduction.
        max_distillation_steps (`int`, *optional*): cap on optimizer steps per stage (overrides epochs when
            smaller).
        learning_rate (`float` or `"auto"`, *optional*, defaults to `"auto"`): of fine-tuning and distillation;
            `"auto"` takes the task's `default_learning_rate` (5e-5 for classification; 1e-4 for text generation,
            where a cut decoder relearns far more per step at 1e-4 than at 2e-5: `benchmarks/results/peers/`).
        weight_decay (`float`, defaults to 0.01),
        warmup_ratio (`float`, defaults to 0.06), batch_size (`int`, defaults to 32),
        gradient_accumulation_steps (`int`, defaults to 1), max_length (`int`, defaults to 128),
        mixed_precision (`str`, defaults to `"no"`): passed to `accelerate.Accelerator`.
        finetune_epochs (`float`, *optional*, defaults to 0.0): train before the first reduction (the paper's
            "train until validation accuracy exceeds a threshold"); always done when the task head is new.
        trigger_metric (`float`, *optional*): validation metric that stops the pre-training early once reached (in
            the task's direction: at least this for accuracy, at most this for an error).
        target_reduction (`float`, *optional*): the share (0–1) of the parameters to remove; `target_mode` says how.
        target_mode (`str`, *optional*, defaults to `"stop"`): `stop` ends the run once the reduction reaches
            `target_reduction` (each stage's widths come from the estimator); `allocate` meets it: before the first
            stage every site's σ² is multiplied by one factor, found by bisection so that the predicted parameter
            count of the output meets the target (the spectra decide where to cut), and the stages cut to those
            widths (`optimum_rmtkd.widths.allocate_widths`).
        max_metric_drop (`float` or `"auto"`, *optional*, defaults to `"auto"`): a stage whose validation metric is
            worse than the uncompressed model's by more than this, in the metric's units as the task measures a loss
            (`Task.metric_drop`: points of accuracy below; for perplexity, the relative rise), is undone;
            `on_metric_drop` says what follows. `"auto"` takes the task's `default_max_metric_drop` (0.015 of
            accuracy for classification; 0.1, a 10% perplexity rise, for text generation, whose stages rarely come
            back within 1.5% after a short distillation). `None` switches the rule off.
        on_metric_drop (`str`, *optional*, defaults to `"skip"`): what a stage that breaks `max_metric_drop`
            does after it is undone: `skip` it and go on with the next stage (one fragile site, e.g. a CNN's first
            stage or a narrow hidden width, does not end the run) or `stop` the run (the paper's rule).
        max_kept_ratio (`float`, *optional*, defaults to 0.9): a site whose kept width would be at least this
            share of its width is left alone (nothing to gain).
        max_stages (`int`, *optional*): stop after this many reductions.
        seed (`int`, *optional*, defaults to 42): an integer in [0, 2**32 - 1].

    Every number must be finite and of its field's type (an `int` field refuses 2.0, and `bool` is not a number).

    Example:

    ```python
    >>> from optimum_rmtkd import RMTKDConfig
    >>> RMTKDConfig().estimator, RMTKDConfig().sites
    ('mp-median', ('ffn', 'hidden'))
    >>> paper = RMTKDConfig.preset("paper", quantile=0.7)
    >>> paper.estimator, paper.sites, paper.on_metric_drop, paper.quantile
    ('paper', ('hidden', 'ffn'), 'stop', 0.7)
    ```
    """

    estimator: str = "mp-median"
    quantile: float = 0.5
    tw_alpha: float = 0.005
    histogram_bins: Optional[int] = None
    sigma2_scale: float = 1.0
    centered: bool = False
    sample_unit: str = "tokens"
    calibration_fraction: float = 0.1
    max_calibration_examples: int = 2048
    sites: Tuple[str, ...] = ("ffn", "hidden")
    width_multiple: int = 8
    min_width: int = 8
    head_reduction: str = "prune"
    layerwise_calibration: bool = False
    channel_selection: str = "variance"
    hidden_cut: str = "coordinates"
    ridge: float = 1e-4
    output_format: str = "stock"
    alpha: float = 0.7
    temperature: float = 1.0
    distillation_epochs: float = 1.0
    max_distillation_steps: Optional[int] = None
    learning_rate: Union[float, str] = "auto"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    mixed_precision: str = "no"
    finetune_epochs: float = 0.0
    trigger_metric: Optional[float] = None
    target_reduction: Optional[float] = None
    target_mode: str = "stop"
    max_metric_drop: Union[float, str, None] = "auto"
    on_metric_drop: str = "skip"
    max_kept_ratio: float = 0.9
    max_stages: Optional[int] = None
    seed: int = 42

    def __post_init__(self) -> None:
        # Types first, from the annotations (`float`, `Optional[int]`, ...), so that no check below compares a
        # string, a bool or NaN; numbers are stored as plain Python `int`/`float` (numpy scalars included).
        for field in dataclasses.fields(self):
            kind = _NUMBER_FIELDS.get(field.name)
            if kind is not None:
                value = _check_number(field.name, getattr(self, field.name), *kind)
                setattr(self, field.name, value)
        for name in ("centered", "layerwise_calibration"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool (true or false), got {_type_text(value, 'bool')}.")
        if isinstance(self.sites, str):
            self.sites = (self.sites,)
        elif isinstance(self.sites, (list, tuple)):
            self.sites = tuple(self.sites)
        else:
            raise TypeError(
                f"`sites` must be a list or tuple of site kinds from {', '.join(map(repr, SITE_KINDS))}, got "
                f"{_type_text(self.sites)}."
            )
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("sample_unit", self.sample_unit, SAMPLE_UNITS)
        _check_choice("output_format", self.output_format, OUTPUT_FORMATS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("on_metric_drop", self.on_metric_drop, METRIC_DROP_ACTIONS)
        _check_choice("head_reduction", self.head_reduction, HEAD_REDUCTIONS)
        _check_choice("channel_selection", self.channel_selection, CHANNEL_SELECTIONS)
        _check_choice("hidden_cut", self.hidden_cut, HIDDEN_CUTS)
        _check_choice("target_mode", self.target_mode, TARGET_MODES)
        if self.target_mode == "allocate" and self.target_reduction is None:
            raise ValueError(
                "`target_mode='allocate'` meets `target_reduction`, which is not set; give one, e.g. "
                "`target_reduction=0.5` (`--target-reduction 0.5`)."
            )
        if self.hidden_cut == "rotation" and self.output_format != "per-layer":
            raise ValueError(
                "`hidden_cut='rotation'` stores a k×k matrix per LayerNorm, which the stock architecture cannot hold; "
                "add `output_format='per-layer'` (`--output-format per-layer`), or keep `hidden_cut='coordinates'` "
                "for a stock checkpoint."
            )
        if not self.sites:
            raise ValueError("`sites` must name at least one site kind, got an empty sequence.")
        for kind in self.sites:
            _check_choice("sites", kind, SITE_KINDS)
        _check_range("quantile", self.quantile, 0.0, 1.0)
        _check_range("tw_alpha", self.tw_alpha, 0.0, 1.0)
        _check_range("calibration_fraction", self.calibration_fraction, 0.0, 1.0, high_open=False)
        _check_range("alpha", self.alpha, 0.0, 1.0, low_open=False, high_open=False)
        _check_range("max_kept_ratio", self.max_kept_ratio, 0.0, 1.0, high_open=False)
        if self.target_reduction is not None:
            _check_range("target_reduction", self.target_reduction, 0.0, 1.0)
        if isinstance(self.max_metric_drop, str) and self.max_metric_drop != "auto":
            raise ValueError(
                f"`max_metric_drop` must be a number, 'auto' or None, got {_type_text(self.max_metric_drop)}.")
        if self.max_metric_drop != "auto":
            self.max_metric_drop = _check_number("max_metric_drop", self.max_metric_drop, "float", True)
        if self.max_metric_drop not in (None, "auto") and self.max_metric_drop < 0:
            raise ValueError(f"`max_metric_drop` must be >= 0 or None, got {self.max_metric_drop}.")
        if self.learning_rate != "auto":
            if isinstance(self.learning_rate, str):
                raise ValueError(
                    f"`learning_rate` must be a number or 'auto', got {_type_text(self.learning_rate)}.")
            self.learning_rate = _check_number("learning_rate", self.learning_rate, "float", False)
            if self.learning_rate <= 0:
                raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}.")
        for name in ("sigma2_scale", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        for name in ("ridge", "weight_decay", "distillation_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("width_multiple", "min_width", "batch_size", "gradient_accumulation_steps", "max_length",
                     "max_calibration_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("max_distillation_steps", "max_stages", "histogram_bins"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.histogram_bins is not None and self.histogram_bins < 2:
            raise ValueError(f"`histogram_bins` must be at least 2, got {self.histogram_bins}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"`seed` must be an integer in [0, 2**32 - 1], got {self.seed}.")
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, low_open=False)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RMTKDConfig":
        """The config of a named recipe (`PRESETS`), with `overrides` on top.

        Args:
            name (`str`): `"paper"`: the RMT-KD paper's recipe, `estimator="paper"`, `sites=("hidden", "ffn")`,
                `on_metric_drop="stop"`; every other field keeps its default.
            overrides: any `RMTKDConfig` field; they win over the preset.

        Example:

        ```python
        >>> RMTKDConfig.preset("paper", target_reduction=0.3).estimator
        'paper'
        ```
        """
        _check_choice("preset", name, tuple(PRESETS))
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sites"] = list(self.sites)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RMTKDConfig":
        if not isinstance(data, dict):
            raise TypeError(
                f"An RMTKDConfig must be built from a dict (a JSON object) of its fields, got {type(data).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown RMTKDConfig field(s) {', '.join(map(repr, unknown))}; allowed fields are {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json_file(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "RMTKDConfig":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def estimator_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of `optimum_rmtkd.rmt.fit_spectrum` that this config sets."""
        return {
            "estimator": self.estimator,
            "quantile": self.quantile,
            "alpha": self.tw_alpha,
            "bins": self.histogram_bins,
            "scale": self.sigma2_scale,
        }


# The numeric fields and how `__post_init__` checks them, read from the annotations (strings, under
# `from __future__ import annotations`): field -> (kind, whether None is allowed).
_NUMBER_TYPES = {"float": ("float", False), "Optional[float]": ("float", True),
                 "int": ("int", False), "Optional[int]": ("int", True)}
_NUMBER_FIELDS: Dict[str, Tuple[str, bool]] = {
    field.name: _NUMBER_TYPES[str(field.type)] for field in dataclasses.fields(RMTKDConfig)
    if str(field.type) in _NUMBER_TYPES
}
