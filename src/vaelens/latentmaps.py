"""Orthogonal maps of the latent space applied to a whole trained model.

For an orthogonal R (d, d), the mapped model has

* q'(z|x)  = R q(z|x) projected onto the model's posterior family: N(R mu, R Sigma R^T) exactly for
  the full family (Cholesky of R Sigma R^T), and for the diagonal family the moment-matched diagonal
  Gaussian N(R mu, diag(R Sigma R^T)), the diagonal Gaussian closest to it in KL(p || q);
* p'(x|z) = p(x | R^T z): the decoder's first layer W becomes W R^T;
* p'(z)    = R p(z) projected the same way: N(0, I) maps to itself; each MoG component N(m_k, S_k)
  becomes N(R m_k, diag(R S_k R^T)) (its components are diagonal); the VampPrior is the encoder at
  the pseudo-inputs, so its components transform exactly as q does.

When both projections are exact (the family holds R q and R p), the mapped model is the same
probability model written in other coordinates and its ELBO equals the original's: R is a
symmetry. When a projection loses something, the ELBO of the mapped model is what the best member
of the family in the new coordinates gets, and the difference is the map's cost.

The mapped posterior need not be what some setting of the encoder's weights produces (the
moment-matched sigma is not a linear function of the sigma head's input): the question asked is
whether an equally good model exists in the model's family of distributions, not in its network.
"""

from __future__ import annotations

import copy
import math
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Distribution, MixtureSameFamily, MultivariateNormal

from .errors import ConfigError
from .model import VAEModule, covariance, diagonal_normal, full_normal, scale_tril


# --- the maps ---------------------------------------------------------------------------------

def signed_permutation_matrix(perm, signs) -> np.ndarray:
    """R with (R z)_j = signs[j] * z[perm[j]]."""
    d = len(perm)
    R = np.zeros((d, d))
    R[np.arange(d), np.asarray(perm)] = np.asarray(signs, dtype=np.float64)
    return R


def plane_rotation(d: int, i: int, j: int, angle: float = math.pi / 4) -> np.ndarray:
    """The rotation of R^d by `angle` in the plane of axes i and j (a Givens rotation).

    45 degrees is as far as a rotation in one plane gets from every signed permutation, so it
    shows the largest cost a diagonal posterior pays; a Haar-random rotation can land close to
    a signed permutation and cost almost nothing.
    """
    R = np.eye(d)
    c, s = math.cos(angle), math.sin(angle)
    R[i, i], R[j, j], R[i, j], R[j, i] = c, c, -s, s
    return R


def haar_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed orthogonal d x d matrix (rotations and reflections alike; Mezzadri 2007)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # QR's sign convention would bias the draw; this removes it


def check_orthogonal(R, d: int) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (d, d) or not np.allclose(R @ R.T, np.eye(d), atol=1e-6):
        raise ConfigError(f"R must be an orthogonal {d}x{d} matrix")
    return R


# --- mapping distributions --------------------------------------------------------------------

def map_gaussian(q: Distribution, R: torch.Tensor) -> Distribution:
    """R q for a Gaussian q of either family (batch (...,), event (d,)), projected onto q's own family.

    Full: N(R mu, R Sigma R^T) through its Cholesky factor. Diagonal: N(R mu, diag(R Sigma R^T)),
    i.e. sigma'_j^2 = sum_k (R_jk sigma_k)^2 when Sigma is diagonal, the moment-matched projection.
    """
    mu = q.mean @ R.T                                                        # (..., d)
    if isinstance(q, MultivariateNormal):
        L = q.scale_tril                                                     # (..., d, d)
        RL = R @ L                                                           # (R L)(R L)^T = R Sigma R^T
        cov = RL @ RL.transpose(-1, -2)
        return full_normal(mu, torch.linalg.cholesky(cov))
    sigma = torch.sqrt(q.variance @ (R ** 2).T)                              # (..., d)
    return diagonal_normal(mu, sigma)


def map_latent(p: Distribution, R: torch.Tensor) -> Distribution:
    """R p for a latent distribution: a Gaussian, or a mixture whose components are mapped one by one."""
    if isinstance(p, MixtureSameFamily):
        return MixtureSameFamily(p.mixture_distribution, map_gaussian(p.component_distribution, R),
                                 validate_args=False)
    return map_gaussian(p, R)


def projection_error(p: Distribution, mapped: Distribution, R: torch.Tensor) -> float:
    """max |R Sigma R^T - Sigma'| over p's Gaussians (mixture components too), relative to max |Sigma|:
    0 up to rounding when the family holds the mapped distribution exactly."""
    if isinstance(p, MixtureSameFamily):
        p, mapped = p.component_distribution, mapped.component_distribution
    S = covariance(p)                                                        # (..., d, d)
    exact = R @ S @ R.T
    return float((exact - covariance(mapped)).abs().max() / S.abs().max().clamp(min=1e-300))


def paired_noise(q: Distribution, q_mapped: Distribution, R: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Per-sample orthogonal O (n, d, d) such that eps' = O eps pairs the mapped model's draws with q's.

    With Q = L'^-1 R L, z' = mu' + L' Q eps equals R z exactly for z = mu + L eps; Q is orthogonal
    (so Q eps is again standard normal) exactly when L' L'^T = R L L^T R^T, i.e. when the family holds
    R q. Otherwise the orthogonal polar factor of Q, the orthogonal matrix nearest to it, keeps eps'
    standard normal (an unbiased ELBO for the mapped model) and z' as close to R z as it can: the two
    ELBOs are then paired draws, not the same draws. Returns O and max |singular value of Q - 1|
    (0 up to rounding when the pairing is exact).
    """
    L, L2 = scale_tril(q), scale_tril(q_mapped)                              # (n, d, d)
    Q = torch.linalg.solve_triangular(L2, R @ L, upper=False)                # (n, d, d)
    U, S, Vh = torch.linalg.svd(Q)
    return U @ Vh, float((S - 1).abs().max())


# --- the mapped model -------------------------------------------------------------------------

class MappedVAE(VAEModule):
    """The model `module` in coordinates z' = R z (see the module docstring); an inference-only copy.

    It is a VAEModule, so `draw`, `kl` and `terms` are the model's own code; only q(z|x), p(x|z)
    and p(z) are replaced.
    """

    def __init__(self, module: VAEModule, R):
        nn.Module.__init__(self)  # the parts come from `module`, not from a config
        self.cfg = module.cfg
        self.base = copy.deepcopy(module).eval()
        first = self.base.decoder.first
        if not isinstance(first, nn.Linear):
            raise ConfigError("latent maps need a linear first decoder layer")
        param = next(self.base.parameters())
        Rt = torch.as_tensor(check_orthogonal(R, module.latent_dim), dtype=param.dtype, device=param.device)
        self.register_buffer("R", Rt)
        with torch.no_grad():
            first.weight.copy_(first.weight @ Rt.T)                          # W z = (W R^T)(R z)

    def inference(self, x: torch.Tensor) -> Distribution:
        return map_gaussian(self.base.inference(x), self.R)                  # batch (n,), event (d,)

    def generative(self, z: torch.Tensor) -> Distribution:
        return self.base.generative(z)                                       # its first layer reads R^T z

    def prior(self) -> Distribution:
        return map_latent(self.base.prior(), self.R)                         # event (d,)

    def projection_error(self, x: torch.Tensor) -> float:
        """How far the family is from holding R q(z|x) and R p(z) (see `projection_error`)."""
        q, p = self.base.inference(x), self.base.prior()
        return max(projection_error(q, self.inference(x), self.R), projection_error(p, self.prior(), self.R))
