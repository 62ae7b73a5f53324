"""Marchenko–Pastur law and the five rules that split a second-moment spectrum into noise bulk and kept directions.

Conventions (used everywhere in the package): `eigenvalues` are those of the uncentred second moment
Σ = (1/n) X Xᵀ of `n_samples` samples of width `dim`, sorted descending; `q = dim / n_samples`; under the null
X has i.i.d. entries of variance `sigma2`, so the spectrum follows the Marchenko–Pastur (MP) law with ratio q and
scale σ², whose bulk ends at `edge` = σ²(1 + √q)². When q > 1, Σ has rank at most n: its d − n smallest
eigenvalues are structural zeros (the atom of mass 1 − 1/q of the law) and every estimator works on the n others.

This module is numpy/scipy only, so it can be used (and tested) without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
from scipy import optimize, stats
from transformers.utils import logging

from .configuration import ESTIMATORS  # the one definition, importable without scipy (the CLI's `choices`)


logger = logging.get_logger(__name__)

__all__ = [
    "ESTIMATORS",
    "HEAVY_TAIL_KS",
    "SpectrumFit",
    "fit_spectrum",
    "gavish_donoho_coefficient",
    "gavish_donoho_omega",
    "marchenko_pastur_cdf",
    "marchenko_pastur_edges",
    "marchenko_pastur_median",
    "marchenko_pastur_pdf",
    "round_width",
]

# A fit whose bulk is further than this (Kolmogorov–Smirnov) from the fitted MP law is flagged as heavy-tailed.
# MP eigenvalues are rigid (they fluctuate by O(1/d) around their quantiles, far less than i.i.d. draws): on pure
# noise with d ≥ 100 every estimator here stayed below 0.05 (40 seeds, q from 0.1 to 2), while on MiniLM
# activations (DESIGN §1: a continuum, top eigenvalue 60-3,300x the median) every estimator scored above 0.45.
HEAVY_TAIL_KS = 0.15
# For a small bulk the KS distance is coarse (steps of 1/m): there the bar is the 5% critical value of the
# i.i.d. KS test, 1.36/√m, which rigid MP eigenvalues exceed even less often.
_KS_CRITICAL_5PCT = 1.36

# Chiani (2014), "Distribution of the largest eigenvalue for real Wishart and Gaussian random matrices and a
# simple approximation for the Tracy–Widom distribution", J. Multivariate Anal. 129: TW1 ≈ Γ(k, θ) − α. Its upper
# 0.5% point is 2.408 against 2.422 tabulated for the exact law, so a test at level 0.005 is slightly liberal.
_TW1_GAMMA_SHAPE = 46.446
_TW1_GAMMA_SCALE = 0.186054
_TW1_GAMMA_SHIFT = 9.84801

# `paper` fit: the histogram spans [0, 2 λ₊(σ₀²)], and σ² is searched in [σ₀²/10, 10 σ₀²].
_PAPER_DOMAIN_FACTOR = 2.0
_PAPER_BOUND_FACTOR = 10.0
_PAPER_GRID_POINTS = 65


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
    return float(value)


def _check_open_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value}.")
    return float(value)


def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"`beta` must be a real number, got {type(beta).__name__}.")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta` must be in (0, 1] (use min(d, n) / max(d, n)), got {beta}.")
    return float(beta)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value}.")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# The Marchenko–Pastur law
# ---------------------------------------------------------------------------------------------------------------


def marchenko_pastur_edges(q: float, sigma2: float = 1.0) -> Tuple[float, float]:
    """Edges λ± = σ²(1 ± √q)² of the MP bulk (Marchenko & Pastur 1967; RMT-KD arXiv:2509.15724, §II).

    Args:
        q (`float`): aspect ratio d / n, > 0.
        sigma2 (`float`, *optional*, defaults to 1.0): noise variance σ².

    Returns:
        `Tuple[float, float]`: (lower, upper). For q > 1 these bound the continuous part; the atom sits at 0.

    Example:
        >>> marchenko_pastur_edges(0.25)
        (0.25, 2.25)
    """
    q = _check_positive("q", q)
    sigma2 = _check_positive("sigma2", sigma2)
    root = math.sqrt(q)
    return sigma2 * (1.0 - root) ** 2, sigma2 * (1.0 + root) ** 2


def marchenko_pastur_pdf(x: Any, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of the continuous part of the MP law, ρ(x) = √((λ₊ − x)(x − λ₋)) / (2π σ² q x) on [λ₋, λ₊].

    For q ≤ 1 it integrates to 1. For q > 1 it integrates to 1/q: the law also has an atom of mass 1 − 1/q at 0
    (the d − n structural zero eigenvalues of a rank-n second moment), which a density cannot carry and which
    `marchenko_pastur_cdf` includes. At q = 1 the density diverges like x^(-1/2) at 0; x ≤ 0 gives 0.

    Args:
        x (`array-like`): points at which to evaluate.
        q (`float`): aspect ratio d / n, > 0.
        sigma2 (`float`, *optional*, defaults to 1.0): noise variance σ².

    Returns:
        `np.ndarray` of float64 with the shape of `x`.

    Example:
        >>> float(marchenko_pastur_pdf(1.0, 1.0))  # √3 / (2π)
        0.27566444771089604
    """
    lower, upper = marchenko_pastur_edges(q, sigma2)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > 0) & (x >= lower) & (x <= upper)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.sqrt(np.clip((upper - x) * (x - lower), 0.0, None)) / (2.0 * math.pi * sigma2 * q * x)
    return np.where(inside, density, 0.0)


