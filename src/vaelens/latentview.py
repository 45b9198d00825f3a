"""The latent distributions as the pictures draw them (report and serve): the prior's name, its 1-d
and 2-d marginal densities on grids, the density levels that enclose given shares of its mass, and
the 2x2 covariance blocks of posteriors.

The prior is read from a fitted `VAE` (``vae.module_.prior()``), in float64 on the CPU, as a mixture
of Gaussians: K = 1 for N(0, I), the learned MoG, or the VampPrior's K encoder posteriors at the
pseudo-inputs. A marginal of a mixture of Gaussians over some dimensions is the mixture (same
weights) of the components' marginals, which are Gaussians with the sub-vector of the mean and the
sub-block of the covariance: that is how `prior_density_2d` and `prior_density_1d` get it, with
torch.distributions doing the densities. `prior_mixture` and `prior_density_2d` belong in the `VAE`
API (as `VAE.prior_components()` and `VAE.prior_marginal_density(dims, u, v)`); they live here until
api.py has room.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from .model import covariance, marginals

# A 2-d Gaussian's 1- and 2-sigma ellipses enclose 1 - exp(-m^2 / 2) of its mass: 39.3% and 86.5%.
# The prior's contours are drawn at the density levels that enclose the same shares, so a mixture
# prior's contours read like N(0, I)'s circles.
SIGMA_MASSES = (1 - np.exp(-0.5), 1 - np.exp(-2.0))
PRIOR_NAMES = {"normal": "N(0, I)", "mog": "MoG", "vamp": "VampPrior"}


def prior_name(model_cfg) -> str:
    """The prior as the pictures name it: ``N(0, I)``, ``MoG, K=10``, ``VampPrior, K=100``."""
    name = PRIOR_NAMES[model_cfg.prior]
    return name if model_cfg.prior == "normal" else f"{name}, K={model_cfg.components}"


def family_text(model_cfg) -> str:
    """One line naming the posterior family and the prior, for a page's run summary."""
    post = ("full-covariance Gaussian q(z|x) = N(mu, L L^T)" if model_cfg.posterior == "full"
            else "diagonal Gaussian q(z|x) = N(mu, diag sigma^2)")
    return f"{post}; prior p(z) = {prior_name(model_cfg)}"


def prior_mixture(vae) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prior as a mixture of Gaussians, float64: weights (K,), means (K, d), covariances (K, d, d)."""
    module = vae.module_.eval()
    with torch.inference_mode():
        pz = module.prior()                                                  # event (d,)
        if isinstance(pz, MixtureSameFamily):
            comp = pz.component_distribution                                 # batch (K,)
            w, m, C = pz.mixture_distribution.probs, comp.mean, covariance(comp)
        else:
            w, m, C = torch.ones(1), pz.mean[None], covariance(pz)[None]
        return tuple(t.double().cpu().numpy() for t in (w, m, C))


def _mixture(w: np.ndarray, m: np.ndarray, C: np.ndarray) -> MixtureSameFamily:
    """torch's mixture of the Gaussians N(m_k, C_k) with weights w: (K,), (K, e), (K, e, e)."""
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return MixtureSameFamily(Categorical(probs=t(w), validate_args=False),
                             MultivariateNormal(t(m), covariance_matrix=t(C), validate_args=False),
                             validate_args=False)


def prior_density_2d(vae, dims: Sequence[int], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """p(z_i, z_j), the prior's marginal over dims = (i, j), on the grid u (Gu,) x v (Gv,): shape (Gv, Gu)."""
    w, m, C = prior_mixture(vae)
    i, j = dims
    pij = _mixture(w, m[:, [i, j]], C[:, [i, j]][:, :, [i, j]])              # event (2,)
    U, V = np.meshgrid(np.asarray(u, np.float64), np.asarray(v, np.float64))  # (Gv, Gu) each
    pts = torch.as_tensor(np.stack([U, V], -1))                              # (Gv, Gu, 2)
    with torch.inference_mode():
        return pij.log_prob(pts).exp().numpy()


def prior_density_1d(vae, t: np.ndarray) -> np.ndarray:
    """p(z_j) for every dimension j on the grid t (G, d) (a column per dimension): shape (G, d)."""
    pz = _mixture(*prior_mixture(vae))
    with torch.inference_mode():
        return marginals(pz).log_prob(torch.as_tensor(np.asarray(t, np.float64))).exp().numpy()


def prior_marginal_moments(vae) -> Tuple[np.ndarray, np.ndarray]:
    """The prior's mean (d,) and marginal standard deviations (d,), float64 (`VAE.prior_moments`)."""
    mean, cov = vae.prior_moments()
    return mean, np.sqrt(np.diag(cov))


def mass_levels(density: np.ndarray, cell_area: float, masses: Sequence[float] = SIGMA_MASSES) -> list:
    """The density thresholds whose super-level sets {p > t} hold the given shares of the mass.

    `density` is sampled on a regular grid with cells of `cell_area`; the mass of a set is the sum
    of its cells (a Riemann sum, so a grid much finer than the density's features is assumed).
    """
    p = np.sort(np.asarray(density, np.float64).ravel())[::-1]
    cum = np.cumsum(p) * cell_area
    return [float(p[min(np.searchsorted(cum, a), len(p) - 1)]) for a in masses]


def blocks(cov: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """The 2x2 blocks of covariance matrices (n, d, d) for the dimensions dims = (i, j): shape (n, 2, 2)."""
    i, j = dims
    return np.asarray(cov)[:, [i, j]][:, :, [i, j]]


def prior_overlay(vae, dims: Sequence[int], mu: np.ndarray, grid: int = 121) -> dict:
    """The prior's marginal density over dims = (i, j) on a grid covering the posterior means mu (n, d)
    shown and the prior's own mass (its mean ± 4 marginal stds), with the density levels enclosing
    `SIGMA_MASSES` of it: ``u`` (G,), ``v`` (G,), ``density`` (G, G), ``levels`` [2], ``name``.
    """
    mean, sd = prior_marginal_moments(vae)
    axes = []
    for j in dims:
        lo = min(float(np.quantile(mu[:, j], 0.002)), mean[j] - 4 * sd[j], -3.0)
        hi = max(float(np.quantile(mu[:, j], 0.998)), mean[j] + 4 * sd[j], 3.0)
        pad = 0.1 * (hi - lo)  # beyond any view of the page that shows these means
        axes.append(np.linspace(lo - pad, hi + pad, grid))
    u, v = axes
    density = prior_density_2d(vae, dims, u, v)                              # (G, G)
    levels = mass_levels(density, (u[1] - u[0]) * (v[1] - v[0]))
    return {"u": u, "v": v, "density": density, "levels": levels, "name": prior_name(vae.config_.model)}
