"""The true posterior, q* and the two gaps (issue #18), against probabilistic PCA's closed forms.

With a linear Gaussian decoder set to PPCA's true parameters, p(z|x) is the exact Gaussian of
`groundtruth.exact_posterior`; with orthogonal loadings it is diagonal, so the approximation gap
is zero and the amortization gap of any encoder is KL(q || p(z|x)). Tolerances are stated where
they are used: Monte Carlo ones in standard errors (the estimators' own), optimization ones in nats.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaelens import VAE
from vaelens.config import ModelConfig
from vaelens.evaluate import iwae_log_likelihood
from vaelens.gap import inference_gaps, pareto_k, refine, tail_length, true_posterior
from vaelens.groundtruth import ppca
from vaelens.model import VAEModule
from vaelens.uniqueness import compare


def _softplus_inv(y):
    return y + torch.log(-torch.expm1(-y))


def _ppca_module(gt, shift=(0.0, 0.0), scale=(1.0, 1.0)):
    """A linear Gaussian VAE with PPCA's true decoder and its exact encoder, moved by `shift`
    (in exact posterior stds) and `scale` (multiplying the exact std): set by hand, not trained."""
    p, d = gt.W.shape
    m = VAEModule(ModelConfig(latent_dim=d, hidden=(), likelihood="gaussian", gaussian_scale="fixed",
                              fixed_scale=gt.noise_std, input_dim=p))
    s2 = gt.noise_std ** 2
    A = np.linalg.inv(gt.W.T @ gt.W + s2 * np.eye(d)) @ gt.W.T              # (d, p): E[z|x] = A (x - m)
    std = np.sqrt(np.diag(gt.post_cov))                                      # (d,)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)       # noqa: E731
    with torch.no_grad():
        m.decoder.first.weight.copy_(t(gt.W))
        m.decoder.first.bias.copy_(t(gt.mean))
        m.encoder.mu_head.weight.copy_(t(A))
        m.encoder.mu_head.bias.copy_(t(-A @ gt.mean + np.asarray(shift) * std))
        m.encoder.sigma_head.weight.zero_()
        m.encoder.sigma_head.bias.copy_(_softplus_inv(t(std * np.asarray(scale)) - m.encoder.sigma_floor))
    return m.eval()


@pytest.fixture(scope="module")
def diag_gt():
    # distinct orthogonal loadings: the exact posterior is diagonal, std 0.16 and 0.45
    return ppca(n=200, norms=(3.0, 1.0), p=6, noise_std=0.5, seed=0)


def test_pareto_k_recovers_known_tail_shapes():
    # log-weights whose weights are Pareto with shape xi: the PSIS fit's median over 40 samples is
    # within 0.15 of xi (single fits of 95 tail points scatter by about 0.15); equal weights give -inf
    rng = np.random.default_rng(0)
    M = tail_length(1000)
    for xi in (0.2, 0.5, 0.9):
        lw = np.log1p(rng.pareto(1 / xi, size=(40, 1000)))
        assert abs(np.median(pareto_k(np.sort(lw, 1)[:, -(M + 1):])) - xi) < 0.15
    assert np.all(pareto_k(np.zeros((3, M + 1))) == -np.inf)


def test_importance_moments_match_the_exact_posterior(diag_gt):
    # Shown to fail: the variance without its - mean^2 term (`_Running.finish`).
    gt = diag_gt
    # a proposal wider than p(z|x) in every direction: bounded weights, well-behaved moments
    module = _ppca_module(gt, shift=(0.5, -0.4), scale=(1.5, 1.2))
    x = torch.as_tensor(gt.X)
    tp = true_posterior(module, x, k=2000, seed=0)
    # the mean's error in its own delta-method s.e.: ~N(0, 1) per entry, so 5 s.e. over 400 entries
    z = (tp.mean - gt.post_mu) / tp.mean_se
    assert np.abs(z).max() < 5 and 0.6 < np.mean(z ** 2) < 1.5
    # the std's error in its delta-method s.e. (through the variance's): the same 5 s.e.
    zs = (tp.std - gt.post_sigma) / tp.std_se
    assert np.abs(zs).max() < 5 and 0.6 < np.mean(zs ** 2) < 1.5
    assert tp.reliable.all() and np.all(tp.ess > 300) and np.all(tp.pareto_k < 0.7)
    # log p(x): exact within 5 s.e. plus IWAE's downward bias, about (1/ESS - 1/k) / 2
    assert np.all(np.abs(tp.log_px - gt.log_likelihood) < 5 * tp.log_px_se + 1 / tp.ess)
    # the same weights, draw for draw, as the evaluation's IWAE estimate with the same seed
    np.testing.assert_allclose(tp.log_px, iwae_log_likelihood(module, x, 2000, seed=0), atol=1e-6)
    np.testing.assert_allclose(tp.distance.mean(0), [0.5, 0.4], atol=0.05)
    np.testing.assert_allclose(tp.std_ratio.mean(0), [1.5, 1.2], rtol=0.03)
    # a proposal half as wide as p(z|x) in one direction (below 1/sqrt(2): the weights' variance is
    # infinite): the Pareto-k diagnostic flags a large share of the samples
    bad = true_posterior(_ppca_module(gt, shift=(0.5, -0.4), scale=(1.0, 0.5)), x, k=2000, seed=0)
    assert (~bad.reliable).mean() > 0.3 and np.median(bad.pareto_k) > 0.7


def test_gaps_on_ppca_are_zero_and_the_kl_to_the_exact_posterior(diag_gt):
    # Shown to fail: `refine` without `opt.step()` (q* = q: amortization gap 0, not the KL).
    gt = diag_gt
    module = _ppca_module(gt, shift=(0.8, -0.6), scale=(1.5, 1.2))
    x = torch.as_tensor(gt.X[:100])
    g = inference_gaps(module, x, k=1000, steps=300, seed=0)
    # closed form: KL(q || p(z|x)) between the encoder's diagonal Normal and the exact posterior
    q = Normal(torch.as_tensor(g.posterior.mu), torch.as_tensor(g.posterior.sigma))
    exact = MultivariateNormal(torch.as_tensor(gt.post_mu[:100]), torch.as_tensor(gt.post_cov))
    kl = kl_divergence(MultivariateNormal(q.loc, scale_tril=torch.diag_embed(q.scale)), exact).numpy()
    # q* is the exact posterior up to the optimizer's final jitter; 0.01 nats of it is allowed
    # (about 0.04 stds of error in the mean and 2% in the std: a KL of ~1e-3 nats)
    avg = g.averages()
    assert abs(avg["approximation_gap"]["mean"]) < 4 * avg["approximation_gap"]["mc_se"] + 0.01
    assert np.all(np.abs(g.approximation_gap) < 5 * g.approximation_gap_se + 0.01)
    diff = g.amortization_gap - kl
    assert abs(diff.mean()) < 4 * np.sqrt(np.sum(g.amortization_gap_se ** 2)) / len(diff) + 0.01
    assert np.all(np.abs(diff) < 5 * g.amortization_gap_se + 0.01)
    # q*'s mean and std: the optimizer's jitter with 4 draws per step is about 0.04 exact stds in the
    # mean and 2% in the std (measured over 100 samples; its KL cost is ~1e-3 nats)
    err = (g.mu_opt - gt.post_mu[:100]) / gt.post_sigma[:100]
    assert np.abs(err).max() < 0.25 and np.abs(err).mean() < 0.08 and np.abs(err.mean(0)).max() < 0.03
    np.testing.assert_allclose(g.sigma_opt, gt.post_sigma[:100], rtol=0.1)


def test_correlated_posterior_has_the_best_diagonal_gaussians_gap():
    # Shown to fail: `refine` without `opt.step()`.
    # non-orthogonal loadings: p(z|x) = N(mu, Sigma) is correlated; the best diagonal Gaussian is
    # N(mu, diag(1 / Lambda_jj)) with Lambda = Sigma^-1, and the approximation gap is its KL to p
    W = np.array([[2.0, 1.2], [0.5, 1.0], [1.0, -0.3], [0.0, 0.8]])
    gt = ppca(n=60, loadings=W, noise_std=0.5, seed=3)
    module = _ppca_module(gt)
    g = inference_gaps(module, torch.as_tensor(gt.X), k=2000, steps=400, seed=0)
    prec = np.linalg.inv(gt.post_cov)
    s_star = 1 / np.sqrt(np.diag(prec))
    qs = MultivariateNormal(torch.as_tensor(gt.post_mu), scale_tril=torch.diag(torch.as_tensor(s_star)))
    kl = float(kl_divergence(qs, MultivariateNormal(torch.as_tensor(gt.post_mu), torch.as_tensor(gt.post_cov)))[0])
    avg = g.averages()["approximation_gap"]
    assert kl > 0.05 and abs(avg["mean"] - kl) < 4 * avg["mc_se"] + 0.01
    np.testing.assert_allclose(g.sigma_opt, np.broadcast_to(s_star, g.sigma_opt.shape), rtol=0.1)  # jitter as above


def test_refine_is_batch_invariant_and_seeded(diag_gt):
    module = _ppca_module(diag_gt, shift=(1.0, 1.0))
    x = torch.as_tensor(diag_gt.X[:30])
    a = refine(module, x, 50, seed=1)
    b = refine(module, x[:10], 50, seed=1)
    np.testing.assert_allclose(a[0][:10].numpy(), b[0].numpy(), atol=1e-6)
    assert not np.allclose(a[0].numpy(), refine(module, x, 50, seed=2)[0].numpy())
    for p in module.parameters():
        assert p.requires_grad and p.grad is None  # the module itself is untouched


def test_nonlinear_model_orders_the_bounds(digits_vae):
    vae, X = digits_vae
    g = vae.inference_gaps(X[:60], k=500, steps=150, seed=0, proposal="encoder")
    avg = g.averages()
    # q* maximizes the ELBO from the encoder's start and log p(x) bounds every ELBO: on average
    # L[q] <= L[q*] <= log p(x), each within 3 Monte Carlo s.e. of the difference
    assert avg["amortization_gap"]["mean"] > -3 * avg["amortization_gap"]["mc_se"]
    assert avg["approximation_gap"]["mean"] > -3 * avg["approximation_gap"]["mc_se"]
    assert np.mean(g.amortization_gap > -3 * g.amortization_gap_se) > 0.95
    assert g.mu_opt.shape == (60, 3) and np.all(g.sigma_opt > 0)
    json.dumps(g.to_dict())
    r = vae.encode(X[:60], refine=150, seed=0)
    np.testing.assert_allclose(r.mu, g.mu_opt, atol=1e-5)
    np.testing.assert_allclose(vae.encode(X[:5], refine=0).mu, vae.encode(X[:5]).mu)
    np.testing.assert_allclose(g.log_px, vae.log_likelihood(X[:60], k=500, seed=0), atol=1e-6)
    # q* as the proposal (the default): closer to p(z|x), so more effective draws, and the same
    # posterior within the Monte Carlo error of the two estimates (5 s.e. of their difference)
    gr = vae.inference_gaps(X[:60], k=500, steps=150, seed=0)
    assert gr.posterior.proposal == "refined" and np.median(gr.posterior.ess) > np.median(g.posterior.ess)
    se = np.hypot(g.posterior.mean_se, gr.posterior.mean_se)
    ok = g.posterior.reliable & gr.posterior.reliable
    assert np.all(np.abs(g.posterior.mean - gr.posterior.mean)[ok] < 5 * se[ok])
    assert np.allclose(vae.true_posterior(X[:10], k=500, refine=150).mean, gr.posterior.mean[:10])


@pytest.fixture(scope="module")
def trained_linear():
    gt = ppca(n=2000, norms=(3.0, 1.0), p=6, noise_std=0.5, seed=0)
    vae = VAE(latent_dim=2, hidden=(), likelihood="gaussian", gaussian_scale="fixed", fixed_scale=gt.noise_std,
              lr=1e-2, batch_size=200, val_fraction=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return gt, vae.fit(gt.X, epochs=150, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_acceptance_trained_linear_vae_finds_the_exact_posterior(trained_linear):
    gt, vae = trained_linear
    X = gt.X[:500]
    tp = vae.true_posterior(X, k=1000, seed=0)
    c = compare(gt.post_mu[:500], tp.mean, gt.post_sigma[:500], tp.std)
    assert c.mcc_pearson > 0.998
    np.testing.assert_allclose(c.sigma_b, c.sigma_a, rtol=0.05)
    g = vae.inference_gaps(X[:200], k=1000, steps=200, seed=0)
    assert abs(g.averages()["approximation_gap"]["mean"]) < 0.05


def test_cli_gap_and_encode_refine(digits_run, tmp_path, capsys):
    from vaelens.cli import main

    out = tmp_path / "gap.json"
    rc = main(["gap", str(digits_run), "--n", "20", "--k", "200", "--steps", "30", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "amortization gap" in text and "sigma / Std_p" in text
    d = json.loads(out.read_text())
    assert d["settings"]["k"] == 200 and len(d["true_posterior"]["distance_per_dim"]) == 4
    for bad in (["--k", "1"], ["--n", "0"], ["--steps", "-1"]):
        assert main(["gap", str(digits_run), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0]
    assert main(["gap", str(digits_run), "--n", "5", "--json", str(out)]) == 2  # exists, no --force
    assert main(["gap", str(tmp_path / "missing")]) == 2
    enc = tmp_path / "post.npz"
    assert main(["encode", str(digits_run), "--out", str(enc), "--refine", "10"]) == 0
    assert "refined" in capsys.readouterr().out
    assert main(["encode", str(digits_run), "--out", str(tmp_path / "x.npz"), "--refine", "-1"]) == 2
    assert math.isfinite(np.load(enc)["sigma"].sum())


def test_posterior_cloud_keeps_true_posteriors_draws_and_weights(digits_vae):
    vae, X = digits_vae
    for refine_steps in (0, 40):
        tp = vae.true_posterior(X[:3], k=300, seed=2, refine=refine_steps)
        c = vae.posterior_cloud(X[:3], k=300, seed=2, refine=refine_steps)
        assert c.z.shape == (3, 300, vae.latent_dim_) and c.weights.shape == (3, 300)
        np.testing.assert_allclose(c.weights.sum(1), 1.0, atol=1e-12)
        # the same noise, proposal and weights as the running sums: the same E_p[z] and ESS
        np.testing.assert_allclose(c.mean, tp.mean, atol=1e-5)
        np.testing.assert_allclose(1 / np.square(c.weights).sum(1), tp.ess, rtol=1e-4)
        np.testing.assert_allclose(c.mu, tp.mu, atol=1e-6)
        assert c.proposal == ("refined" if refine_steps else "encoder")
    np.testing.assert_allclose(c.loc, vae.encode(X[:3], refine=40, seed=2).mu, atol=1e-5)
    # one row alone gets row 0's stream: the first row's cloud again
    np.testing.assert_allclose(vae.posterior_cloud(X[:1], k=300, seed=2, refine=40).z[0], c.z[0], atol=1e-6)