def _continuous_cdf(x: np.ndarray, q: float) -> np.ndarray:
    """∫ρ from λ₋ to x for the unit-variance law (total mass min(1, 1/q)), in closed form.

    With a = λ₋, b = λ₊ and r(t) = √((b − t)(t − a)), an antiderivative of r(t)/t is
    G(t) = r + (a + b)/2 · arcsin((2t − a − b)/(b − a)) − √(ab) · arcsin(((a + b)t − 2ab)/((b − a)t))
    (differentiate to check); G(b) − G(a) = 2π min(1, q), so F(b) = min(1, 1/q). Both arcsines are evaluated as
    arctan2(numerator, √(denominator² − numerator²)), where the square roots factor exactly into 2r and 2√(ab)·r:
    a plain arcsin loses half of the digits (errors ~1e-8) where its argument nears ±1, i.e. at the edges.
    """
    root = math.sqrt(q)
    a, b = (1.0 - root) ** 2, (1.0 + root) ** 2
    total = min(1.0, 1.0 / q)
    sqrt_ab = abs(1.0 - q)  # √(ab) = |1 − q|

    def antiderivative(t: np.ndarray) -> np.ndarray:
        r = np.sqrt(np.clip((b - t) * (t - a), 0.0, None))
        return (
            r
            + 0.5 * (a + b) * np.arctan2(2.0 * t - a - b, 2.0 * r)
            - sqrt_ab * np.arctan2((a + b) * t - 2.0 * a * b, 2.0 * sqrt_ab * r)
        )

    x = np.asarray(x, dtype=np.float64)
    # G(a) = −π(a + b)/4 + π√(ab)/2: both arcsines are −π/2 there.
    cdf = (antiderivative(np.clip(x, a, b)) + 0.25 * math.pi * (a + b) - 0.5 * math.pi * sqrt_ab) / (2.0 * math.pi * q)
    cdf = np.clip(cdf, 0.0, total)
    return np.where(x <= a, 0.0, np.where(x >= b, total, cdf))


def _nonzero_cdf(x: np.ndarray, q: float, sigma2: float) -> np.ndarray:
    """CDF of the law restricted to its continuous part (the non-zero eigenvalues), renormalised to mass 1."""
    return _continuous_cdf(np.asarray(x, dtype=np.float64) / sigma2, q) * max(1.0, q)


def marchenko_pastur_cdf(x: Any, q: float, sigma2: float = 1.0) -> np.ndarray:
    """Cumulative distribution function of the MP law, atom included (closed form, see `_continuous_cdf`).

    F(x) = (1 − 1/q)·1[x ≥ 0] + ∫_{λ₋}^{x} ρ for q > 1, and ∫_{λ₋}^{x} ρ for q ≤ 1; it reaches 1 at λ₊.

    Args:
        x (`array-like`): points at which to evaluate.
        q (`float`): aspect ratio d / n, > 0.
        sigma2 (`float`, *optional*, defaults to 1.0): noise variance σ².

    Returns:
        `np.ndarray` of float64 with the shape of `x`, non-decreasing in `x`.

    Example:
        >>> float(marchenko_pastur_cdf(0.0, 2.0))  # the atom at 0 holds half of the mass
        0.5
    """
    q = _check_positive("q", q)
    sigma2 = _check_positive("sigma2", sigma2)
    x = np.asarray(x, dtype=np.float64)
    atom = np.where(x >= 0, max(0.0, 1.0 - 1.0 / q), 0.0)
    return atom + _continuous_cdf(x / sigma2, q)


def marchenko_pastur_median(q: float) -> float:
    """Median μ_q of the unit-variance MP law's continuous part (the law of the non-zero eigenvalues).

    For q ≤ 1 this is the median of the law (0.98 at q = 0.05, 0.83 at q = 0.5, 0.65 at q = 1), the factor by
    which the median eigenvalue underestimates σ². For q > 1 the atom at 0 holds 1 − 1/q of the mass (the median of
    the full law is 0 once q ≥ 2), so the median returned is that of the n non-zero eigenvalues, i.e. the point
    where the continuous part reaches half of its mass 1/q; it equals q·μ_{1/q}, because the non-zero eigenvalues of
    (1/n)XXᵀ are those of (1/n)XᵀX = q·(1/d)XᵀX. Solved with Brent's method on the closed-form CDF.

    Args:
        q (`float`): aspect ratio d / n, > 0.

    Returns:
        `float`: μ_q.

    Example:
        >>> round(marchenko_pastur_median(1.0), 4)
        0.6528
    """
    lower, upper = marchenko_pastur_edges(q)
    half = 0.5 * min(1.0, 1.0 / q)
    return float(optimize.brentq(lambda x: float(_continuous_cdf(x, q)) - half, lower, upper, xtol=1e-14, rtol=1e-14))


