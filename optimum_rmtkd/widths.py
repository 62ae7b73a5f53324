"""The width decision, written once: site statistics → eigenvalues → `fit_spectrum` → kept width → saved width.

`RMTKDCompressor` (each stage), `analyze_model` and the quality benchmark all decide widths here, so a width they
report is the width `compress` cuts to on the same statistics and config:

1. `site_spectrum`: the eigenvalues of the site's second moment (its capture points pooled, `config.centered`) and the
   n of its Marchenko–Pastur null (one view's sample count, see `covariance.samples_per_view`);
2. `fit_spectrum(..., **config.estimator_kwargs())`: σ², the bulk edge and the rank k of `config.estimator`;
3. `widths_for_ranks`: `adapter.kept_width` (at least `min_width`, rounded up to `width_multiple` and the heads
   constraint), then `adapter.expressible_widths` (what `output_format` can hold: the stock format gives every site of
   one config field the widest width asked among them).

`decide_widths` runs the three steps on the sites of one stage (sites the format cuts together) and adds a
`SiteReport` per site, which holds every estimator's rank beside the configured one's; `widths_for_ranks` turns any
other ranks (another estimator's, a PCA rule's) into widths the same way.

Example:

```python
>>> from optimum_rmtkd.widths import decide_widths
>>> decision = decide_widths(adapter, model, stage_sites, stats, config)
>>> decision.widths  # site name -> the width to cut it to
```
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from .covariance import merged, samples_per_view
from .report import SiteReport, build_site_report
from .rmt import SpectrumFit, fit_spectrum

if TYPE_CHECKING:
    from .adapters import Adapter, Site
    from .configuration import RMTKDConfig
    from .covariance import SecondMomentAccumulator


@dataclass
class SiteSpectrum:
    """A site's second-moment spectrum as the fits see it.

    Attributes:
        eigenvalues (`np.ndarray`): the d eigenvalues, descending, clipped at 0.
        n_samples (`int`): n of the Marchenko–Pastur null (q = d / n).
    """

    eigenvalues: np.ndarray
    n_samples: int


@dataclass
class WidthDecision:
    """What `decide_widths` concluded for the sites of one stage; every dict is keyed by site name, in site order.

    Attributes:
        widths (`dict[str, int]`): the widths to cut to, as `config.output_format` can hold them.
        asked_widths (`dict[str, int]`): the width each site's own rank asks for (`adapter.kept_width`), before the
            format ties sites together; never above `widths`.
        fits (`dict[str, SpectrumFit]`): the fit of `config.estimator`.
        reports (`dict[str, SiteReport]`): the fit, every estimator's rank and the spectrum; `kept_width` is the
            entry of `widths`.
        spectra (`dict[str, SiteSpectrum]`): the eigenvalues and n behind the fits, for another call on the same
            statistics (`decide_widths(..., spectra=decision.spectra)`) or a rule of one's own.
    """

    widths: Dict[str, int]
    asked_widths: Dict[str, int]
    fits: Dict[str, SpectrumFit]
    reports: Dict[str, SiteReport]
    spectra: Dict[str, SiteSpectrum]


def site_spectrum(site: "Site", stats: Mapping[str, "SecondMomentAccumulator"], centered: bool = False) -> SiteSpectrum:
    """The eigenvalues of `site`'s second moment, its capture points pooled, and the n of its MP null.

    A site read at several points (the residual stream after every layer) pools their samples for the eigenvectors
    but keeps one view's sample count as n: the views see the same inputs (see `covariance.samples_per_view`).
    """
    views = [stats[point.key] for point in site.captures]
    eigenvalues = merged(views).eigh(centered=centered).eigenvalues.cpu().numpy()
    return SiteSpectrum(eigenvalues=eigenvalues, n_samples=samples_per_view(views))


def widths_for_ranks(
    adapter: "Adapter", model: nn.Module, sites: Sequence["Site"], ranks: Mapping[str, int], config: "RMTKDConfig"
) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Turn a kept rank per site into the widths `compress` would cut the sites to.

    Args:
        adapter (`Adapter`): the model's adapter.
        model (`nn.Module`): the model the sites belong to.
        sites (`list[Site]`): sites the format cuts together (one stage, see `Adapter.stages`).
        ranks (`dict[str, int]`): site name → k, the number of directions to keep.
        config (`RMTKDConfig`): `min_width`, `width_multiple` and `output_format` are read from it.

    Returns:
        `(asked, widths)`: the width each site's own rank asks for (`adapter.kept_width`), and the widths the saved
        format can hold (`adapter.expressible_widths`), both keyed by site name.
    """
    asked = {site.name: adapter.kept_width(model, site, int(ranks[site.name]), config) for site in sites}
    # The saved format may tie widths together (the stock format: one config field for every layer).
    return asked, adapter.expressible_widths(model, sites, dict(asked), config.output_format)


