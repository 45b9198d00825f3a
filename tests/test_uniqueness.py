"""Uniqueness of mu(x), sigma(x): batch invariance, latent symmetries, cross-seed comparison, PPCA ground truth."""

import json

import numpy as np
import pytest
import torch

from _helpers import cli
from vaelens import VAE
from vaelens.errors import ConfigError
from vaelens.groundtruth import ppca
from vaelens.posterior import batch_dependent_layers
from vaelens.uniqueness import (PERMUTATION_RTOL, batch_invariance, compare, linear_cka, plane_rotation, rotate,
                                signed_permutation, symmetry_report)


# --- within one model --------------------------------------------------------------------------

def test_same_x_same_posterior_whatever_the_batch(digits_vae):
    vae, X = digits_vae
    r = batch_invariance(vae.module_, vae._tensor(X), batch_sizes=(1, 7, 64))
    assert r.passed and r.layers == []
    assert r.max_abs_mu <= 1e-5 and r.max_abs_sigma <= 1e-5


def test_guard_names_batch_dependent_layers(digits_vae):
    import copy

    vae, X = digits_vae
    m = copy.deepcopy(vae.module_)
    m.encoder.trunk = torch.nn.Sequential(m.encoder.trunk, torch.nn.BatchNorm1d(16))
    assert batch_dependent_layers(m) == ["trunk.1"]
    with pytest.warns(UserWarning, match="batch-dependent"):
        batch_invariance(m, vae._tensor(X[:20]))


# --- symmetries --------------------------------------------------------------------------------

def test_signed_permutation_moves_mu_but_not_the_elbo(digits_vae):
    vae, X = digits_vae
    Xt = vae._tensor(X)
    perm, signs = [2, 0, 1], [-1.0, 1.0, -1.0]
    pm = signed_permutation(vae.module_, perm, signs)
    with torch.inference_mode():
        q0, q1 = vae.module_.encoder(Xt), pm.encoder(Xt)
    np.testing.assert_allclose(q1.mean.numpy(), (np.array(signs) * q0.mean.numpy()[:, perm]), atol=1e-5)
    np.testing.assert_allclose(q1.stddev.numpy(), q0.stddev.numpy()[:, perm], atol=1e-6)
    r = symmetry_report(vae.module_, Xt, seed=0)
    assert r.perm_invariant and r.perm_max_rel_diff <= PERMUTATION_RTOL
    assert r.mu_max_change > 0.01 and r.mu_map_error < 1e-10
    with pytest.raises(ConfigError):
        signed_permutation(vae.module_, [0, 0, 1], [1, 1, 1])


def test_estimator_symmetry_takes_the_commands_options(digits_vae):
    """VAE.symmetry measures what `vaelens symmetry` measures: the kinds and counts asked for, the floor given."""
    vae, X = digits_vae
    r = vae.symmetry(X[:100], seed=1, n_rotations=0, n_samples=2, n_permutations=2, n_orthogonal=1, atol=0.5)
    assert r.kinds["signed permutation"]["tried"] == 2 and r.kinds["orthogonal"]["tried"] == 1
    assert r.kinds["plane rotation"]["tried"] == 0 and r.atol == 0.5
    assert r.perm_invariant


def test_rotation_keeps_the_mean_path_and_prior(digits_vae):
    vae, X = digits_vae
    Xt = vae._tensor(X[:50])
    R = plane_rotation(3, 0, 2)
    rm = rotate(vae.module_, R)
    with torch.inference_mode():
        q0, q1 = vae.module_.encoder(Xt), rm.encoder(Xt)
        np.testing.assert_allclose(q1.mean.numpy(), q0.mean.numpy() @ R.T.astype(np.float32), atol=1e-5)
        # the decoder reads R^T z, so the posterior means decode to the same output
        np.testing.assert_allclose(rm.decoder(q1.mean).mean.numpy(), vae.module_.decoder(q0.mean).mean.numpy(),
                                   atol=1e-5)
    with pytest.raises(ConfigError):
        rotate(vae.module_, np.ones((3, 3)))


# --- compare -----------------------------------------------------------------------------------