# ---------------------------------------------------------------------------------------------------------------
# Gavish–Donoho optimal hard threshold
# ---------------------------------------------------------------------------------------------------------------


def gavish_donoho_coefficient(beta: float) -> float:
    """Optimal hard-threshold coefficient for known noise, λ*(β) = √(2(β+1) + 8β / ((β+1) + √(β² + 14β + 1))).

    Gavish & Donoho (2014), "The optimal hard threshold for singular values is 4/√3", IEEE Trans. Inf. Theory
    60(8), 5040-5053. For an m×N matrix Y = X + σZ (β = m/N ≤ 1) keep singular values above λ*(β)·√N·σ.
    For the eigenvalues of (1/n)XXᵀ with X of shape d×n this becomes λ > λ*(β)² σ² max(1, q), with
    β = min(d, n)/max(d, n): the singular value s of X maps to s²/n, and N = max(d, n).

    Args:
        beta (`float`): aspect ratio min(d, n) / max(d, n), in (0, 1].

    Returns:
        `float`: λ*(β); λ*(1) = 4/√3.

    Example:
        >>> round(gavish_donoho_coefficient(1.0), 6)
        2.309401
    """
    beta = _check_beta(beta)
    return math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta**2 + 14.0 * beta + 1.0)))


def gavish_donoho_omega(beta: float) -> float:
    """Unknown-noise coefficient ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014).

    The threshold on singular values is ω(β)·y_med with y_med the median singular value; exactly
    ω(β) = λ*(β)/√μ_β with μ_β the MP median, which this cubic approximates to about 0.02 on [0.1, 1]. The
    `gavish-donoho` estimator uses the exact form (σ² from the MP median, then λ*(β)); this one is for reports and
    comparisons with other implementations.

    Args:
        beta (`float`): aspect ratio min(d, n) / max(d, n), in (0, 1].

    Returns:
        `float`: ω(β).

    Example:
        >>> round(gavish_donoho_omega(1.0), 2)
        2.86
    """
    beta = _check_beta(beta)
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


# ---------------------------------------------------------------------------------------------------------------
# The fit result
# ---------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Turn numpy scalars/arrays and tuples into JSON-serialisable Python types."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


