"""`RMTKDConfig`: every choice of an RMT-KD run in one validated, JSON round-trippable dataclass.

Imports nothing heavy (no numpy, scipy, torch or transformers): the CLI reads the option sets below to build its
parsers.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .utils.io import atomic_write_json

# The closed option sets live here, beside the config that checks them, so that the CLI can offer them as `choices`
# without importing scipy or transformers; `optimum_rmtkd.rmt` imports `ESTIMATORS` from here.
ESTIMATORS = ("paper", "mp-median", "gavish-donoho", "kritchman-nadler", "mppca")
SAMPLE_UNITS = ("tokens", "cls", "mean")
SITE_KINDS = ("hidden", "ffn", "channels")
OUTPUT_FORMATS = ("stock", "per-layer")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
METRIC_DROP_ACTIONS = ("stop", "skip")
HEAD_REDUCTIONS = ("shrink", "prune")
CONFIG_NAME = "rmtkd_config.json"


def _check_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"`{name}` must be in {left}{low}, {high}{right}, got {value}.")


@dataclass
class RMTKDConfig:
    """Configuration of an RMT-KD compression run (spectral rule, calibration, surgery, distillation, stop rules).

    Args:
        estimator (`str`, *optional*, defaults to `"paper"`): how σ² and the kept rank are estimated, one of
            `paper`, `mp-median`, `gavish-donoho`, `kritchman-nadler`, `mppca` (see `optimum_rmtkd.rmt`).
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
        sites (`tuple[str]`, *optional*, defaults to `("hidden", "ffn")`): kinds of site to reduce, in the order
            the stages run. `channels` is the CNN site kind.
        width_multiple (`int`, *optional*, defaults to 8): kept widths are rounded up to this multiple
            (matrix-unit friendly), never above the original width.
        min_width (`int`, *optional*, defaults to 8): no site is reduced below this width.
        head_reduction (`str`, *optional*, defaults to `"prune"`): how attention follows a narrower hidden width
            (`hidden = heads × head size` in the stock format): `prune` keeps whole heads of unchanged size, those
            whose output carries the most energy, and rounds the width to a multiple of the head size; `shrink`
            keeps every head, each narrower, rotated onto its leading query/key and value directions. Same
            parameters and FLOPs; fewer, wider heads run attention faster (its softmax work scales with the number
            of heads), and on Rotten Tomatoes pruning lost no accuracy where shrinking lost 1.4 points (README).
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
        learning_rate (`float`, *optional*, defaults to 5e-5), weight_decay (`float`, defaults to 0.01),
        warmup_ratio (`float`, defaults to 0.06), batch_size (`int`, defaults to 32),
        gradient_accumulation_steps (`int`, defaults to 1), max_length (`int`, defaults to 128),
        mixed_precision (`str`, defaults to `"no"`): passed to `accelerate.Accelerator`.
        finetune_epochs (`float`, *optional*, defaults to 0.0): train before the first reduction (the paper's
            "train until validation accuracy exceeds a threshold"); always done when the task head is new.
        trigger_metric (`float`, *optional*): validation metric that stops the pre-training early.
        target_reduction (`float`, *optional*): stop once the parameter reduction reaches this share (0–1).
        max_metric_drop (`float`, *optional*, defaults to 0.015): stop, and keep the previous stage, when the
            validation metric falls more than this below the uncompressed model.
        on_metric_drop (`str`, *optional*, defaults to `"stop"`): what a stage that breaks `max_metric_drop`
            does after it is undone: `stop` the run (the paper's rule) or `skip` it and go on with the next stage
            (useful when one site, e.g. a CNN's first stage, is fragile and later ones are not).
        max_kept_ratio (`float`, *optional*, defaults to 0.9): a site whose kept width would be at least this
            share of its width is left alone (nothing to gain).
        max_stages (`int`, *optional*): stop after this many reductions.
        seed (`int`, *optional*, defaults to 42).
    """

    estimator: str = "paper"
    quantile: float = 0.5
    tw_alpha: float = 0.005
    histogram_bins: Optional[int] = None
    sigma2_scale: float = 1.0
    centered: bool = False
    sample_unit: str = "tokens"
    calibration_fraction: float = 0.1
    max_calibration_examples: int = 2048
    sites: Tuple[str, ...] = ("hidden", "ffn")
    width_multiple: int = 8
    min_width: int = 8
    head_reduction: str = "prune"
    ridge: float = 1e-4
    output_format: str = "stock"
    alpha: float = 0.7
    temperature: float = 1.0
    distillation_epochs: float = 1.0
    max_distillation_steps: Optional[int] = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    mixed_precision: str = "no"
    finetune_epochs: float = 0.0
    trigger_metric: Optional[float] = None
    target_reduction: Optional[float] = None
    max_metric_drop: Optional[float] = 0.015
    on_metric_drop: str = "stop"
    max_kept_ratio: float = 0.9
    max_stages: Optional[int] = None
    seed: int = 42

    def __post_init__(self) -> None:
        self.sites = tuple(self.sites) if not isinstance(self.sites, str) else (self.sites,)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("sample_unit", self.sample_unit, SAMPLE_UNITS)
        _check_choice("output_format", self.output_format, OUTPUT_FORMATS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("on_metric_drop", self.on_metric_drop, METRIC_DROP_ACTIONS)
        _check_choice("head_reduction", self.head_reduction, HEAD_REDUCTIONS)
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
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ValueError(f"`max_metric_drop` must be >= 0 or None, got {self.max_metric_drop}.")
        for name in ("sigma2_scale", "temperature", "learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        for name in ("ridge", "weight_decay", "distillation_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("width_multiple", "min_width", "batch_size", "gradient_accumulation_steps", "max_length",
                     "max_calibration_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("max_distillation_steps", "max_stages", "histogram_bins"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.histogram_bins is not None and self.histogram_bins < 2:
            raise ValueError(f"`histogram_bins` must be at least 2, got {self.histogram_bins}.")
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, low_open=False)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sites"] = list(self.sites)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RMTKDConfig":
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
