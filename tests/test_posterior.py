"""Point-cloud checks, the aggregate posterior, and the PPCA ground truth's closed forms."""

import json

import numpy as np
import pytest
from scipy import stats

from _helpers import cli
from vaelens.errors import DataError
from vaelens.groundtruth import exact_posterior, orthogonal_loadings, ppca
from vaelens.posterior import active_mask, aggregate_monte_carlo, aggregate_posterior, point_cloud_check


# --- point clouds ------------------------------------------------------------------------------

def test_check_passes_for_the_models_own_sampling_path(digits_vae):
    vae, X = digits_vae
    c = vae.check(X, n=5, n_samples=1000, seed=0)
    k, d = c.mu.shape
    assert c.z.shape == (1000, k, d) and len(c.indices) == 5
    # Under the true claim every test's p-value is uniform; the seed fixes the draw, and a false
    # alarm at the 1% level would need a 1-in-100 draw, so this pins the implementation, not luck.
    assert c.passed and c.p_value >= 0.01
    # standardized mean errors are N(0, 1): none should exceed 5 (probability ~1e-5 over k*d values)
    assert np.abs(c.mean_z).max() < 5
    # std ratios concentrate within 1 +- 5/sqrt(2 S) (5 standard errors of a sample std)
    assert np.abs(c.std_ratio - 1).max() < 5 / np.sqrt(2 * 1000)
    np.testing.assert_allclose(c.mu, vae.encode(X[c.indices]).mu, rtol=1e-5, atol=1e-6)
    d = c.to_dict()
    assert "z" not in d and d["passed"] is True
    json.dumps(d)


def test_check_fails_for_a_wrong_sigma_or_mu(digits_vae):
    vae, X = digits_vae
    ok = vae.check(X, indices=[0, 1, 2], n_samples=1000)
    # sigma 10% too large: the variance statistic is ~0.83 of its dof = 3*d*999, many standard errors off
    bad_sigma = vae.check(X, indices=[0, 1, 2], n_samples=1000, sigma=ok.sigma * 1.1)
    assert not bad_sigma.passed and bad_sigma.var_p < 1e-10
    # mu off by half a sigma: each mean error is ~0.5 * sqrt(1000) = 16 standard errors
    bad_mu = vae.check(X, indices=[0, 1, 2], n_samples=1000, mu=ok.mu + 0.5 * ok.sigma)
    assert not bad_mu.passed and bad_mu.mean_p < 1e-10


def test_check_rejects_a_perturbed_encoder(digits_vae):
    """Draws from the real encoder, claims from an encoder whose sigma head was shifted."""
    import copy

    import torch

    vae, X = digits_vae
    Xt = vae._tensor(X)
    wrong = copy.deepcopy(vae.module_)
    with torch.no_grad():
        wrong.encoder.sigma_head.bias += 0.3
        q = wrong.encoder(Xt[:4])
    c = point_cloud_check(vae.module_, Xt, range(4), n_samples=500, sigma=q.stddev.numpy())
    assert not c.passed


def test_check_rejects_bad_indices(digits_vae):
    vae, X = digits_vae
    with pytest.raises(DataError, match="indices"):
        vae.check(X, indices=[0, len(X)])


# --- aggregate posterior -----------------------------------------------------------------------

def _synthetic(n=500, d=3, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d)) * np.array([2.0, 0.5, 0.05]) + np.array([0.3, -1.0, 0.0])
    sigma = np.exp(rng.normal(size=(n, d)) * 0.3) * np.array([0.2, 0.8, 1.0])
    return mu, sigma


def test_aggregate_posterior_is_the_law_of_total_variance():
    mu, sigma = _synthetic()
    agg = aggregate_posterior(mu, sigma)
    np.testing.assert_allclose(agg.mean, mu.mean(0))
    # a second route to the mixture's variance: E[z^2] - E[z]^2 with E[z^2 | x] = mu^2 + sigma^2
    np.testing.assert_allclose(agg.total, (mu ** 2 + sigma ** 2).mean(0) - mu.mean(0) ** 2)
    np.testing.assert_allclose(np.diag(agg.cov), agg.total)
    np.testing.assert_allclose(agg.cov - np.diag(np.diag(agg.cov)), np.cov(mu.T, bias=True) - np.diag(mu.var(0)),
                               atol=1e-12)
    np.testing.assert_allclose(agg.share_between, mu.var(0) / agg.total)
    assert agg.active.tolist() == [True, True, False]


