"""MP law facts; each estimator on spiked models with known rank; pure noise; input checks; width rounding."""
import json
import logging
import math
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
from scipy import integrate
from threadpoolctl import threadpool_limits

from optimum_rmtkd.rmt import (
    ESTIMATORS,
    HEAVY_TAIL_KS,
    SpectrumFit,
    _eigenvector_overlaps,
    _spike_strengths,
    fit_spectrum,
    gavish_donoho_coefficient,
    gavish_donoho_omega,
    marchenko_pastur_cdf,
    marchenko_pastur_edges,
    marchenko_pastur_median,
    marchenko_pastur_pdf,
    round_width,
)


# `gavish-donoho` and `kritchman-nadler` cut O(1) above the bulk edge (a fixed gap, or a test at level 0.005), so
# their rank is exact on the models below. `paper`, `mp-median` and `mppca` cut at the estimated edge itself,
# where the largest noise eigenvalue sits within Tracy–Widom fluctuations O(n^{-2/3}) (TW1 has mean -1.21 and
# sd 1.27 in those units, so λ₁ > λ₊ about one time in six even with the true σ², more once σ² is estimated):
# they may keep one or two extra directions.
EXACT_ESTIMATORS = ("gavish-donoho", "kritchman-nadler")
# Extra directions an edge cut may keep: the count of noise eigenvalues above λ₊ is O(1), measured ≤ 1 in 200
# noise matrices (d from 100 to 400, q from 0.1 to 2).
EDGE_SLACK = 2

SHAPES = [(100, 1000), (200, 400), (200, 200), (400, 200)]  # q = 0.1, 0.5, 1, 2


@pytest.fixture(autouse=True)
def one_blas_thread():
    # The matrices here are at most 400 x 800: one BLAS thread is as fast, and immune to a busy machine, where
    # spinning BLAS threads were measured to make one 400 x 400 eigvalsh take 1.6 s instead of 5 ms.
    with threadpool_limits(limits=1):
        yield


