"""Data with a known answer: probabilistic PCA (Tipping & Bishop 1999).

z ~ N(0, I_d), x = W z + m + noise, noise ~ N(0, s^2 I_p). Everything a VAE estimates is
known in closed form here: the marginal x ~ N(m, W W^T + s^2 I), hence the exact
log-likelihood of every sample, and the exact posterior

    p(z | x) = N(M^-1 W^T (x - m), s^2 M^-1),   M = W^T W + s^2 I_d.

When the columns of W are orthogonal, M is diagonal, so the exact posterior is a diagonal
Gaussian: a diagonal-Gaussian VAE can represent it exactly. With distinct column norms the
diagonal form is unique up to a signed permutation of the axes; with equal norms M is a
multiple of I and any rotation of z gives the same data distribution and an equally diagonal
posterior, so mu(x) is then unique only up to rotation.

The data distribution only fixes W up to a rotation (W R^T gives the same x), so what decides a
VAE's symmetry is the spectrum of W^T W, not W's columns. `equal_norm_loadings` gives columns of
equal norm at given angles: W^T W then has distinct eigenvalues, the exact posterior covariance is
diagonal only in W^T W's eigenbasis (the coordinates a diagonal linear VAE settles in: its decoder
columns come out orthogonal, Lucas et al. 2019), and a rotation away from it costs a diagonal
posterior ELBO while a full-covariance posterior follows it for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from .errors import ConfigError


@dataclass(frozen=True)
class PPCAData:
    """A PPCA sample with its exact posterior and likelihood.

    Attributes
    ----------
    X : ndarray of shape (n, p), float32
    Z : ndarray of shape (n, d)
        The latent draws that generated X.
    W : ndarray of shape (p, d)
        Loadings.
    mean : ndarray of shape (p,)
    noise_std : float
    post_mu : ndarray of shape (n, d)
        Exact posterior mean E[z | x] per sample.
    post_sigma : ndarray of shape (n, d)
        Exact posterior standard deviations (the same for every sample in PPCA).
    post_cov : ndarray of shape (d, d)
        Exact posterior covariance; diagonal when the loadings are orthogonal.
    log_likelihood : ndarray of shape (n,)
        Exact log p(x) per sample, in nats.
    """

    X: np.ndarray
    Z: np.ndarray
    W: np.ndarray
    mean: np.ndarray
    noise_std: float
    post_mu: np.ndarray
    post_sigma: np.ndarray
    post_cov: np.ndarray
    log_likelihood: np.ndarray

    @property
    def diagonal(self) -> bool:
        """Whether the exact posterior is a diagonal Gaussian (orthogonal loadings)."""
        off = self.post_cov - np.diag(np.diag(self.post_cov))
        return bool(np.abs(off).max() <= 1e-10 * np.abs(self.post_cov).max())


def orthogonal_loadings(p: int, norms: Sequence[float], seed: int = 0) -> np.ndarray:
    """A (p, d) matrix with orthogonal columns of the given norms, in a random orientation."""
    norms = np.asarray(norms, dtype=np.float64)
    d = len(norms)
    if d < 1 or p < d:
        raise ConfigError(f"orthogonal loadings need 1 <= d <= p, got d={d}, p={p}")
    if not np.all(norms > 0):
        raise ConfigError(f"loading norms must be > 0, got {norms.tolist()}")
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, d)))
    q = q * np.sign(np.diag(r))  # a Haar-distributed orthonormal frame, not one biased by QR's sign convention
    return q * norms


def loadings_with_gram(p: int, gram, seed: int = 0) -> np.ndarray:
    """A (p, d) matrix W with W^T W = gram (symmetric positive definite), in a random orientation."""
    G = np.asarray(gram, dtype=np.float64)
    d = G.shape[0]
    if G.shape != (d, d) or p < d or not np.allclose(G, G.T):
        raise ConfigError(f"gram must be a symmetric d x d matrix with d <= p={p}, got shape {G.shape}")
    try:
        L = np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        raise ConfigError("gram must be positive definite") from None
    return orthogonal_loadings(p, np.ones(d), seed) @ L.T                    # (Q L^T)^T (Q L^T) = L L^T


def equal_norm_loadings(p: int, norm: float, cosines: Sequence[float], seed: int = 0) -> np.ndarray:
    """(p, d) loadings whose d columns all have norm `norm`, with cos(angle between columns i < j) given
    row by row in `cosines` (d(d-1)/2 values). Nonzero, unequal cosines give W^T W distinct eigenvalues."""
    c = np.asarray(cosines, dtype=np.float64)
    d = int(round((1 + math.sqrt(1 + 8 * len(c))) / 2))
    if d * (d - 1) // 2 != len(c) or not norm > 0:
        raise ConfigError(f"need norm > 0 and d(d-1)/2 cosines, got norm {norm} and {len(c)} cosines")
    C = np.eye(d)
    C[np.triu_indices(d, 1)] = c
    C = np.triu(C) + np.triu(C, 1).T
    return loadings_with_gram(p, norm ** 2 * C, seed)


def ppca(n: int = 2000, norms: Sequence[float] = (3.0, 2.0, 1.0), p: int = 8, noise_std: float = 0.5,
         seed: int = 0, loadings: Optional[np.ndarray] = None, mean: Optional[np.ndarray] = None) -> PPCAData:
    """Draw n samples from probabilistic PCA and return them with the exact posterior.

    Parameters
    ----------
    n : int
    norms : sequence of float, length d
        Column norms of the loadings (ignored when `loadings` is given). Distinct norms make
        the exact posterior unique up to signed permutation; equal norms, up to rotation.
    p : int
        Number of features.
    noise_std : float
        Observation noise s.
    seed : int
        Seeds the loadings' orientation and the draws.
    loadings : ndarray of shape (p, d), optional
        Use these loadings instead (any matrix; the posterior is then diagonal only if its
        columns are orthogonal).
    mean : ndarray of shape (p,), optional
        Data mean m (default 0).

    Returns
    -------
    PPCAData
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if not noise_std > 0:
        raise ConfigError(f"noise_std must be > 0, got {noise_std}")
    W = orthogonal_loadings(p, norms, seed) if loadings is None else np.asarray(loadings, dtype=np.float64)
    p, d = W.shape
    m = np.zeros(p) if mean is None else np.asarray(mean, dtype=np.float64).reshape(p)
    rng = np.random.default_rng(seed + 1)
    Z = rng.standard_normal((n, d))                                          # (n, d)
    X = Z @ W.T + m + noise_std * rng.standard_normal((n, p))                # (n, p)
    X = X.astype(np.float32)
    post_mu, post_cov = exact_posterior(X, W, m, noise_std)
    post_sigma = np.broadcast_to(np.sqrt(np.diag(post_cov)), (n, d)).copy()
    return PPCAData(X=X, Z=Z, W=W, mean=m, noise_std=float(noise_std), post_mu=post_mu, post_sigma=post_sigma,
                    post_cov=post_cov, log_likelihood=log_likelihood(X, W, m, noise_std))