@dataclass
class SpectrumFit:
    """What one estimator concluded about one spectrum: the noise level, the bulk, the kept directions.

    Attributes:
        estimator (`str`): one of `ESTIMATORS`.
        dim (`int`): d, the width of the site.
        n_samples (`int`): n, the samples behind the second moment.
        q (`float`): d / n.
        sigma2 (`float`): the noise variance σ² used (the estimate times `scale`).
        edge (`float`): upper bulk edge λ₊ = σ²(1 + √q)².
        lower_edge (`float`): lower bulk edge λ₋ = σ²(1 − √q)².
        rank (`int`): k, the number of kept directions (the k largest eigenvalues).
        threshold (`float`): the cut actually used. `edge` for `paper` and `mp-median`, λ*(β)² σ² max(1, q) for
            `gavish-donoho`, the critical value of the last test run for `kritchman-nadler` (the one that failed,
            unless all rejected), and the bulk edge predicted from the bandwidth at the stopping rank for `mppca`.
            For the last two the rank counts sequential steps, which is #{λ > threshold} on ordinary spectra.
        ks_distance (`float`): Kolmogorov–Smirnov distance between the live eigenvalues ≤ `edge` and the MP law
            with this σ²; 1.0 when no eigenvalue lies in the bulk.
        spike_strengths (`np.ndarray`): ℓ̂ per kept direction (population eigenvalue σ²(1 + ℓ)), see
            `_spike_strengths`.
        eigenvector_overlaps (`np.ndarray`): predicted |⟨u, û⟩|² per kept direction.
        heavy_tailed (`bool`): the bulk is far from MP (see `HEAVY_TAIL_KS`), so the MP null is a weak model.
        params (`Dict[str, Any]`): the estimator's parameters and intermediate values (e.g. quantile, bins).
    """

    estimator: str
    dim: int
    n_samples: int
    q: float
    sigma2: float
    edge: float
    lower_edge: float
    rank: int
    threshold: float
    ks_distance: float
    spike_strengths: np.ndarray
    eigenvector_overlaps: np.ndarray
    heavy_tailed: bool
    params: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python (JSON-serialisable) view of the fit; arrays become lists."""
        return {
            "estimator": self.estimator,
            "dim": int(self.dim),
            "n_samples": int(self.n_samples),
            "q": float(self.q),
            "sigma2": float(self.sigma2),
            "edge": float(self.edge),
            "lower_edge": float(self.lower_edge),
            "rank": int(self.rank),
            "threshold": float(self.threshold),
            "ks_distance": float(self.ks_distance),
            "spike_strengths": [float(v) for v in self.spike_strengths],
            "eigenvector_overlaps": [float(v) for v in self.eigenvector_overlaps],
            "heavy_tailed": bool(self.heavy_tailed),
            "params": _plain(self.params),
        }


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics shared by every estimator
# ---------------------------------------------------------------------------------------------------------------


def _spike_strengths(eigenvalues: np.ndarray, q: float, sigma2: float) -> np.ndarray:
    """Invert the spiked-model map x = (1 + ℓ)(1 + q/ℓ) (Baik & Silverstein 2006, J. Multivariate Anal. 97; Paul
    2007, Statistica Sinica 17).

    With x = λ/σ², ℓ̂ = [(x − 1 − q) + √((x − 1 − q)² − 4q)]/2. The root is real only above the edge
    x > (1 + √q)²; a kept eigenvalue at or below it (possible for `kritchman-nadler` and `mppca`, which do not cut at
    the edge) carries no information on ℓ beyond ℓ ≤ √q, the BBP threshold, which is what is reported.
    """
    x = eigenvalues / sigma2
    b = x - 1.0 - q
    above = x > (1.0 + math.sqrt(q)) ** 2
    discriminant = np.where(above, b * b - 4.0 * q, 0.0)
    return np.where(above, 0.5 * (b + np.sqrt(np.clip(discriminant, 0.0, None))), math.sqrt(q))


def _eigenvector_overlaps(strengths: np.ndarray, q: float) -> np.ndarray:
    """Limit of |⟨u, û⟩|² = (1 − q/ℓ²)/(1 + q/ℓ) above the BBP threshold ℓ > √q (Paul 2007; Benaych-Georges &
    Nadakuditi 2011, Adv. Math. 227)."""
    return np.clip((1.0 - q / strengths**2) / (1.0 + q / strengths), 0.0, 1.0)


def _ks_distance(bulk: np.ndarray, q: float, sigma2: float) -> float:
    """Two-sided KS distance between `bulk` (live eigenvalues ≤ λ₊) and the MP law of the non-zero eigenvalues.

    The law's continuous part lies in [λ₋, λ₊], so restricting the sample to ≤ λ₊ only renormalises away the
    atom (q > 1); spikes above the edge are left out because they are not noise.
    """
    if bulk.size == 0:
        return 1.0
    sample = np.sort(bulk)
    cdf = _nonzero_cdf(sample, q, sigma2)
    m = sample.size
    upper = np.arange(1, m + 1) / m - cdf
    lower = cdf - np.arange(0, m) / m
    return float(max(upper.max(), lower.max()))


# ---------------------------------------------------------------------------------------------------------------
# The five noise estimators. Each takes the live eigenvalues (descending; see `fit_spectrum`) and returns σ²
# (scale applied), the rank, the threshold and the parameters to report.
# ---------------------------------------------------------------------------------------------------------------


def _paper_fit(
    live: np.ndarray, q: float, quantile: float, bins: Optional[int], scale: float
) -> Tuple[float, int, float, Dict[str, Any]]:
    """RMT-KD (arXiv:2509.15724, §II): start at a quantile, refine σ² by an ℓ2 histogram fit, keep λ > λ₊.

    Details the paper leaves open, chosen here:
    - σ₀² is the `quantile` of the live eigenvalues (structural and dead zeros left out, see `fit_spectrum`).
    - The histogram covers the fixed domain [0, 2 λ₊(σ₀²)] with `bins` equal bins (default: √m clipped to
      [10, 100], m = number of live eigenvalues) and is normalised by m (spikes count in m, so the bulk's mass is
      (m − k)/m). The domain holds the whole MP bulk whenever σ₀² ≥ σ²/2, true of the median start (μ_q ≥ 0.65,
      and q·μ_{1/q} ≥ 0.65 for q > 1), and leaves out spikes far above the edge. A higher quantile widens the
      domain, so more of the spectrum is explained as noise and fewer directions are kept: the paper's τ.
    - The distance is Σ_i w_i (h_i − P_i(σ²)/w_i)², with P_i the MP mass of bin i from the closed-form CDF (so the
      integrable singularity at q = 1 is handled): the ℓ2 distance between the histogram and the bin-averaged
      density. For q > 1 the law is that of the non-zero eigenvalues (continuous part × q).
    - σ² is refined locally, as "initialised ... and refined" says, within [σ₀²/10, 10 σ₀²]: on a log grid of 65
      points centred on σ₀², walk downhill from σ₀² to the first local minimum, then polish it with
      `scipy.optimize.minimize_scalar(method="bounded")` in log σ² between that point's neighbours. On spectra that
      are not MP the objective has several minima; a global search jumps between them as τ moves (measured on
      MiniLM activations: the kept rank was not monotone in τ), the local one keeps τ's meaning.
    """
    sigma2_init = float(np.quantile(live, quantile))
    m = live.size
    n_bins = int(np.clip(round(math.sqrt(m)), 10, 100)) if bins is None else bins
    domain = (0.0, _PAPER_DOMAIN_FACTOR * sigma2_init * (1.0 + math.sqrt(q)) ** 2)
    counts, bin_edges = np.histogram(live, bins=n_bins, range=domain)
    widths = np.diff(bin_edges)
    density = counts / (m * widths)

    def distance(log_sigma2: float) -> float:
        mass = np.diff(_nonzero_cdf(bin_edges, q, math.exp(log_sigma2)))
        return float(np.sum(widths * (density - mass / widths) ** 2))

    bounds = (sigma2_init / _PAPER_BOUND_FACTOR, sigma2_init * _PAPER_BOUND_FACTOR)
    grid = np.linspace(math.log(bounds[0]), math.log(bounds[1]), _PAPER_GRID_POINTS)
    values = np.array([distance(point) for point in grid])
    best = _PAPER_GRID_POINTS // 2  # the grid is symmetric in log σ², so this point is σ₀²
    while True:
        neighbours = [i for i in (best - 1, best + 1) if 0 <= i < grid.size and values[i] < values[best]]
        if not neighbours:
            break
        best = min(neighbours, key=lambda i: values[i])
    bracket = (grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)])
    result = optimize.minimize_scalar(distance, bounds=bracket, method="bounded", options={"xatol": 1e-6})
    if result.fun <= values[best]:
        log_sigma2, l2_distance = float(result.x), float(result.fun)
    else:
        log_sigma2, l2_distance = float(grid[best]), float(values[best])
    sigma2 = math.exp(log_sigma2) * scale
    edge = sigma2 * (1.0 + math.sqrt(q)) ** 2
    params = {
        "quantile": quantile,
        "sigma2_init": sigma2_init,
        "bins": n_bins,
        "histogram_range": list(domain),
        "sigma2_bounds": list(bounds),
        "l2_distance": l2_distance,
        "scale": scale,
    }
    return sigma2, int(np.sum(live > edge)), edge, params


def _median_sigma2(live: np.ndarray, q: float) -> Tuple[float, float]:
    """σ² = median(live λ)/μ_q: the median is robust to a few spikes, μ_q removes its bias (DESIGN §1 (2))."""
    median_mp = marchenko_pastur_median(q)
    return float(np.median(live)) / median_mp, median_mp


def _mp_median_fit(live: np.ndarray, q: float, scale: float) -> Tuple[float, int, float, Dict[str, Any]]:
    """Debiased median: σ² = median(λ)/μ_q, keep λ > σ²(1 + √q)².

    For q > 1 the median is taken over the n non-zero eigenvalues and μ_q is the median of the law's continuous
    part (see `marchenko_pastur_median`), so both sides describe the same population.
    """
    raw, median_mp = _median_sigma2(live, q)
    sigma2 = raw * scale
    edge = sigma2 * (1.0 + math.sqrt(q)) ** 2
    return sigma2, int(np.sum(live > edge)), edge, {"median_mp": median_mp, "scale": scale}


def _gavish_donoho_fit(live: np.ndarray, q: float, scale: float) -> Tuple[float, int, float, Dict[str, Any]]:
    """Gavish & Donoho (2014): keep λ > λ*(β)² σ² max(1, q), σ² from the debiased median.

    With σ² from the MP median this is their unknown-noise rule ω(β)·y_med with the exact ω = λ*/√μ_β; the cubic
    `gavish_donoho_omega` is not used. The threshold sits above the edge (λ*(β) > 1 + √β), so it
    keeps only spikes strong enough that keeping them lowers the mean squared error.
    """
    raw, median_mp = _median_sigma2(live, q)
    sigma2 = raw * scale
    beta = min(q, 1.0 / q)
    coefficient = gavish_donoho_coefficient(beta)
    threshold = coefficient**2 * sigma2 * max(1.0, q)
    params = {"beta": beta, "coefficient": coefficient, "median_mp": median_mp, "scale": scale}
    return sigma2, int(np.sum(live > threshold)), threshold, params


def _tracy_widom_quantile(alpha: float) -> float:
    """Upper-α quantile of TW1 from Chiani's (2014) gamma approximation TW1 ≈ Γ(46.446, 0.186054) − 9.84801."""
    return float(stats.gamma.ppf(1.0 - alpha, _TW1_GAMMA_SHAPE, scale=_TW1_GAMMA_SCALE)) - _TW1_GAMMA_SHIFT