@lru_cache(maxsize=None)
def spectrum(dim, n_samples, strengths=(), seed=0):
    """Eigenvalues (descending) of (1/n) X Xᵀ, X = diag(√(1 + ℓ)) Z: population Σ = I + Σ_i ℓ_i e_i e_iᵀ, σ² = 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((dim, n_samples))
    x[: len(strengths)] *= np.sqrt(1.0 + np.asarray(strengths))[:, None]
    values = np.linalg.eigvalsh(x @ x.T / n_samples)[::-1].copy()
    values.flags.writeable = False
    return values


def strong_spikes(q):
    # Well above BBP (ℓ > √q): the weakest is max(5√q, 3), whose sample eigenvalue (1 + ℓ)(1 + q/ℓ) still clears
    # the Gavish–Donoho threshold λ*(β)² max(1, q) by more than 3 standard deviations ((1 + ℓ)√(2/n)) at every q.
    return (20.0, 10.0, max(5.0 * math.sqrt(q), 3.0))


# ---------------------------------------------------------------------------------------------------------------
# Marchenko–Pastur law
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q, sigma2", [(0.25, 1.0), (0.5, 2.0), (1.0, 0.3), (4.0, 1.5)])
def test_edges_formula(q, sigma2):
    lower, upper = marchenko_pastur_edges(q, sigma2)
    assert lower == pytest.approx(sigma2 * (1 - math.sqrt(q)) ** 2, abs=1e-15)
    assert upper == pytest.approx(sigma2 * (1 + math.sqrt(q)) ** 2, rel=1e-15)


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0, 2.5])
def test_pdf_integrates_to_mass_of_continuous_part(q):
    # 1 for q ≤ 1; 1/q for q > 1, the rest (1 - 1/q) being the atom at 0. quad's error estimates are < 1e-8.
    lower, upper = marchenko_pastur_edges(q, 1.7)
    mass, _ = integrate.quad(lambda x: float(marchenko_pastur_pdf(x, q, 1.7)), lower, upper, limit=200)
    assert mass == pytest.approx(min(1.0, 1.0 / q), abs=1e-7)


def quad_pdf(q, sigma2, lower, upper):
    """Numerical ∫ρ, as accurate as double precision allows (the closed form agrees to ~1e-14)."""
    value, _ = integrate.quad(
        lambda t: float(marchenko_pastur_pdf(t, q, sigma2)), lower, upper, epsabs=1e-13, epsrel=1e-13, limit=500
    )
    return value


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0, 2.5])
def test_cdf_closed_form_matches_integrated_pdf(q):
    lower, upper = marchenko_pastur_edges(q, 0.8)
    atom = max(0.0, 1.0 - 1.0 / q)
    for x in np.linspace(lower, upper, 9)[1:-1]:
        assert float(marchenko_pastur_cdf(x, q, 0.8)) == pytest.approx(atom + quad_pdf(q, 0.8, lower, x), abs=1e-11)


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0, 2.5])
def test_cdf_is_monotone_and_reaches_one(q):
    lower, upper = marchenko_pastur_edges(q)
    grid = np.linspace(-1.0, upper + 1.0, 2001)
    cdf = marchenko_pastur_cdf(grid, q)
    assert np.all(np.diff(cdf) >= -1e-12)
    assert float(marchenko_pastur_cdf(-1e-9, q)) == 0.0
    assert float(marchenko_pastur_cdf(upper, q)) == pytest.approx(1.0, abs=1e-12)
    assert float(marchenko_pastur_cdf(10 * upper, q)) == 1.0
    # The atom at 0 holds 1 - 1/q when q > 1; for q < 1 there is no mass below λ₋.
    assert float(marchenko_pastur_cdf(0.0, q)) == pytest.approx(max(0.0, 1.0 - 1.0 / q), abs=1e-15)
    if q < 1:
        assert float(marchenko_pastur_cdf(lower, q)) == 0.0


def test_pdf_vanishes_outside_support_and_matches_known_value():
    lower, upper = marchenko_pastur_edges(0.25)
    assert np.all(marchenko_pastur_pdf([-1.0, 0.0, lower * 0.99, upper * 1.01, 100.0], 0.25) == 0.0)
    # q = 1, σ² = 1: ρ(1) = √(4·1 - 1)/(2π) = √3/(2π).
    assert float(marchenko_pastur_pdf(1.0, 1.0)) == pytest.approx(math.sqrt(3) / (2 * math.pi), rel=1e-14)
    assert marchenko_pastur_pdf(np.ones((2, 3)), 0.5).shape == (2, 3)


@pytest.mark.parametrize("q, approximate", [(0.05, 0.98), (0.5, 0.83), (1.0, 0.65)])
def test_median_matches_design_values_and_inverts_cdf(q, approximate):
    median = marchenko_pastur_median(q)
    assert median == pytest.approx(approximate, abs=0.005)  # DESIGN gives two decimals
    assert float(marchenko_pastur_cdf(median, q)) == pytest.approx(0.5, abs=1e-10)


@pytest.mark.parametrize("q", [1.5, 2.0, 4.0])
def test_median_above_one_is_that_of_the_nonzero_eigenvalues(q):
    # The non-zero eigenvalues of (1/n)XXᵀ are those of q·(1/d)XᵀX, an MP law of ratio 1/q: μ_q = q·μ_{1/q}, and
    # μ_q splits the continuous mass 1/q in halves, so F(μ_q) = (1 - 1/q) + 1/(2q).
    median = marchenko_pastur_median(q)
    assert median == pytest.approx(q * marchenko_pastur_median(1.0 / q), rel=1e-12)
    assert float(marchenko_pastur_cdf(median, q)) == pytest.approx(1.0 - 1.0 / (2.0 * q), abs=1e-10)


@pytest.mark.parametrize("dim, n_samples", [(400, 800), (400, 200)])
def test_median_matches_noise_eigenvalues(dim, n_samples):
    # MP eigenvalues are rigid: the sample median of the non-zero ones is within O(1/d) of μ_q.
    live = spectrum(dim, n_samples)[: min(dim, n_samples)]
    assert np.median(live) == pytest.approx(marchenko_pastur_median(dim / n_samples), abs=0.02)


# ---------------------------------------------------------------------------------------------------------------
# Gavish–Donoho
# ---------------------------------------------------------------------------------------------------------------


def test_gavish_donoho_coefficient_at_one_is_four_over_root_three():
    assert gavish_donoho_coefficient(1.0) == pytest.approx(4 / math.sqrt(3), abs=1e-12)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 0.9, 1.0])
def test_gavish_donoho_threshold_lies_above_the_bulk(beta):
    # Singular values of pure noise end at (1 + √β)·√N·σ: an optimal threshold must sit above it.
    assert gavish_donoho_coefficient(beta) > 1 + math.sqrt(beta)


def test_gavish_donoho_omega_approximates_the_exact_ratio():
    # ω(β) = λ*(β)/√μ_β exactly; Gavish & Donoho's cubic is quoted as accurate to about 0.02 on [0.1, 1], and
    # is within 0.0063 of the exact ratio there (computed here with the closed-form MP median).
    for beta in np.linspace(0.1, 1.0, 19):
        exact = gavish_donoho_coefficient(beta) / math.sqrt(marchenko_pastur_median(beta))
        assert gavish_donoho_omega(beta) == pytest.approx(exact, abs=0.01)
    assert gavish_donoho_coefficient(1.0) / math.sqrt(marchenko_pastur_median(1.0)) == pytest.approx(2.858, abs=1e-3)


@pytest.mark.parametrize("estimator", ["mp-median", "gavish-donoho", "mppca"])
def test_rules_read_the_same_in_both_orientations(estimator):
    # X (200 x 400) seen as 400 samples of width 200, or as 200 samples of width 400: the same singular values,
    # the same σ² per entry. Eigenvalues of (1/200)XᵀX are twice those of (1/400)XXᵀ, plus 200 structural zeros.
    # A rule that gets the max(1, q) scaling right keeps the same directions and finds the same σ².
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 400))
    x[:2] *= np.sqrt(1.0 + np.array([8.0, 3.0]))[:, None]
    wide = fit_spectrum(np.linalg.eigvalsh(x @ x.T / 400), 400, estimator)
    tall = fit_spectrum(np.linalg.eigvalsh(x.T @ x / 200), 200, estimator)
    assert (wide.q, tall.q) == (0.5, 2.0)
    assert tall.rank == wide.rank == 2
    assert tall.sigma2 == pytest.approx(wide.sigma2, rel=1e-9)
    # Same cut on singular values: n·threshold is s², whatever the orientation.
    assert 200 * tall.threshold == pytest.approx(400 * wide.threshold, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Estimators on spiked models with known rank
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, n_samples", SHAPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_strong_spikes_are_recovered(estimator, dim, n_samples):
    strengths = strong_spikes(dim / n_samples)
    for seed in range(3):
        fit = fit_spectrum(spectrum(dim, n_samples, strengths, seed), n_samples, estimator)
        if estimator in EXACT_ESTIMATORS:
            assert fit.rank == 3
        else:
            assert 3 <= fit.rank <= 3 + EDGE_SLACK
        assert fit.sigma2 == pytest.approx(1.0, abs=0.05)  # σ² = 1; the estimators' spread is ≈ 0.01


@pytest.mark.parametrize("dim, n_samples", SHAPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_spikes_below_bbp_are_not_detected(estimator, dim, n_samples):
    # ℓ = √q/2 < √q: the spikes' eigenvalues stick to the bulk edge (BBP), nothing can be told from noise.
    strengths = (0.5 * math.sqrt(dim / n_samples),) * 3
    for seed in range(3):
        fit = fit_spectrum(spectrum(dim, n_samples, strengths, seed), n_samples, estimator)
        assert fit.rank <= (0 if estimator in EXACT_ESTIMATORS else EDGE_SLACK)


def test_gavish_donoho_drops_a_spike_between_edge_and_threshold():
    # q = 0.5: edge (1 + √q)² = 2.91, Gavish–Donoho threshold λ*(0.5)² = 3.91. ℓ = 1.58 puts the spike's
    # eigenvalue at (1 + ℓ)(1 + q/ℓ) = 3.40, ~4 sd ((1 + ℓ)√(2/n) = 0.13) from both cuts: the MSE-optimal rule
    # drops what the edge rules keep.
    eigenvalues = spectrum(400, 800, (1.58,), 0)
    assert fit_spectrum(eigenvalues, 800, "gavish-donoho").rank == 0
    assert fit_spectrum(eigenvalues, 800, "mp-median").rank == 1
    assert fit_spectrum(eigenvalues, 800, "kritchman-nadler").rank == 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_spike_strengths_estimate_the_truth(estimator):
    # The spike eigenvalue has relative sd ≈ √(2/n) (Paul 2007), and ℓ̂ inherits it: 4 sd = 0.089 at n = 4000.
    n_samples, truth = 4000, np.array([20.0, 10.0, 5.0])
    fit = fit_spectrum(spectrum(200, n_samples, tuple(truth), 0), n_samples, estimator)
    assert fit.rank >= 3
    np.testing.assert_allclose(fit.spike_strengths[:3] / truth, 1.0, atol=4 * math.sqrt(2 / n_samples))


def test_overlap_formula_matches_measured_overlap():
    # q = 0.5, ℓ = 2: |<u, û>|² → (1 - q/ℓ²)/(1 + q/ℓ) = 0.7. Fluctuations are O(1/√n) (sd 0.028 measured over 30
    # seeds at n = 800), so 0.1 ≈ 3.5 sd.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 800))
    x[0] *= math.sqrt(3.0)
    eigenvalues, eigenvectors = np.linalg.eigh(x @ x.T / 800)
    measured = eigenvectors[0, -1] ** 2  # the spike is along e_0
    fit = fit_spectrum(eigenvalues, 800, "mp-median")
    assert fit.rank >= 1
    assert fit.eigenvector_overlaps[0] == pytest.approx(measured, abs=0.1)
    assert fit.eigenvector_overlaps[0] == pytest.approx(0.7, abs=0.1)


@pytest.mark.parametrize("q", [0.1, 1.0, 2.0])
def test_spike_map_inverts_exactly_and_stops_at_bbp(q):
    strengths = np.array([0.2, 1.0, 3.0, 30.0]) + math.sqrt(q)
    eigenvalues = 2.5 * (1 + strengths) * (1 + q / strengths)  # σ² = 2.5
    np.testing.assert_allclose(_spike_strengths(eigenvalues, q, 2.5), strengths, rtol=1e-10)
    # At or below the edge the root is complex: ℓ̂ is the BBP threshold √q and the predicted overlap is 0.
    at_edge = _spike_strengths(np.array([2.5 * (1 + math.sqrt(q)) ** 2, 1.0]), q, 2.5)
    np.testing.assert_allclose(at_edge, math.sqrt(q))
    np.testing.assert_allclose(_eigenvector_overlaps(at_edge, q), 0.0, atol=1e-12)
    assert np.all(np.diff(_eigenvector_overlaps(strengths, q)) > 0)


# ---------------------------------------------------------------------------------------------------------------
# Pure noise
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, n_samples", [(100, 1000), (200, 200), (400, 200)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_pure_noise_false_alarms(estimator, dim, n_samples):
    fits = [fit_spectrum(spectrum(dim, n_samples, (), seed), n_samples, estimator) for seed in range(20)]
    ranks = np.array([fit.rank for fit in fits])
    if estimator == "gavish-donoho":
        # The threshold is O(1) above the edge (5.33 vs 4 at q = 1); noise never reaches it.
        assert ranks.sum() == 0
    elif estimator == "kritchman-nadler":
        # One test at level 0.005 per matrix: expected 0.1 false alarms in 20 matrices.
        assert ranks.sum() <= 1
    else:
        # An edge cut: λ₁ > λ̂₊ in roughly a quarter of the matrices (TW fluctuation plus the O(1/d) error of σ²;
        # measured 0-40% over these shapes), never more than a couple of directions.
        assert ranks.max() <= EDGE_SLACK
        assert np.count_nonzero(ranks) <= 12
    # σ² = 1 with an O(1/d) error (measured sd ≤ 0.02 at q = 1), and the bulk is MP: no heavy-tail flag.
    assert np.mean([fit.sigma2 for fit in fits]) == pytest.approx(1.0, abs=0.02)
    assert max(fit.ks_distance for fit in fits) < 0.1
    assert not any(fit.heavy_tailed for fit in fits)


def power_law_eigenvalues(dim=200):
    # A continuum with no bulk, like the activation spectra of DESIGN §1 (largest/median ≈ 100 here).
    return 1.0 / np.arange(1, dim + 1)


@pytest.mark.parametrize("estimator", ["paper", "mp-median", "gavish-donoho", "mppca"])
def test_heavy_tailed_spectrum_is_flagged_and_logged(estimator, caplog):
    # Kritchman–Nadler is left out: on a continuum it keeps all but the smallest directions, and the handful left
    # is close to flat, so its own bulk does fit MP.
    with caplog.at_level(logging.WARNING, logger="optimum_rmtkd.rmt"):
        fit = fit_spectrum(power_law_eigenvalues(), 20000, estimator)
    assert fit.heavy_tailed
    assert fit.ks_distance > HEAVY_TAIL_KS
    assert f"Estimator `{estimator}` fits the spectrum (d=200, n=20000) poorly" in caplog.text


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_rank_never_grows_with_scale(estimator):
    ranks = [fit_spectrum(power_law_eigenvalues(), 20000, estimator, scale=s).rank for s in (0.5, 1, 2, 4, 8)]
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    assert ranks[0] > ranks[-1]


def test_paper_quantile_controls_compression():
    # Higher τ, wider histogram window, more of the spectrum explained as noise, fewer directions kept. The fit is
    # a local refinement from σ₀², so the trend holds but is not guaranteed step by step: check the ends.
    ranks = {tau: fit_spectrum(power_law_eigenvalues(), 20000, quantile=tau).rank for tau in (0.2, 0.5, 0.9)}
    assert ranks[0.2] > ranks[0.5] > ranks[0.9]


# ---------------------------------------------------------------------------------------------------------------
# The fit object and its inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fit_fields_are_consistent(estimator):
    fit = fit_spectrum(spectrum(200, 400, strong_spikes(0.5), 1), 400, estimator)
    assert isinstance(fit, SpectrumFit)
    assert (fit.estimator, fit.dim, fit.n_samples, fit.q) == (estimator, 200, 400, 0.5)
    assert (fit.lower_edge, fit.edge) == pytest.approx(marchenko_pastur_edges(0.5, fit.sigma2), rel=1e-15)
    assert fit.spike_strengths.shape == fit.eigenvector_overlaps.shape == (fit.rank,)
    assert np.all((fit.eigenvector_overlaps >= 0) & (fit.eigenvector_overlaps <= 1))
    assert np.all(np.diff(fit.spike_strengths) <= 0)
    if estimator in ("paper", "mp-median"):
        assert fit.threshold == fit.edge
    if estimator == "gavish-donoho":
        assert fit.threshold == pytest.approx(gavish_donoho_coefficient(0.5) ** 2 * fit.sigma2, rel=1e-12)
        assert fit.threshold > fit.edge
    assert fit.params["scale"] == 1.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_to_dict_is_json_serialisable(estimator):
    fit = fit_spectrum(spectrum(100, 1000, strong_spikes(0.1), 0), 1000, estimator)
    data = fit.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {
        "estimator", "dim", "n_samples", "q", "sigma2", "edge", "lower_edge", "rank", "threshold", "ks_distance",
        "spike_strengths", "eigenvector_overlaps", "heavy_tailed", "params",
    }
    assert len(data["spike_strengths"]) == data["rank"]


def test_paper_reports_its_histogram_choices():
    fit = fit_spectrum(spectrum(200, 400, (), 0), 400, "paper", quantile=0.4, bins=17)
    params = fit.params
    assert params["quantile"] == 0.4 and params["bins"] == 17
    sigma2_init = params["sigma2_init"]
    assert sigma2_init == pytest.approx(np.quantile(spectrum(200, 400, (), 0), 0.4))
    assert params["histogram_range"] == pytest.approx([0.0, 2 * sigma2_init * (1 + math.sqrt(0.5)) ** 2])
    assert params["sigma2_bounds"] == pytest.approx([sigma2_init / 10, sigma2_init * 10])
    assert fit_spectrum(spectrum(200, 400, (), 0), 400).params["bins"] == 14  # √200 rounded


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matrix_input_equals_eigenvalue_input(estimator):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 150))
    x[:2] *= np.sqrt(1.0 + np.array([12.0, 6.0]))[:, None]
    matrix = x @ x.T / 150
    from_matrix = fit_spectrum(matrix, 150, estimator)
    eigenvalues = np.linalg.eigvalsh(matrix)
    from_eigenvalues = fit_spectrum(rng.permutation(eigenvalues), 150, estimator)  # any order
    assert from_matrix.rank == from_eigenvalues.rank >= 2
    assert from_matrix.sigma2 == pytest.approx(from_eigenvalues.sigma2, rel=1e-9)
    assert from_matrix.ks_distance == pytest.approx(from_eigenvalues.ks_distance, abs=1e-9)
    np.testing.assert_allclose(from_matrix.spike_strengths, from_eigenvalues.spike_strengths, rtol=1e-9)


def test_round_off_negatives_are_clipped():
    eigenvalues = np.array(spectrum(100, 1000, (), 0))
    eigenvalues[-1] = -1e-14
    clipped = eigenvalues.copy()
    clipped[-1] = 0.0
    for estimator in ESTIMATORS:
        assert fit_spectrum(eigenvalues, 1000, estimator).to_dict() == fit_spectrum(clipped, 1000, estimator).to_dict()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dead_directions_are_left_out(estimator):
    # 20 exact zeros (channels that never fire) carry no variance: they are neither noise nor signal.
    eigenvalues = np.concatenate([spectrum(200, 1000, strong_spikes(0.2), 0), np.zeros(20)])
    fit = fit_spectrum(eigenvalues, 1000, estimator)
    assert fit.dim == 220
    assert 3 <= fit.rank <= (3 if estimator in EXACT_ESTIMATORS else 3 + EDGE_SLACK)
    assert fit.sigma2 == pytest.approx(1.0, abs=0.1)  # q is 220/1000, not 200/1000: the scale is only close


def test_kritchman_nadler_on_a_continuum_with_dead_directions():
    # With large n nearly every test rejects on a continuum: the sequence must stop before the zeros, which are
    # no noise estimate, and the dead directions must not enter the trace identity (p − k) at all.
    live = power_law_eigenvalues(100)
    fit = fit_spectrum(np.concatenate([live, np.zeros(3)]), 100000, "kritchman-nadler")
    alive_only = fit_spectrum(live, 100000, "kritchman-nadler")
    assert 90 <= fit.rank <= 99
    assert fit.sigma2 > 0
    assert (fit.rank, fit.sigma2, fit.threshold) == (alive_only.rank, alive_only.sigma2, alive_only.threshold)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_eigenvalue_keeps_nothing(estimator):
    fit = fit_spectrum([2.0], 10, estimator)
    assert fit.rank == 0 and fit.dim == 1 and fit.sigma2 > 0


def test_more_nonzero_eigenvalues_than_samples_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_rmtkd.rmt"):
        fit_spectrum(np.linspace(1.0, 2.0, 300), 100, "mp-median")
    assert "`n_samples`=100 < d=300 implies at most 100 non-zero eigenvalues" in caplog.text


def test_module_needs_no_torch():
    # `import optimum_rmtkd` is light, so the module loads through its package: numpy/scipy only, no torch.
    code = (
        "import sys\n"
        "from optimum_rmtkd import rmt\n"
        "assert rmt.fit_spectrum([9.0, 1.0, 1.1, 0.9], 1000, 'mp-median').rank == 1\n"
        "assert 'torch' not in sys.modules, 'rmt.py imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

GOOD = np.linspace(0.5, 1.5, 20)


@pytest.mark.parametrize(
    "values, kwargs, error, match",
    [
        (GOOD, {"estimator": "pca"}, ValueError,
         r"`estimator` must be one of paper, mp-median, gavish-donoho, kritchman-nadler, mppca, got 'pca'"),
        (GOOD, {"n_samples": 1}, ValueError, r"`n_samples` must be an integer >= 2, got 1\."),
        (GOOD, {"n_samples": 2.5}, TypeError, r"`n_samples` must be an int, got float\."),
        (GOOD, {"quantile": 1.5}, ValueError, r"`quantile` must be in \(0, 1\), got 1\.5\."),
        (GOOD, {"quantile": 0.0}, ValueError, r"`quantile` must be in \(0, 1\), got 0\.0\."),
        (GOOD, {"alpha": 1.0}, ValueError, r"`alpha` must be in \(0, 1\), got 1\.0\."),
        (GOOD, {"bins": 1}, ValueError, r"`bins` must be an integer >= 2, got 1\."),
        (GOOD, {"scale": 0.0}, ValueError, r"`scale` must be a finite number > 0, got 0\.0\."),
        (GOOD, {"scale": float("inf")}, ValueError, r"`scale` must be a finite number > 0, got inf\."),
        ([1.0, float("nan")], {}, ValueError, r"`eigenvalues_or_matrix` contains NaN or inf values"),
        ([1.0, float("inf")], {}, ValueError, r"`eigenvalues_or_matrix` contains NaN or inf values"),
        ([], {}, ValueError, r"`eigenvalues_or_matrix` is empty \(shape \(0,\)\); a site needs d >= 1\."),
        (np.ones((2, 2, 2)), {}, ValueError, r"must be a 1-D array of eigenvalues or a square 2-D second-moment "
         r"matrix, got shape \(2, 2, 2\)\."),
        (np.ones((3, 4)), {}, ValueError, r"square 2-D second-moment matrix, got shape \(3, 4\)\."),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), {}, ValueError,
         r"`eigenvalues_or_matrix` must be a symmetric matrix, got max \|A - A.T\| = 0\.5"),
        ([1.0, -0.5], {}, ValueError,
         r"`eigenvalues_or_matrix` must be positive semi-definite, got an eigenvalue -0\.5"),
        (np.zeros(5), {}, ValueError, r"`eigenvalues_or_matrix` is all zeros"),
        (np.array([1 + 1j, 2.0]), {}, TypeError,
         r"`eigenvalues_or_matrix` must hold real numbers, got dtype complex128"),
    ],
)
def test_fit_spectrum_errors(values, kwargs, error, match):
    kwargs = {"n_samples": 100, **kwargs}
    with pytest.raises(error, match=match):
        fit_spectrum(values, **kwargs)


@pytest.mark.parametrize(
    "function, args, error, match",
    [
        (marchenko_pastur_edges, (0.0,), ValueError, r"`q` must be a finite number > 0, got 0\.0\."),
        (marchenko_pastur_pdf, (1.0, 0.5, -1.0), ValueError, r"`sigma2` must be a finite number > 0, got -1\.0\."),
        (marchenko_pastur_cdf, (1.0, float("nan")), ValueError, r"`q` must be a finite number > 0, got nan\."),
        (marchenko_pastur_median, ("0.5",), TypeError, r"`q` must be a real number, got str\."),
        (gavish_donoho_coefficient, (0.0,), ValueError,
         r"`beta` must be in \(0, 1\] \(use min\(d, n\) / max\(d, n\)\), got 0\.0\."),
        (gavish_donoho_omega, (1.5,), ValueError, r"`beta` must be in \(0, 1\] .*got 1\.5\."),
    ],
)
def test_law_errors(function, args, error, match):
    with pytest.raises(error, match=match):
        function(*args)


# ---------------------------------------------------------------------------------------------------------------
# Width rounding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, dim, kwargs, expected",
    [
        (37, 384, {}, 40),  # up to a multiple of 8
        (40, 384, {}, 40),  # already aligned
        (37, 384, {"num_heads": 12}, 48),  # lcm(8, 12) = 24
        (17, 768, {"multiple": 64, "num_heads": 12}, 192),  # lcm(64, 12) = 192
        (380, 384, {}, 384),  # 384 is the cap
        (5, 6, {}, 6),  # 8 would exceed d: keep d
        (30, 36, {"num_heads": 12}, 36),  # 48 would exceed d: keep d (divisible by the heads)
        (0, 384, {}, 8),  # never 0
        (0, 384, {"min_width": 20}, 24),  # the floor is rounded too
        (1, 4, {"min_width": 8}, 4),  # a floor above d keeps the whole site
        (3, 32, {"multiple": 1}, 3),
        (64, 64, {}, 64),
    ],
)
def test_round_width(rank, dim, kwargs, expected):
    assert round_width(rank, dim, **kwargs) == expected


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((385, 384), {}, ValueError, r"`rank` must be <= `dim` \(384\), got 385\."),
        ((-1, 384), {}, ValueError, r"`rank` must be an integer >= 0, got -1\."),
        ((10, 0), {}, ValueError, r"`dim` must be an integer >= 1, got 0\."),
        ((10, 384), {"multiple": 0}, ValueError, r"`multiple` must be an integer >= 1, got 0\."),
        ((10, 384), {"min_width": 0}, ValueError, r"`min_width` must be an integer >= 1, got 0\."),
        ((10, 384), {"num_heads": 5}, ValueError, r"`dim` \(384\) must be divisible by `num_heads`, got num_heads=5"),
        ((10, 384), {"num_heads": 0}, ValueError, r"`num_heads` must be an integer >= 1, got 0\."),
        ((10.0, 384), {}, TypeError, r"`rank` must be an int, got float\."),
        ((True, 384), {}, TypeError, r"`rank` must be an int, got bool\."),
    ],
)
def test_round_width_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        round_width(*args, **kwargs)
