"""Tests for vaelens.evaluate: the IWAE estimate against closed-form log p(x), active units,
mutual information and aggregate KL, the API methods and `vaelens evaluate`."""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from _helpers import cli
from vaelens import evaluate as ev
from vaelens.config import ModelConfig
from vaelens.errors import DataError
from vaelens.model import VAEModule

P, D, S = 6, 2, 0.5  # features, latent dimensions, decoder noise scale


def _inv_softplus(y):
    return torch.log(torch.expm1(torch.as_tensor(y, dtype=torch.float32)))


def linear_gaussian(exact_posterior: bool):
    """x = W z + b + s * noise with z ~ N(0, I): p(x) = N(b, W W^T + s^2 I) whatever the encoder.

    W has orthogonal columns, so the exact posterior N(A (x - b), M^-1) with M = I + W^T W / s^2
    is diagonal and the linear encoder can represent it exactly.
    """
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(P, D, generator=g))
    W = Q * torch.tensor([2.0, 1.0])                                         # (p, d), orthogonal columns
    b = torch.randn(P, generator=g) * 0.3
    cfg = ModelConfig(latent_dim=D, hidden=(), likelihood="gaussian", gaussian_scale="fixed", fixed_scale=S,
                      sigma_floor=0.0, input_dim=P)
    m = VAEModule(cfg).eval()
    M_diag = 1 + (W * W).sum(0) / S**2                                       # (d,)
    A = (W / S**2 / M_diag).T                                                # (d, p)
    post_sd = M_diag.rsqrt()
    with torch.no_grad():
        m.decoder.first.weight.copy_(W)
        m.decoder.first.bias.copy_(b)
        if exact_posterior:
            m.encoder.mu_head.weight.copy_(A)
            m.encoder.mu_head.bias.copy_(-A @ b)
            sd = post_sd
        else:  # a deliberately poor encoder: shrunk means, too-wide scales
            m.encoder.mu_head.weight.copy_(0.85 * A)
            m.encoder.mu_head.bias.copy_(-0.85 * A @ b)
            sd = 1.4 * post_sd
        m.encoder.sigma_head.weight.zero_()
        m.encoder.sigma_head.bias.copy_(_inv_softplus(sd))
    px = MultivariateNormal(b.double(), (W @ W.T).double() + S**2 * torch.eye(P, dtype=torch.float64))
    X = (torch.randn(40, D, generator=g) @ W.T + b + S * torch.randn(40, P, generator=g))   # (n, p)
    return m, X, px.log_prob(X.double()).numpy()


def test_decoder_scale_is_exactly_the_fixed_scale():
    m, X, _ = linear_gaussian(True)
    with torch.no_grad():
        scale = m.decoder(torch.zeros(1, D)).scale
    assert torch.allclose(scale, torch.full_like(scale, S), atol=1e-6)


def test_iwae_equals_log_px_for_the_exact_posterior():
    # with q(z|x) = p(z|x) every weight equals p(x): the estimate is exact for any K;
    # only float32 rounding of the log-weights (~1e-5 relative on values of ~10 nats) remains
    torch.manual_seed(0)
    m, X, exact = linear_gaussian(exact_posterior=True)
    for k in (1, 7, 300):
        ll = ev.iwae_log_likelihood(m, X, k, seed=k)
        assert ll.shape == (len(X),) and ll.dtype == np.float64
        np.testing.assert_allclose(ll, exact, atol=2e-3)


def test_iwae_approaches_log_px_from_below_as_k_grows():
    m, X, exact = linear_gaussian(exact_posterior=False)
    n = len(X)
    elbo = ev.elbo_terms(m, X, n_samples=4000, seed=0)["elbo"]
    # relative variance v of the importance weights w / p(x), measured on fresh draws: the K-sample
    # estimate has bias about v / (2K) below log p(x) and standard deviation about sqrt(v / K)
    # (delta method), so its mean over n samples lies within v / (2K) + 4 sqrt(v / K) / sqrt(n)
    with torch.inference_mode():
        torch.manual_seed(123)
        lw = m.log_weights(X, 20000).double()                               # (K, n)
        w = torch.exp(lw - torch.logsumexp(lw, 0) + math.log(20000))        # w / mean(w) per sample
        v = float(w.var(0).mean())
    tol = {k: v / (2 * k) + 4 * math.sqrt(v / k) / math.sqrt(n) for k in (10, 100, 3000)}
    gap = {k: float((exact - ev.iwae_log_likelihood(m, X, k, seed=k)).mean()) for k in (1, 10, 100, 3000)}
    # the ELBO lies below log p(x) by the mean KL(q(z|x) || p(z|x)) (here ~0.67 nats, with a Monte Carlo
    # error under 0.01 at 4000 draws), and below every IWAE estimate with K >= 10
    elbo_gap = float(exact.mean() - elbo.mean())
    assert elbo_gap > 10 * tol[3000]
    for k in (10, 100, 3000):
        assert elbo.mean() < exact.mean() - gap[k]
        assert abs(gap[k]) < tol[k], (k, gap, tol)
    # K = 1 is an unbiased ELBO estimate: as far off as the ELBO, within its own error (4 s.e.)
    se1 = float(np.std(exact - ev.iwae_log_likelihood(m, X, 1, seed=1)) / math.sqrt(n))
    assert abs(gap[1] - elbo_gap) < 4 * se1 + 0.01
    assert tol[3000] < tol[100] < tol[10]