def _kritchman_nadler_noise(live: np.ndarray, n: int, p: int, k: int) -> float:
    """Kritchman & Nadler noise variance assuming k signals (the consistent fixed point of KN 2008/2009).

    The trace is preserved: σ² = [Σ_{j>k} λ_j + Σ_{j≤k}(λ_j − ρ_j)]/(p − k), where ρ_j, the population eigenvalue
    behind λ_j, solves ρ² − ρ(λ_j + σ² − σ²(p − k)/n) + λ_j σ² = 0 (the spiked-model map). Started at the mean of the
    p − k smallest eigenvalues inflated by 1/(1 − k/n); the iteration stops when σ² moves by < 1e-8 relative or when
    the quadratic has no real root (then the last σ² is kept, as in the authors' code). Zeros add nothing to the
    sums, so only the live eigenvalues are passed, with p the dimension they live in.
    """
    tail = float(live[k:].sum())
    signal = live[:k]
    sigma2 = tail / (p - k) / (1.0 - k / n)
    for _ in range(100):
        b = signal + sigma2 - sigma2 * (p - k) / n
        discriminant = b * b - 4.0 * signal * sigma2
        if np.any(discriminant < 0):
            break
        rho = 0.5 * (b + np.sqrt(discriminant))
        updated = (tail + float(np.sum(np.maximum(signal - rho, 0.0)))) / (p - k)
        converged = abs(updated - sigma2) <= 1e-8 * sigma2
        sigma2 = updated
        if converged:
            break
    return sigma2