def _codes(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, 3)) * np.array([1.5, 1.0, 0.7])
    sigma = np.exp(rng.normal(size=(n, 3)) * 0.2) * 0.3
    return mu, sigma


def test_compare_sees_a_signed_permutation_as_the_same_code():
    mu, sigma = _codes()
    rng = np.random.default_rng(1)
    mu_b = -mu[:, [2, 0, 1]] * np.array([1.0, 2.0, 0.5]) + 0.01 * rng.normal(size=mu.shape)
    c = compare(mu, mu_b, sigma, sigma[:, [2, 0, 1]])
    assert c.mcc_pearson > 0.99 and c.mcc_spearman > 0.99 and min(c.r2_ab, c.r2_ba) > 0.99
    assert sorted(map(tuple, c.pairs.tolist())) == [(0, 1), (1, 2), (2, 0)]
    np.testing.assert_allclose(c.sigma_corr, 1.0)
    assert "signed permutation" in c.verdict()
    json.dumps(c.to_dict())


def test_compare_separates_rotation_and_unrelated_codes():
    mu, sigma = _codes()
    R = plane_rotation(3, 0, 1)
    rot = compare(mu, mu @ R.T, sigma, sigma)
    # 45 degrees in the (0, 1) plane: matched |corr| there is about 0.7 (MCC ~0.8), but a linear map recovers it exactly
    assert rot.mcc_pearson < 0.9 and min(rot.r2_ab, rot.r2_ba) > 0.999
    assert rot.cka == pytest.approx(1.0)  # linear CKA cannot see an orthogonal map
    assert "linear map" in rot.verdict()
    other, _ = _codes(seed=5)
    # independent codes: held-out correlations are ~N(0, 1/500); 0.2 is many standard errors away
    unrel = compare(mu, other, sigma, sigma)
    assert unrel.mcc_pearson < 0.2 and max(unrel.r2_ab, unrel.r2_ba) < 0.05
    assert "different" in unrel.verdict()


def test_compare_reports_inactive_latents_apart():
    mu, sigma = _codes()
    a = np.hstack([mu, np.zeros((len(mu), 1))])           # a collapsed 4th latent
    b = np.hstack([np.full((len(mu), 1), 0.3), mu[:, ::-1]])
    sa = np.hstack([sigma, np.ones((len(mu), 1))])
    sb = np.hstack([np.ones((len(mu), 1)), sigma])
    c = compare(a, b, sa, sb)
    assert c.inactive_a.tolist() == [3] and c.inactive_b.tolist() == [0]
    assert len(c.pairs) == 3 and 3 not in c.pairs[:, 0] and 0 not in c.pairs[:, 1]
    assert c.mcc_pearson > 0.999


def test_linear_cka_is_invariant_to_rotation_and_scale():
    mu, _ = _codes()
    Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert linear_cka(mu, 3.0 * mu @ Q) == pytest.approx(1.0)


# --- PPCA ground truth: what a linear VAE can and cannot recover -------------------------------