def exact_posterior(X: np.ndarray, W: np.ndarray, mean: np.ndarray, noise_std: float):
    """p(z|x) under PPCA: means (n, d) and the shared covariance (d, d)."""
    d = W.shape[1]
    s2 = noise_std ** 2
    M = W.T @ W + s2 * np.eye(d)                                             # (d, d)
    Minv = np.linalg.inv(M)
    mu = (np.asarray(X, np.float64) - mean) @ W @ Minv.T                     # (n, d)
    return mu, s2 * Minv


def log_likelihood(X: np.ndarray, W: np.ndarray, mean: np.ndarray, noise_std: float) -> np.ndarray:
    """log N(x; m, W W^T + s^2 I) per sample, shape (n,)."""
    X = np.asarray(X, np.float64)                                             # (n, p)
    C = W @ W.T + noise_std ** 2 * np.eye(X.shape[1])                        # (p, p)
    return np.atleast_1d(stats.multivariate_normal(np.broadcast_to(mean, X.shape[1:]), C).logpdf(X))


def ppca_ml(X: np.ndarray, d: int):
    """Maximum-likelihood PPCA fitted to X (n, p) (Tipping & Bishop 1999, eq. 7-8): (W (p, d), mean (p,), noise_std).

    The model a linear VAE with a learned isotropic noise scale can at best reach on this sample
    (its ELBO's optimum is the PPCA likelihood's, Lucas et al. 2019): the exact posterior under it,
    `exact_posterior(X, *ppca_ml(X, d))`, is what a converged linear VAE should recover, free of
    the sampling error that separates the sample from the true W.
    """
    X = np.asarray(X, np.float64)
    n, p = X.shape
    if not 1 <= d < p:
        raise ConfigError(f"ML PPCA needs 1 <= d < p, got d={d}, p={p}")
    mean = X.mean(0)
    lam, U = np.linalg.eigh(np.cov(X, rowvar=False, bias=True))              # ascending
    lam, U = lam[::-1], U[:, ::-1]
    s2 = float(lam[d:].mean())                                               # the discarded variance
    W = U[:, :d] * np.sqrt(np.maximum(lam[:d] - s2, 0.0))                    # (p, d), up to a rotation
    return W, mean, math.sqrt(s2)
