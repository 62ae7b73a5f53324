"""Per-site spectral reports (`rmtkd_report.json`) and PNG plots of each spectrum with its fitted MP law."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .rmt import ESTIMATORS, SpectrumFit, fit_spectrum, marchenko_pastur_pdf

REPORT_NAME = "rmtkd_report.json"
PLOTS_DIR = "spectra"


@dataclass
class SiteReport:
    """What the spectral rule decided for one site, with the diagnostics a user needs to trust it."""

    name: str
    kind: str
    layer: Optional[int]
    original_width: int
    rank: int
    kept_width: int
    estimator: str
    sigma2: float
    edge: float
    q: float
    n_samples: int
    ks_distance: float
    heavy_tailed: bool
    ranks_by_estimator: Dict[str, int]
    eigenvalues: List[float] = field(repr=False)
    plot: Optional[str] = None
    # Every estimator's noise level and edge beside its rank: they disagree widely on real spectra (DESIGN §1).
    fits_by_estimator: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def build_site_report(site, fit: SpectrumFit, kept_width: int, eigenvalues: np.ndarray) -> SiteReport:
    """Combine a site, its fit and the width actually used; every estimator's rank is added for comparison.

    The comparison fits do not log their own heavy-tail warnings: the chosen estimator's fit already did.
    """
    params = {k: v for k, v in fit.params.items() if k in ("quantile", "alpha", "bins", "scale")}
    fits = {
        name: fit if name == fit.estimator else fit_spectrum(eigenvalues, fit.n_samples, name, warn=False, **params)
        for name in ESTIMATORS
    }
    ranks = {name: int(other.rank) for name, other in fits.items()}
    fits_by_estimator = {
        name: {"sigma2": float(other.sigma2), "edge": float(other.edge), "rank": int(other.rank)}
        for name, other in fits.items()
    }
    return SiteReport(
        name=site.name, kind=site.kind, layer=site.layer, original_width=site.dim, rank=int(fit.rank),
        kept_width=int(kept_width), estimator=fit.estimator, sigma2=float(fit.sigma2), edge=float(fit.edge),
        q=float(fit.q), n_samples=int(fit.n_samples), ks_distance=float(fit.ks_distance),
        heavy_tailed=bool(fit.heavy_tailed), ranks_by_estimator=ranks,
        eigenvalues=[float(v) for v in eigenvalues], fits_by_estimator=fits_by_estimator,
    )


def _plot_name(site_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site_name) + ".png"


def plot_spectrum(site: Dict[str, Any], path: Path) -> None:
    """Two panels: the bulk histogram with the fitted MP density and edge, and the ranked spectrum (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eigenvalues = np.asarray(site["eigenvalues"], dtype=float)
    edge, sigma2, q = site["edge"], site["sigma2"], site["q"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    window = eigenvalues[eigenvalues <= 3 * edge]
    left.hist(window, bins=60, density=True, alpha=0.6, label=f"eigenvalues ≤ 3λ₊ ({window.size} of {eigenvalues.size})")
    grid = np.linspace(max(window.min(initial=0.0), 1e-12), 3 * edge, 400)
    # The histogram is normalised over the window only, so scale the law by the share of eigenvalues it holds.
    left.plot(grid, marchenko_pastur_pdf(grid, q, sigma2) * eigenvalues.size / max(window.size, 1), "r-",
              label=f"MP law, σ²={sigma2:.3g}, q={q:.3g}")
    left.axvline(edge, color="k", linestyle="--", label=f"λ₊={edge:.3g}")
    left.set_xlabel("eigenvalue")
    left.set_ylabel("density")
    left.legend(fontsize=7)
    right.semilogy(np.arange(1, eigenvalues.size + 1), np.clip(eigenvalues, 1e-12, None), ".", markersize=3)
    right.axhline(edge, color="k", linestyle="--")
    right.axvline(site["kept_width"], color="g", linestyle=":", label=f"kept width {site['kept_width']}")
    right.set_xlabel("rank")
    right.set_ylabel("eigenvalue (log)")
    right.legend(fontsize=7)
    fig.suptitle(f"{site['name']}: d={site['original_width']}, n={site['n_samples']}, {site['estimator']} keeps "
                 f"{site['rank']} (KS {site['ks_distance']:.2f}{', heavy-tailed' if site['heavy_tailed'] else ''})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_spectrum_plots(sites: Dict[str, Dict[str, Any]], folder: Path, report: Optional[Dict[str, Any]] = None) -> None:
    """Write `spectra/<site>.png` for every site and record each plot's relative path in `report["sites"]`."""
    out = Path(folder) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, site in sites.items():
        relative = f"{PLOTS_DIR}/{_plot_name(name)}"
        plot_spectrum(site, Path(folder) / relative)
        paths[name] = relative
    if report is not None:
        for site in report["sites"]:
            site["plot"] = paths.get(site["name"])