def test_log_likelihood_uses_the_models_weights_with_each_rows_noise():
    # the estimate is log mean exp of the model's own log-weights for each row's seeded noise
    torch.manual_seed(0)
    m = VAEModule(ModelConfig(latent_dim=3, hidden=(8,), input_dim=5)).eval()
    x = torch.rand(4, 5)
    ll = ev.iwae_log_likelihood(m, x, 10, seed=7)
    with torch.inference_mode():
        eps = torch.stack([ev._draw(ev._row_generator(7, j, x.device), 10, x[:, :3]) for j in range(4)], 1)
        lw = m.draw(x, eps, weights=True).log_w.double()                   # (10, 4)
    np.testing.assert_allclose(ll, (torch.logsumexp(lw, 0) - math.log(10)).numpy(), rtol=0, atol=1e-4)


def test_to_tensor_checks_the_shape():
    m = VAEModule(ModelConfig(latent_dim=2, hidden=(4,), input_dim=3))
    x = ev.to_tensor(m, np.zeros((2, 3)))
    assert x.dtype == torch.float32 and x.shape == (2, 3)
    with pytest.raises(DataError, match="expected shape"):
        ev.to_tensor(m, np.zeros(3))


def test_chunking_and_batching_do_not_change_the_figures():
    # each row draws from its own (seed, row) generator, so the chunking of k and the batching of
    # rows change only float32 rounding (summation order), even with an inexact posterior
    m, X, _ = linear_gaussian(exact_posterior=False)
    a = ev.iwae_log_likelihood(m, X, 50, chunk_size=7, batch_size=3)
    b = ev.iwae_log_likelihood(m, X, 50, chunk_size=50, batch_size=40)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    # a row's estimate does not depend on the rows around it
    np.testing.assert_allclose(ev.iwae_log_likelihood(m, X[:5], 50), a[:5], rtol=0, atol=1e-4)
    # and the seed makes a run reproducible without touching the global generator
    m2, X2, _ = linear_gaussian(exact_posterior=False)
    torch.manual_seed(9)
    expected_next = torch.rand(1)
    torch.manual_seed(9)
    r1 = ev.iwae_log_likelihood(m2, X2, 20, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    r2 = ev.iwae_log_likelihood(m2, X2, 20, seed=3)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, ev.iwae_log_likelihood(m2, X2, 20, seed=4))


def test_bits_per_dim():
    np.testing.assert_allclose(ev.bits_per_dim([10 * math.log(2), 0.0], 10), [1.0, 0.0])


def test_active_units_counts_dimensions_whose_mean_varies():
    rng = np.random.default_rng(0)
    mu = np.stack([rng.normal(0, 1, 500), rng.normal(0, 0.05, 500), np.full(500, 3.0)], 1)
    count, activity = ev.active_units(mu)
    assert count == 1
    np.testing.assert_allclose(activity, mu.var(0))
    assert ev.active_units(mu, threshold=1e-4)[0] == 2


def test_mi_is_zero_and_aggregate_kl_is_the_kl_when_every_posterior_is_the_same():
    n, d = 300, 3
    mu = np.tile([[0.5, -1.0, 0.0]], (n, 1))
    sigma = np.tile([[0.3, 1.0, 2.0]], (n, 1))
    st = ev.aggregate_posterior_stats(mu, sigma, None, seed=0)
    assert abs(st["mutual_information"]) < 1e-9  # q(z) = q(z|x) exactly: every term is zero
    kl = float(np.sum(0.5 * (sigma[0]**2 + mu[0]**2 - 1) - np.log(sigma[0])))
    # Monte Carlo over 300 seeded draws: 4 standard errors
    assert abs(st["aggregate_kl"] - kl) < 4 * st["aggregate_kl_se"]
    prior = ev.aggregate_posterior_stats(np.zeros((n, d)), np.ones((n, d)), None, seed=0)
    assert abs(prior["aggregate_kl"]) < 1e-9 and abs(prior["mutual_information"]) < 1e-9


def test_mi_reaches_log_n_for_a_code_that_identifies_every_sample():
    n = 200
    mu = np.arange(n, dtype=np.float64)[:, None] * np.ones((1, 2))
    sigma = np.full((n, 2), 1e-3)
    st = ev.aggregate_posterior_stats(mu, sigma, None, seed=0)
    assert abs(st["mutual_information"] - math.log(n)) < 1e-6