def _kritchman_nadler_fit(
    live: np.ndarray, n: int, p: int, alpha: float, scale: float
) -> Tuple[float, int, float, Dict[str, Any]]:
    """Kritchman & Nadler: sequential Tracy–Widom tests, "is λ_k a signal?" for k = 1, 2, ...

    KN 2008, Chemometr. Intell. Lab. Syst. 94, 19-32; KN 2009, IEEE Trans. Signal Process. 57(10), 3930-3941.
    Step k rejects "fewer than k signals" when n λ_k > σ̂²(k) (μ_{n,p−k} + s(α) σ_{n,p−k}), as in the authors'
    `KN_rankEst`, with σ̂²(k) from `_kritchman_nadler_noise`, s(α) the upper-α TW1 quantile
    (`_tracy_widom_quantile`), and Johnstone's (2001, Ann. Stat. 29) centring and scaling of the largest Wishart
    eigenvalue in the n − ½, p − ½ form of the authors' code:
    μ_{n,p} = (√(n − ½) + √(p − ½))², σ_{n,p} = √μ_{n,p} (1/√(n − ½) + 1/√(p − ½))^{1/3}. The rank is the number
    of consecutive rejections, at most (number of live eigenvalues) − 1, which is min(d, n) − 1 in the paper; σ² is
    σ̂²(k) at that rank, or trace/p when k = 0. Each test has false-alarm probability ≈ α. p is d, less the dead
    directions (zeros that are not structural): they hold no noise, and counting them in p would bias σ̂² low by
    their share, as the estimate divides the trace by p − k. On a spectrum that is not noise plus a few spikes, with
    large n, every test rejects: KN then keeps all directions but one.
    """
    s_alpha = _tracy_widom_quantile(alpha)
    noise = {0: float(live.sum()) / p}
    rank, critical = 0, math.nan
    for k in range(1, live.size):
        noise[k] = _kritchman_nadler_noise(live, n, p, k)
        mu = (math.sqrt(n - 0.5) + math.sqrt(p - k - 0.5)) ** 2
        sigma_tw = math.sqrt(mu) * (1.0 / math.sqrt(n - 0.5) + 1.0 / math.sqrt(p - k - 0.5)) ** (1.0 / 3.0)
        critical = scale * noise[k] * (mu + s_alpha * sigma_tw) / n
        if live[k - 1] <= critical:
            break
        rank = k
    sigma2 = noise[rank] * scale
    if math.isnan(critical):  # a single live eigenvalue: no test can run, nothing is kept
        critical = float(live[0])
    return sigma2, rank, critical, {"alpha": alpha, "tracy_widom_quantile": s_alpha, "scale": scale}


def _mppca_fit(live: np.ndarray, dim: int, n: int, scale: float) -> Tuple[float, int, float, Dict[str, Any]]:
    """Veraart et al. (2016), "Denoising of diffusion MRI using random matrix theory", NeuroImage 142, 394-406.

    With M = min(d, n) non-zero (live) eigenvalues, N = max(d, n) and p candidate signals, the M − p smallest
    eigenvalues are taken as an MP bulk of ratio γ_p = (M − p)/N. Two estimates of its σ² must then agree: the
    mean of those eigenvalues, and their spread (λ_{p+1} − λ_M)/(4√γ_p), since the MP bandwidth λ₊ − λ₋ is 4√γ σ².
    The rank is the smallest p with λ_{p+1} − λ_M < 4 √γ_p · mean(λ_{p+1..M}) (dipy's `_pca_classifier` reads the
    same way). Normalisation: the rule is homogeneous in λ, so eigenvalues of (1/n)XXᵀ, XXᵀ or (1/d)XᵀX give the
    same p; with N = max(d, n) it reads the same in both orientations. The non-zero eigenvalues of (1/n)XXᵀ have
    mean σ² max(1, q), hence σ² = mean(λ_{p+1..M})/max(1, q). `scale` multiplies the mean in the rule and σ².
    The form (λ_{p+1} − λ_min)(d − p)(n − p) < 4 c_p √(dn), c_p = Σ_{j>p} λ_j, agrees with this only at p = 0.
    """
    m = live.size
    tail_sums = np.cumsum(live[::-1])[::-1]  # tail_sums[p] = Σ_{j ≥ p} λ_j (0-based)
    remaining = m - np.arange(m)
    means = tail_sums / remaining
    gammas = remaining / max(dim, n)
    cuts = live[-1] + 4.0 * np.sqrt(gammas) * scale * means
    rank = int(np.argmax(live < cuts))  # the last entry is always True, as λ_M > 0: λ_M < λ_M + 4√γ·mean
    sigma2 = float(means[rank]) * scale / max(1.0, dim / n)
    return sigma2, rank, float(cuts[rank]), {"gamma": float(gammas[rank]), "scale": scale}


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _eigenvalues_from_input(eigenvalues_or_matrix: Any) -> Tuple[np.ndarray, float]:
    """Validate the input; return its eigenvalues (descending, round-off negatives clipped to 0) and the size below
    which an eigenvalue is zero up to round-off (d·eps·max|λ|, the `numpy.linalg.matrix_rank` convention)."""
    array = np.asarray(eigenvalues_or_matrix)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(
            f"`eigenvalues_or_matrix` must hold real numbers, got dtype {array.dtype}; pass a float array."
        )
    # Round-off of the input's own precision. Negatives are rejected only beyond √eps relative (1.5e-8 for float64,
    # 3.5e-4 for float32), a lenient bar for matrices accumulated in low precision.
    eps = float(np.finfo(array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64).eps)
    tolerance = math.sqrt(eps)
    values = array.astype(np.float64)
    if values.ndim not in (1, 2) or (values.ndim == 2 and values.shape[0] != values.shape[1]):
        raise ValueError(
            "`eigenvalues_or_matrix` must be a 1-D array of eigenvalues or a square 2-D second-moment matrix, "
            f"got shape {tuple(values.shape)}."
        )
    if values.size == 0:
        raise ValueError(f"`eigenvalues_or_matrix` is empty (shape {tuple(values.shape)}); a site needs d >= 1.")
    if not np.all(np.isfinite(values)):
        raise ValueError("`eigenvalues_or_matrix` contains NaN or inf values; check the calibration statistics.")
    magnitude = float(np.max(np.abs(values)))
    if values.ndim == 2:
        asymmetry = float(np.max(np.abs(values - values.T)))
        if asymmetry > tolerance * magnitude:
            raise ValueError(
                f"`eigenvalues_or_matrix` must be a symmetric matrix, got max |A - A.T| = {asymmetry:.3g} "
                f"(max |A| = {magnitude:.3g}); pass (A + A.T) / 2 if the asymmetry is round-off."
            )
        values = np.linalg.eigvalsh(0.5 * (values + values.T))
        magnitude = float(np.max(np.abs(values)))
    smallest = float(values.min())
    if smallest < -tolerance * magnitude:
        raise ValueError(
            f"`eigenvalues_or_matrix` must be positive semi-definite, got an eigenvalue {smallest:.6g} (largest "
            f"magnitude {magnitude:.6g}); a second moment (1/n) Σ x xᵀ has none below round-off."
        )
    return np.sort(np.clip(values, 0.0, None))[::-1], values.shape[0] * eps * magnitude