def _linear_vae(gt, seed):
    # hidden=() gives mu = A x + b, sigma = softplus(c) + floor and a linear decoder: the VAE can
    # represent PPCA's exact posterior; the decoder scale is fixed at the true noise.
    vae = VAE(latent_dim=gt.W.shape[1], hidden=(), likelihood="gaussian", gaussian_scale="fixed",
              fixed_scale=gt.noise_std, lr=1e-2, batch_size=200, val_fraction=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 6x2 matrices: a second thread only adds synchronisation on a busy machine
    try:
        return vae.fit(gt.X, epochs=150, seed=seed)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distinct():
    gt = ppca(n=2000, norms=(3.0, 1.0), p=6, noise_std=0.5, seed=0)
    return gt, _linear_vae(gt, 0), _linear_vae(gt, 1)


@pytest.fixture(scope="module")
def equal():
    gt = ppca(n=2000, norms=(2.0, 2.0), p=6, noise_std=0.5, seed=0)
    return gt, _linear_vae(gt, 0), _linear_vae(gt, 2)


def test_linear_vae_recovers_the_exact_posterior_up_to_signed_permutation(distinct):
    gt, vae, _ = distinct
    post = vae.encode(gt.X)
    c = compare(gt.post_mu, post.mu, gt.post_sigma, post.sigma)
    # Seeded training for 150 epochs reaches |corr| > 0.999 and sigma within ~3% of the exact
    # values (the gap is the finite sample: the model fits the sample covariance, not the true one).
    assert c.mcc_pearson > 0.99 and min(c.r2_ab, c.r2_ba) > 0.98
    np.testing.assert_allclose(c.sigma_b, c.sigma_a, rtol=0.1)
    # with the exact posterior the ELBO equals log p(x); the learned one is within 0.05 nats per sample
    assert abs(vae.elbo(gt.X, n_samples=20).mean() - gt.log_likelihood.mean()) < 0.05


def test_distinct_norms_agree_across_seeds_and_resist_rotation(distinct):
    gt, a, b = distinct
    pa, pb = a.encode(gt.X), b.encode(gt.X)
    c = compare(pa.mu, pb.mu, pa.sigma, pb.sigma)
    assert c.mcc_pearson > 0.98 and "signed permutation" in c.verdict()
    r = symmetry_report(a.module_, a._tensor(gt.X), n_rotations=1)
    # 45 degrees between latents whose exact posterior stds differ (0.16 vs 0.45): a large, paired drop
    assert r.perm_invariant and r.rotation_significant and r.rotation_drop[0] > 0.1


def test_equal_norms_are_unique_only_up_to_rotation(equal):
    gt, vae, _ = equal
    post = vae.encode(gt.X)
    np.testing.assert_allclose(post.sigma.mean(0), gt.post_sigma[0], rtol=0.1)
    r = symmetry_report(vae.module_, vae._tensor(gt.X), n_rotations=1)
    # the exact posterior is isotropic, so a 45-degree rotation is another optimum: no significant
    # drop (paired over 2000 samples, 3 standard errors) and at most a few thousandths of a nat
    assert not r.rotation_significant and abs(r.rotation_drop[0]) < 0.02
    # ...and that equally good model encodes every sample differently, axis by axis
    rm = rotate(vae.module_, plane_rotation(2, 0, 1))
    with torch.inference_mode():
        q = rm.encoder(vae._tensor(gt.X))
    c = compare(post.mu, q.mean.numpy(), post.sigma, q.stddev.numpy())
    assert c.mcc_pearson < 0.8 and min(c.r2_ab, c.r2_ba) > 0.999


def test_equal_norms_retrainings_disagree_axis_by_axis(equal, distinct):
    gt, a, b = equal
    pa, pb = a.encode(gt.X), b.encode(gt.X)
    c = compare(pa.mu, pb.mu, pa.sigma, pb.sigma)
    # Two seeded retrainings: the same code up to a linear map, but the axes differ (a rotation is free
    # when the loading norms are equal). Measured: MCC 0.71 (seeds 0 and 2), R^2 1.000. Not every pair of
    # seeds lands on different axes (seeds 0 and 1 happen to agree, docs/posterior.md), so the seeds are
    # fixed; the contrast is the distinct-norm pair, whose MCC is above 0.98 by the test above.
    assert c.mcc_pearson < 0.9 and min(c.r2_ab, c.r2_ba) > 0.99
    gd, da, db = distinct
    cd = compare(da.encode(gd.X).mu, db.encode(gd.X).mu)
    assert cd.mcc_pearson > c.mcc_pearson + 0.08


# --- CLI ---------------------------------------------------------------------------------------

_cli = cli  # in-process; see _helpers.cli


def test_cli_symmetry_and_compare(digits_run, tmp_path):
    r = _cli("symmetry", digits_run, "--limit", "200", "--rotations", "2", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert "unchanged under signed permutation" in r.stdout
    assert json.loads((tmp_path / "s.json").read_text())["perm_invariant"] is True
    r = _cli("compare", digits_run, digits_run, "--limit", "300", "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert "verdict: same code up to a signed permutation" in r.stdout
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["pairs"][0]["mcc_pearson"] == pytest.approx(1.0)
    r = _cli("compare", digits_run)
    assert r.returncode == 2 and "at least two" in r.stderr and "Traceback" not in r.stderr