def test_mi_plus_aggregate_kl_is_the_mean_kl():
    # E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z)) exactly; the estimates share their draws, so their
    # sum is a Monte Carlo estimate of the left side: within 4 standard errors (the sum's s.e. is at most
    # the sum of the two)
    rng = np.random.default_rng(3)
    n, d = 400, 3
    mu = rng.normal(0, 1, (n, d)) * [1.5, 0.5, 0.0]
    sigma = np.exp(rng.normal(-1, 0.3, (n, d)))
    st = ev.aggregate_posterior_stats(mu, sigma, None, seed=1)
    mean_kl = float(np.mean(np.sum(0.5 * (sigma**2 + mu**2 - 1) - np.log(sigma), 1)))
    total = st["mutual_information"] + st["aggregate_kl"]
    assert abs(total - mean_kl) < 4 * (st["mutual_information_se"] + st["aggregate_kl_se"])
    assert 0 < st["mutual_information"] <= math.log(n)
    sub = ev.aggregate_posterior_stats(mu, sigma, 100, seed=1)
    assert sub["draws"] == 100


def test_mixture_density_matches_direct_computation():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=(30, 4)), np.exp(rng.normal(-2, 0.5, (30, 4)))
    z = torch.as_tensor(rng.normal(size=(7, 4)))
    got = ev._log_mixture(z, torch.as_tensor(mu), torch.as_tensor(sigma))
    comp = torch.distributions.Normal(torch.as_tensor(mu), torch.as_tensor(sigma)).log_prob(z[:, None]).sum(-1)
    want = torch.logsumexp(comp, 1) - math.log(30)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-10)


def test_evaluate_returns_every_metric_with_per_sample_shapes():
    m, X, exact = linear_gaussian(exact_posterior=False)
    r = ev.evaluate(m, X, iw_samples=20, aggregate_draws=None)
    n = len(X)
    assert r.elbo.shape == r.rec.shape == r.kl.shape == r.log_likelihood.shape == (n,)
    assert r.kl_dim.shape == (n, D) and r.activity.shape == (D,)
    np.testing.assert_allclose(r.elbo, r.rec - r.kl)
    np.testing.assert_allclose(r.kl, r.kl_dim.sum(1))
    d = r.to_dict()
    json.dumps(d)
    assert d["bits_per_dim"] == pytest.approx(d["nll"] / (P * math.log(2)))
    assert d["nll"] == pytest.approx(-r.log_likelihood.mean())
    assert ev.evaluate(m, X, iw_samples=0).log_likelihood is None


def test_vae_api_log_likelihood_and_evaluate():
    from vaelens import VAE

    rng = np.random.default_rng(0)
    X = (rng.random((120, 10)) < 0.3).astype(np.float32)
    vae = VAE(latent_dim=2, hidden=(8,)).fit(X, epochs=2)
    ll = vae.log_likelihood(X[:15], k=30)
    assert ll.shape == (15,) and np.isfinite(ll).all() and (ll < 0).all()
    res = vae.evaluate(X[:15], iw_samples=30)
    np.testing.assert_array_equal(res.log_likelihood, ll)  # same seed, same draws
    with pytest.raises(Exception, match="features"):
        vae.log_likelihood(X[:3, :5], k=2)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    r = cli("train", "--epochs", "2", "--limit", "200", "--hidden", "16", "--latent-dim", "3", "--out", out,
            "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


_cli = cli  # in-process; see _helpers.cli


def test_cli_evaluate_prints_a_table_and_writes_json(digits_run, tmp_path):
    js = tmp_path / "e.json"
    r = _cli("evaluate", digits_run, "--iw-samples", 40, "--limit", 60, "--json", js)
    assert r.returncode == 0, r.stderr
    for word in ("ELBO", "IWAE k=40", "bits/dim", "active units", "I(x; z)", "KL(q(z) || p(z))"):
        assert word in r.stdout
    d = json.loads(js.read_text())
    assert d["n"] == 60 and d["features"] == 64 and d["iw_samples"] == 40 and d["split"] == "test"
    assert d["bits_per_dim"] == pytest.approx(d["nll"] / (64 * math.log(2)))
    # IWAE with K = 40 is a tighter bound than the ELBO; the gap on a 2-epoch model is far larger than the
    # standard errors printed beside them
    assert d["elbo"] < d["log_likelihood"]
    assert 0 <= d["active_units"] <= 3 and len(d["activity"]) == 3
    # an existing JSON file is not overwritten without --force
    again = _cli("evaluate", digits_run, "--iw-samples", 5, "--limit", 10, "--json", js)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(js.read_text())["iw_samples"] == 40
    bad = _cli("evaluate", digits_run, "--iw-samples", -1)
    assert bad.returncode == 2 and "--iw-samples" in bad.stderr and "Traceback" not in bad.stderr