def decide_widths(
    adapter: "Adapter",
    model: nn.Module,
    sites: Sequence["Site"],
    stats: Mapping[str, "SecondMomentAccumulator"],
    config: "RMTKDConfig",
    *,
    spectra: Optional[Mapping[str, SiteSpectrum]] = None,
    warn: bool = True,
) -> WidthDecision:
    """Decide the kept width of each site of one stage from its calibration statistics.

    Args:
        adapter (`Adapter`): the model's adapter.
        model (`nn.Module`): the model the sites belong to (read, never changed).
        sites (`list[Site]`): the sites the format cuts together (one entry of `Adapter.stages`).
        stats (`dict[str, SecondMomentAccumulator]`): capture key → accumulator, from `collect_statistics`.
        config (`RMTKDConfig`): the estimator and its parameters (`estimator_kwargs`), `centered`, `min_width`,
            `width_multiple` and `output_format`.
        spectra (`dict[str, SiteSpectrum]`, *optional*): the sites' spectra when already computed from these
            `stats` with this `centered` (e.g. `decision.spectra` of an earlier call with another estimator), so the
            eigendecomposition is not repeated.
        warn (`bool`, *optional*, defaults to `True`): let `fit_spectrum` log its heavy-tail warning.

    Returns:
        `WidthDecision`: the widths to cut to, the widths asked before the format tied them, the fits, a
        `SiteReport` per site and the spectra.
    """
    spectra = dict(spectra) if spectra is not None else {}
    fits: Dict[str, SpectrumFit] = {}
    for site in sites:
        if site.name not in spectra:
            spectra[site.name] = site_spectrum(site, stats, centered=config.centered)
        spectrum = spectra[site.name]
        fits[site.name] = fit_spectrum(spectrum.eigenvalues, spectrum.n_samples, warn=warn, **config.estimator_kwargs())
    asked, widths = widths_for_ranks(adapter, model, sites, {name: fit.rank for name, fit in fits.items()}, config)
    reports = {
        site.name: build_site_report(site, fits[site.name], widths[site.name], spectra[site.name].eigenvalues)
        for site in sites
    }
    return WidthDecision(
        widths=widths, asked_widths=asked, fits=fits, reports=reports,
        spectra={site.name: spectra[site.name] for site in sites},
    )


@dataclass
class Allocation:
    """A size target met by the spectra (`allocate_widths`).

    Attributes:
        scale (`float`): the factor applied to every site's fitted σ² (on top of `config.sigma2_scale`) where the
            count first meets the target; above 1 the target asked for more than the estimator's own widths, below
            1 for less.
        group_scales (`list[float]`): the factor each stage's group of sites ends with (`Adapter.stages` order):
            `scale`, or less where the slack a coarse kind left was given back to that group.
        widths (`dict[str, int]`): site name → the width to cut it to (its own width when it is left alone).
        parameters (`int`): the predicted parameter count with these widths.
        original_parameters (`int`), target_parameters (`int`): the model's count and the most the target allows.
        uniform_widths (`dict[str, int]`): what a uniform cut (the same kept share at every site, the largest share
            that meets the target) would keep, for comparison.
        uniform_share (`float`): that share.
    """

    scale: float
    group_scales: List[float]
    widths: Dict[str, int]
    parameters: int
    original_parameters: int
    target_parameters: int
    uniform_widths: Dict[str, int]
    uniform_share: float

    @property
    def reduction(self) -> float:
        return 1.0 - self.parameters / self.original_parameters

    def to_dict(self) -> Dict[str, object]:
        return {**dataclasses.asdict(self), "reduction": self.reduction}


def _bisect(predicate, low: float, high: float, steps: int) -> float:
    """The boundary of a predicate that is false at `low` and true at `high` (monotone in between)."""
    for _ in range(steps):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if predicate(middle) else (middle, high)
    return high