def fit_spectrum(
    eigenvalues_or_matrix: Any,
    n_samples: int,
    estimator: str = "paper",
    *,
    quantile: float = 0.5,
    alpha: float = 0.005,
    bins: Optional[int] = None,
    scale: float = 1.0,
    warn: bool = True,
) -> SpectrumFit:
    """Estimate the noise level of a second-moment spectrum and how many directions stand above its MP bulk.

    Args:
        eigenvalues_or_matrix (`array-like`): the d eigenvalues of Σ = (1/n) Σ x xᵀ (any order), or Σ itself
            (square, symmetric; its eigenvalues are taken with `numpy.linalg.eigvalsh`). Negative eigenvalues
            within round-off of the input's precision (√eps relative) are set to 0.
        n_samples (`int`): n, the number of samples behind Σ (>= 2). It sets q = d/n and hence the edge. For
            q > 1 the d − n smallest eigenvalues are the law's structural zeros and are left out of every fit
            (a warning is logged if they are not zero). So are eigenvalues that are zero up to round-off (d·eps
            relative): dead directions, e.g. a channel a ReLU never opens, carry no variance, neither noise nor
            signal, and are never kept. The remaining eigenvalues are called live below.
        estimator (`str`, *optional*, defaults to `"paper"`): one of `ESTIMATORS`:
            `paper` (quantile start + ℓ2 histogram fit, keep λ > λ₊), `mp-median` (median/μ_q, keep λ > λ₊),
            `gavish-donoho` (optimal hard threshold), `kritchman-nadler` (sequential Tracy–Widom tests),
            `mppca` (Veraart's parameter-free rule). Each private `_<name>_fit` documents its equations.
        quantile (`float`, *optional*, defaults to 0.5): τ in (0, 1), the eigenvalue quantile that starts `paper`;
            higher values keep fewer directions as a rule, though a histogram fit does not guarantee it step by
            step (a search for a target size should move `scale`, which is monotone).
        alpha (`float`, *optional*, defaults to 0.005): level in (0, 1) of each `kritchman-nadler` test.
        bins (`int`, *optional*): histogram bins (>= 2) of the `paper` fit; defaults to √m clipped to [10, 100].
        scale (`float`, *optional*, defaults to 1.0): multiplies the estimated σ² (> 0; for `kritchman-nadler`
            and `mppca`, the noise level inside their rules). The kept rank never grows with it, so a target size
            can be searched by bisection on `scale`.

    Returns:
        `SpectrumFit`. A heavy-tailed bulk (see `HEAVY_TAIL_KS`) is logged as a warning.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((100, 1000))
        >>> x[0] *= 4.0  # one direction with variance 16: ℓ = 15
        >>> fit = fit_spectrum(x @ x.T / 1000, n_samples=1000, estimator="mp-median")
        >>> fit.rank
        1
    """
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {', '.join(ESTIMATORS)}, got {estimator!r}.")
    n = _check_int("n_samples", n_samples, 2)
    quantile = _check_open_unit("quantile", quantile)
    alpha = _check_open_unit("alpha", alpha)
    if bins is not None:
        bins = _check_int("bins", bins, 2)
    scale = _check_positive("scale", scale)
    eigenvalues, zero_tolerance = _eigenvalues_from_input(eigenvalues_or_matrix)

    dim = eigenvalues.size
    q = dim / n
    # A rank-n matrix has d - n zeros; the bar √(d·eps)·λ₁ is lenient so that low-precision zeros pass.
    if dim > n and eigenvalues[n] > math.sqrt(zero_tolerance * eigenvalues[0]):
        logger.warning(
            f"`n_samples`={n} < d={dim} implies at most {n} non-zero eigenvalues, but eigenvalue {n + 1} is "
            f"{eigenvalues[n]:.3g} (largest {eigenvalues[0]:.3g}); check that `n_samples` counts the samples behind Σ."
        )
    live = eigenvalues[: min(dim, n)]
    live = live[live > zero_tolerance]
    if live.size == 0:
        raise ValueError("`eigenvalues_or_matrix` is all zeros; a spectrum needs a positive eigenvalue to be fitted.")

    if estimator == "paper":
        sigma2, rank, threshold, params = _paper_fit(live, q, quantile, bins, scale)
    elif estimator == "mp-median":
        sigma2, rank, threshold, params = _mp_median_fit(live, q, scale)
    elif estimator == "gavish-donoho":
        sigma2, rank, threshold, params = _gavish_donoho_fit(live, q, scale)
    elif estimator == "kritchman-nadler":
        dead = min(dim, n) - live.size
        sigma2, rank, threshold, params = _kritchman_nadler_fit(live, n, dim - dead, alpha, scale)
    else:
        sigma2, rank, threshold, params = _mppca_fit(live, dim, n, scale)

    lower_edge, edge = marchenko_pastur_edges(q, sigma2)
    bulk = live[live <= edge]
    ks = _ks_distance(bulk, q, sigma2)
    ks_limit = max(HEAVY_TAIL_KS, _KS_CRITICAL_5PCT / math.sqrt(max(bulk.size, 1)))
    heavy_tailed = ks > ks_limit
    if heavy_tailed and warn:
        logger.warning(
            f"Estimator `{estimator}` fits the spectrum (d={dim}, n={n}) poorly: the KS distance between its bulk "
            f"and the Marchenko-Pastur law is {ks:.3f} > {ks_limit:.3f}. The spectrum is heavy-tailed, so the kept "
            f"rank {rank} rests on the noise estimate alone; compare the estimators before trusting it."
        )
    strengths = _spike_strengths(eigenvalues[:rank], q, sigma2)
    return SpectrumFit(
        estimator=estimator,
        dim=dim,
        n_samples=n,
        q=q,
        sigma2=sigma2,
        edge=edge,
        lower_edge=lower_edge,
        rank=rank,
        threshold=float(threshold),
        ks_distance=ks,
        spike_strengths=strengths,
        eigenvector_overlaps=_eigenvector_overlaps(strengths, q),
        heavy_tailed=bool(heavy_tailed),
        params=params,
    )


