"""vaelens.latentview: the prior's marginal densities that report and serve draw, against independent
computations (the mixture formula from the module's own parameters, Monte Carlo from `prior_sample`,
and N(0, I)'s closed-form contour levels)."""

import numpy as np
import pytest
import torch

from vaelens import VAE
from vaelens.data import load_digits
from vaelens.latentview import (SIGMA_MASSES, blocks, family_text, mass_levels, prior_density_1d, prior_density_2d,
                                prior_name, prior_overlay)


@pytest.fixture(scope="module")
def X():
    return load_digits().X[:300]


@pytest.fixture(scope="module")
def mog(X):
    return VAE(latent_dim=3, hidden=(16,), prior="mog", prior_components=4, batch_size=100).fit(X, epochs=3, seed=0)


@pytest.fixture(scope="module")
def vamp(X):
    # 20 epochs: enough for correlated components (|corr| about 0.3 in z0, z1), which a marginal that
    # dropped the off-diagonal covariance would get wrong
    return VAE(latent_dim=3, hidden=(16,), posterior="full", prior="vamp", prior_components=6,
               batch_size=100).fit(X, epochs=20, seed=0)


def _normal(t, m, s):
    return np.exp(-0.5 * ((t - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))


def test_names():
    class M:  # the three priors as model configs name them
        def __init__(self, prior, k, posterior="diagonal"):
            self.prior, self.components, self.posterior = prior, k, posterior

    assert prior_name(M("normal", 1)) == "N(0, I)"
    assert prior_name(M("mog", 10)) == "MoG, K=10"
    assert prior_name(M("vamp", 100)) == "VampPrior, K=100"
    assert "full-covariance" in family_text(M("vamp", 100, "full")) and "VampPrior, K=100" in family_text(M("vamp", 100))


def test_mog_marginals_are_the_mixture_formula(mog):
    """p(z_i, z_j) and p(z_j) equal sum_k w_k N(z_i; m_ki, s_ki) N(z_j; m_kj, s_kj), written out in numpy
    from the module's parameters (weights softmax(logits), scales softplus(raw) + floor)."""
    mod = mog.module_
    with torch.no_grad():
        w = torch.softmax(mod.prior_logits, 0).double().numpy()                       # (K,)
        m = mod.prior_means.double().numpy()                                           # (K, d)
        s = (torch.nn.functional.softplus(mod.prior_raw_scales) + mog.config_.model.sigma_floor).double().numpy()
    u, v = np.linspace(-3, 3, 31), np.linspace(-2.5, 4, 27)
    got = prior_density_2d(mog, (2, 0), u, v)                                          # (Gv, Gu)
    want = sum(w[k] * _normal(v[:, None], m[k, 0], s[k, 0]) * _normal(u[None, :], m[k, 2], s[k, 2])
               for k in range(len(w)))
    # float32 parameters read into float64 on both sides: equal to rounding
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    t = np.stack([np.linspace(-4, 4, 41)] * 3, 1)                                     # (G, d)
    got1 = prior_density_1d(mog, t)
    want1 = np.stack([sum(w[k] * _normal(t[:, j], m[k, j], s[k, j]) for k in range(len(w))) for j in range(3)], 1)
    np.testing.assert_allclose(got1, want1, rtol=1e-6, atol=1e-12)


def test_vamp_2d_marginal_matches_monte_carlo(vamp):
    """The VampPrior's 2-d marginal (full-covariance components, other dimension integrated out) against
    a histogram of 200k joint draws from `VAE.prior_sample` projected on the pair."""
    n = 200_000
    z = vamp.prior_sample(n, seed=3)[:, [0, 1]].astype(np.float64)                 # (n, 2)
    lo, hi = np.quantile(z, 0.02, axis=0), np.quantile(z, 0.98, axis=0)
    edges_u, edges_v = np.linspace(lo[0], hi[0], 9), np.linspace(lo[1], hi[1], 9)  # 8 x 8 bins
    counts, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=[edges_u, edges_v])        # (8, 8): [u bin, v bin]
    frac = counts.T / n                                                              # (v bin, u bin)
    # each bin's probability: the density at 20 x 20 midpoints per bin (midpoint rule)
    f = 20
    du, dv = (edges_u[1] - edges_u[0]) / f, (edges_v[1] - edges_v[0]) / f
    u = edges_u[0] + du * (np.arange(8 * f) + 0.5)
    v = edges_v[0] + dv * (np.arange(8 * f) + 0.5)
    dens = prior_density_2d(vamp, (0, 1), u, v)                                      # (8f, 8f)
    prob = dens.reshape(8, f, 8, f).sum((1, 3)) * du * dv
    # A bin's count is binomial: 5 standard errors (a false failure of one of 64 bins < 1e-4), plus
    # 2e-4 for the midpoint rule on a smooth density at 20 points a bin.
    se = np.sqrt(prob * (1 - prob) / n)
    assert (np.abs(frac - prob) <= 5 * se + 2e-4).all(), np.abs(frac - prob).max()
    assert frac.sum() > 0.9


def test_normal_prior_levels_are_the_sigma_circles():
    """For N(0, I) the levels enclosing 39.3% and 86.5% of the mass are the densities at radius 1 and 2,
    exp(-r^2 / 2) / (2 pi): the contours a mixture prior gets are the analogue of N(0, I)'s circles."""
    u = np.linspace(-6, 6, 601)
    U, V = np.meshgrid(u, u)
    dens = np.exp(-0.5 * (U ** 2 + V ** 2)) / (2 * np.pi)
    levels = mass_levels(dens, (u[1] - u[0]) ** 2)
    # the grid's cells (0.02 wide) move the threshold by well under 1%
    np.testing.assert_allclose(levels, [np.exp(-0.5) / (2 * np.pi), np.exp(-2) / (2 * np.pi)], rtol=0.01)
    assert SIGMA_MASSES == pytest.approx((0.3935, 0.8647), abs=1e-4)


def test_overlay_covers_the_means_and_encloses_the_masses(vamp, X):
    mu = vamp.encode(X).mu
    o = prior_overlay(vamp, (0, 2), mu)
    assert o["name"] == "VampPrior, K=6"
    assert o["u"][0] < mu[:, 0].min() and o["u"][-1] > mu[:, 0].max()
    assert o["v"][0] < mu[:, 2].min() and o["v"][-1] > mu[:, 2].max()
    cell = (o["u"][1] - o["u"][0]) * (o["v"][1] - o["v"][0])
    for level, mass in zip(o["levels"], SIGMA_MASSES):
        # a Riemann sum on the 121 x 121 grid; its cells move the enclosed mass by under 1%
        assert o["density"][o["density"] >= level].sum() * cell == pytest.approx(mass, abs=0.01)


def test_blocks_pick_the_pair():
    C = np.arange(18.0).reshape(2, 3, 3)
    np.testing.assert_array_equal(blocks(C, (2, 0)), [[[C[k, 2, 2], C[k, 2, 0]], [C[k, 0, 2], C[k, 0, 0]]]
                                                      for k in range(2)])