def allocate_widths(
    adapter: "Adapter",
    model: nn.Module,
    stats: Mapping[str, "SecondMomentAccumulator"],
    config: "RMTKDConfig",
    target_reduction: float,
) -> Allocation:
    """Widths for every site of `config.sites` that remove at least `target_reduction` of the parameters, with the
    spectra deciding where to cut: one global factor s on every site's σ² (the kept rank falls as s grows, see
    `fit_spectrum(scale=...)`), the smallest that meets the target, found by bisection on log s against the count
    `adapter.parameters_after_cut` predicts; then each stage's group in turn lowers its own factor as far as the
    target allows, so that a coarse step of one kind does not leave the count far below the target. A site whose width would stay at `max_kept_ratio` of its own or more is
    left alone, as the compressor's stages leave it.

    Args:
        adapter (`Adapter`), model (`nn.Module`): the model and its adapter (the model is read, never changed).
        stats (`dict[str, SecondMomentAccumulator]`): calibration statistics of every site (one pass on `model`).
        config (`RMTKDConfig`): the estimator, rounding and format of the cut.
        target_reduction (`float`): the share of the parameters to remove, in (0, 1).

    Returns:
        `Allocation`: the scale, the widths and their predicted count, and what a uniform cut would keep instead.

    Raises:
        `ValueError`: the adapter cannot predict a count, or even cutting every site to `min_width` misses the target.
    """
    groups = adapter.stages(model, config)
    sites = [site for group in groups for site in group]
    spectra = {site.name: site_spectrum(site, stats, centered=config.centered) for site in sites}
    original = sum(p.numel() for p in model.parameters())
    target = int(math.floor(original * (1.0 - target_reduction)))

    def worth_cutting(widths: Dict[str, int]) -> Dict[str, int]:
        return {s.name: widths[s.name] if widths[s.name] < config.max_kept_ratio * s.dim else s.dim for s in sites}

    counted: Dict[Tuple[int, ...], Optional[int]] = {}

    def count(widths: Dict[str, int]) -> int:
        # Bisection steps mostly land on widths already priced (widths are whole channels): price each set once.
        key = tuple(widths[s.name] for s in sites)
        if key not in counted:
            counted[key] = adapter.parameters_after_cut(model, sites, widths, stats, config)
        predicted = counted[key]
        if predicted is None:
            raise ValueError(
                f"`target_reduction` as a size target needs a parameter count before cutting, which the "
                f"{type(adapter).__name__} cannot predict; use it as a stop rule (`target_mode='stop'`)."
            )
        return predicted

    def at_scales(log_scales: Sequence[float]) -> Dict[str, int]:
        """The widths when the sites of `groups[i]` have their σ² scaled by e^log_scales[i]."""
        # Only the chosen estimator is fitted here: `decide_widths` also fits every other one for its reports.
        widths: Dict[str, int] = {}
        for group, log_scale in zip(groups, log_scales):
            kwargs = dataclasses.replace(config, sigma2_scale=config.sigma2_scale * math.exp(log_scale))
            ranks = {s.name: fit_spectrum(spectra[s.name].eigenvalues, spectra[s.name].n_samples, warn=False,
                                          **kwargs.estimator_kwargs()).rank for s in group}
            widths.update(widths_for_ranks(adapter, model, group, ranks, config)[1])
        return worth_cutting(adapter.joint_widths(model, sites, widths))

    def at_scale(log_scale: float) -> Dict[str, int]:
        return at_scales([log_scale] * len(groups))

    def uniform(share: float) -> Dict[str, int]:
        ranks = {s.name: max(1, int(round(share * s.dim))) for s in sites}
        widths: Dict[str, int] = {}
        for group in groups:
            widths.update(widths_for_ranks(adapter, model, group, ranks, config)[1])
        return worth_cutting(adapter.joint_widths(model, sites, widths))

    narrowest = uniform(0.0)
    if count(narrowest) > target:
        raise ValueError(
            f"Even cutting every site of {', '.join(sorted({s.kind for s in sites}))} to `min_width` leaves "
            f"{count(narrowest):,} of {original:,} parameters, more than `target_reduction={target_reduction}` allows "
            f"({target:,}); cut more kinds of site (`sites`, e.g. add 'hidden') or ask for less."
        )
    low, high = -12.0, 12.0  # σ² scaled by e^±12: from keeping every direction to keeping none
    if count(at_scale(high)) > target:
        raise ValueError(
            f"`{config.estimator}` keeps too much of some site even with σ² scaled by e^12 to meet "
            f"`target_reduction={target_reduction}`; use another estimator or ask for less."
        )
    if count(at_scale(low)) <= target:
        log_scale = low
    else:
        log_scale = _bisect(lambda x: count(at_scale(x)) <= target, low, high, 32)
    # Give back the slack: a coarse kind (a decoder's heads move in steps of a ninth of its attention) can drop
    # the count well below the target at the scale where it first meets it. Each stage's group in turn gets the
    # smallest scale of its own (the most width) that still meets the target, the others held.
    log_scales = [log_scale] * len(groups)
    for index in range(len(groups)):
        def with_group(x: float, index: int = index) -> Dict[str, int]:
            return at_scales(log_scales[:index] + [x] + log_scales[index + 1:])

        if count(with_group(low)) <= target:
            log_scales[index] = low
        else:
            log_scales[index] = _bisect(lambda x: count(with_group(x)) <= target, low, log_scales[index], 32)
    widths = at_scales(log_scales)
    share = _bisect(lambda x: count(uniform(1.0 - x)) <= target, 0.0, 1.0, 24)
    uniform_widths = uniform(1.0 - share)
    return Allocation(
        scale=math.exp(log_scale), group_scales=[math.exp(x) for x in log_scales], widths=widths,
        parameters=count(widths), original_parameters=original,
        target_parameters=target, uniform_widths=uniform_widths, uniform_share=1.0 - share,
    )
