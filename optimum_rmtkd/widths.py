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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Tuple

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