def round_width(
    rank: int, dim: int, multiple: int = 8, num_heads: Optional[int] = None, min_width: int = 1
) -> int:
    """Round a kept rank up to a hardware-friendly width (DESIGN §1, "Hardware-aligned widths").

    The width is the smallest multiple of `multiple` (of lcm(`multiple`, `num_heads`) when `num_heads` is given,
    so that `hidden_size % num_attention_heads == 0` still holds) that is ≥ max(`rank`, `min_width`). Rounding
    never goes above `dim`: when it would, `dim` itself is returned (which is why `dim` must be divisible by
    `num_heads`). A `min_width` above `dim` therefore keeps the whole site.

    Args:
        rank (`int`): k, the number of kept directions, in [0, dim].
        dim (`int`): d, the current width (>= 1).
        multiple (`int`, *optional*, defaults to 8): alignment (>= 1); 16 or 64 suit GPU matrix units.
        num_heads (`int`, *optional*): attention heads the width must stay divisible by.
        min_width (`int`, *optional*, defaults to 1): floor of the result (>= 1), so no site vanishes.

    Returns:
        `int`: the width, in [1, dim].

    Example:
        >>> round_width(37, 384), round_width(37, 384, num_heads=12), round_width(380, 384)
        (40, 48, 384)
    """
    dim = _check_int("dim", dim, 1)
    rank = _check_int("rank", rank, 0)
    if rank > dim:
        raise ValueError(f"`rank` must be <= `dim` ({dim}), got {rank}.")
    multiple = _check_int("multiple", multiple, 1)
    min_width = _check_int("min_width", min_width, 1)
    step = multiple
    if num_heads is not None:
        num_heads = _check_int("num_heads", num_heads, 1)
        if dim % num_heads:
            raise ValueError(
                f"`dim` ({dim}) must be divisible by `num_heads`, got num_heads={num_heads}; a width shared by "
                "attention heads is a multiple of the head count."
            )
        step = math.lcm(multiple, num_heads)
    width = -(-max(rank, min_width) // step) * step
    return min(width, dim)