def test_aggregate_kls_are_the_gaussian_closed_forms():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=(50, 3)), rng.uniform(0.2, 1.5, size=(50, 3))
    agg = aggregate_posterior(mu, sigma)
    m, v = agg.mean, agg.total
    np.testing.assert_allclose(agg.kl_dim, 0.5 * (v + m ** 2 - 1 - np.log(v)), rtol=1e-12)
    np.testing.assert_allclose(agg.mean_kl, (0.5 * (sigma ** 2 + mu ** 2 - 1) - np.log(sigma)).sum(1).mean(), rtol=1e-12)
    logdet = np.linalg.slogdet(agg.cov)[1]
    np.testing.assert_allclose(agg.kl_moment_matched, 0.5 * (np.trace(agg.cov) + m @ m - 3 - logdet), rtol=1e-10)


def test_active_mask_is_the_mask_of_evaluates_count():
    from vaelens.evaluate import active_units
    mu = np.stack([np.linspace(-1, 1, 100), np.full(100, 0.3), np.linspace(0, 0.1, 100)], 1)
    assert active_mask(mu).tolist() == [True, False, False]
    assert active_units(mu)[0] == active_mask(mu).sum() == 1


def test_aggregate_matches_monte_carlo_within_standard_errors():
    mu, sigma = _synthetic()
    agg = aggregate_posterior(mu, sigma)
    mc = aggregate_monte_carlo(mu, sigma, n_draws=40000, seed=1)
    # Seeded; the z-scores are ~N(0, 1), and the verdict allows the Bonferroni 1% quantile (about 3.2 for 6 tests).
    assert mc.passed
    assert np.abs(mc.mean_err_z).max() < 4 and np.abs(mc.var_err_z).max() < 4
    # The Gaussian with the mixture's moments has the larger entropy, so its KL to N(0, I) is smaller:
    # allow 3 Monte Carlo standard errors.
    assert agg.kl_moment_matched <= mc.kl_mixture + 3 * mc.kl_mixture_se
    # the same draws catch a wrong decomposition (leaving out the between-sample part Var(mu))
    assert np.abs((np.diag(mc.cov) - agg.within) / mc.var_se).max() > 10


def test_aggregate_through_the_api(digits_vae):
    vae, X = digits_vae
    agg = vae.aggregate_posterior(X)
    post = vae.encode(X)
    np.testing.assert_allclose(agg.between, post.mu.astype(np.float64).var(0), rtol=1e-6)
    assert agg.n == len(X) and json.dumps(agg.to_dict())


def test_aggregate_rejects_bad_shapes():
    with pytest.raises(DataError):
        aggregate_posterior(np.zeros((5, 2)), np.ones((5, 3)))


# --- PPCA ground truth -------------------------------------------------------------------------

def test_ppca_closed_forms_match_gaussian_conditioning():
    gt = ppca(n=50, norms=(3.0, 1.5, 0.5), p=5, noise_std=0.4, seed=3, mean=np.arange(5.0))
    C = gt.W @ gt.W.T + gt.noise_std ** 2 * np.eye(5)
    # joint Gaussian conditioning, a different formula from the one in groundtruth.py
    K = gt.W.T @ np.linalg.inv(C)
    np.testing.assert_allclose(gt.post_mu, (gt.X.astype(np.float64) - gt.mean) @ K.T, atol=1e-10)
    np.testing.assert_allclose(gt.post_cov, np.eye(3) - K @ gt.W, atol=1e-12)
    ll = stats.multivariate_normal(gt.mean, C).logpdf(gt.X.astype(np.float64))
    np.testing.assert_allclose(gt.log_likelihood, ll, rtol=1e-10)
    assert gt.diagonal
    expected = gt.noise_std / np.sqrt(np.array([3.0, 1.5, 0.5]) ** 2 + gt.noise_std ** 2)
    np.testing.assert_allclose(gt.post_sigma[0], expected, rtol=1e-12)


def test_ppca_with_oblique_loadings_has_a_full_posterior():
    W = orthogonal_loadings(6, (2.0, 1.0), seed=0)
    W[:, 1] += 0.5 * W[:, 0]
    gt = ppca(n=10, loadings=W, noise_std=0.3)
    assert not gt.diagonal
    mu, cov = exact_posterior(gt.X, W, gt.mean, 0.3)
    np.testing.assert_allclose(mu, gt.post_mu)


def test_cli_check_and_posterior(digits_run, tmp_path):
    out = tmp_path / "check.json"
    r = cli("check", digits_run, "--n", "4", "--samples", "500", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "verdict: PASS" in r.stdout and "KS" in r.stdout
    d = json.loads(out.read_text())
    assert d["passed"] is True and len(d["indices"]) == 4
    r = cli("posterior", digits_run, "--draws", "20000")
    assert r.returncode == 0, r.stderr
    assert "verdict: PASS" in r.stdout and "Var(mu)" in r.stdout
    r = cli("check", digits_run, "--json", out)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
