"""What mu(x) and sigma(x) are: per-sample checks and the data set's aggregate posterior.

A data set has one mean and one covariance; a VAE gives every sample x its own
q(z|x) = N(mu(x), Sigma(x)), Sigma = diag sigma(x)^2 (diagonal family) or L(x) L(x)^T (full family,
`Posterior.scale_tril`). Two questions are answered here with numbers:

* Are mu(x) and Sigma(x) really the mean and covariance of what the model samples for x?
  `point_cloud_check` draws S reparameterized z through the encoder's own `rsample` and
  tests the cloud against N(mu, Sigma).
* How do the per-sample posteriors add up to the data set's latent distribution?
  `aggregate_posterior` gives the mixture q(z) = mean_x q(z|x): its mean E[mu], its covariance
  E[Sigma] + Cov(mu) (law of total variance), the split of each latent's variance into
  a between-sample part Var(mu) and a within-sample part E[sigma^2], and its distance from the
  prior (N(0, I), a mixture or the VampPrior: `evaluate.prior_of`). `aggregate_monte_carlo`
  checks all of it against draws from the mixture.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from torch.distributions import Distribution

from .errors import ConfigError, DataError
from .evaluate import ACTIVE_THRESHOLD, aggregate_posterior_stats, log_prob_rows, to_float64, to_tensor
from .evaluate import active_units as _active_units  # a count; this module's is the mask
from .io import jsonable
from .model import diagonal_normal, full_normal, moments, reparameterize, seeded
from .model import scale_tril as _scale_tril


@dataclass(frozen=True)
class Posterior:
    """q(z|x) = N(mu, Sigma) for each of n samples: Sigma = diag(sigma^2), or L L^T for the full family.

    Attributes
    ----------
    mu : ndarray of shape (n, d)
    sigma : ndarray of shape (n, d), all > 0: the marginal standard deviations, sqrt(diag Sigma)
    scale_tril : ndarray of shape (n, d, d), or None
        The Cholesky factor L of Sigma for a full-covariance run (lower triangular, positive
        diagonal); None for the diagonal family.
    """

    mu: np.ndarray
    sigma: np.ndarray
    scale_tril: Optional[np.ndarray] = None

    @property
    def var(self) -> np.ndarray:
        return self.sigma ** 2

    @property
    def cov(self) -> np.ndarray:
        """The covariance matrices Sigma, shape (n, d, d), for either family."""
        if self.scale_tril is None:
            return np.einsum("ij,jk->ijk", self.var, np.eye(self.mu.shape[1], dtype=self.var.dtype))
        return self.scale_tril @ np.swapaxes(self.scale_tril, -1, -2)

    def __len__(self) -> int:
        return len(self.mu)


# --- point clouds --------------------------------------------------------------------------

@dataclass(frozen=True)
class PointCloudCheck:
    """S reparameterized draws per sample compared with the claimed N(mu, Sigma).

    For the diagonal family Sigma = diag sigma^2 and the draws are standardized by sigma; for the
    full family (`scale_tril` set) they are whitened, u = L^-1 (z - mu), which is N(0, I) under the
    claim whatever the correlations, and the tests below run on u (on the diagonal family the two
    are the same thing). The full family adds a fourth test, of the whitened off-diagonal covariances.

    Attributes
    ----------
    indices : ndarray of shape (k,)
        Rows of X that were checked.
    mu, sigma : ndarray of shape (k, d)
        The claimed posterior (the encoder's, unless overridden); sigma the marginal std sqrt(diag Sigma).
    z : ndarray of shape (S, k, d)
        Draws through the encoder's own ``rsample`` path.
    emp_mean, emp_std : ndarray of shape (k, d)
        The cloud's mean and std (ddof=1).
    mean_z : ndarray of shape (k, d)
        Standardized mean errors (emp_mean - mu) / (sigma / sqrt(S)); N(0, 1) when the claim holds
        (for the full family each is, but they are correlated within a sample).
    std_ratio : ndarray of shape (k, d)
        emp_std / sigma; within about 1 +- 3/sqrt(2 S) when the claim holds.
    ks_stat, ks_p : float
        Kolmogorov-Smirnov test of all S*k*d pooled standardized (whitened) values against N(0, 1).
    mean_chi2, mean_p : float
        S times the sum of the squared mean of the standardized (whitened) values, against chi^2
        with k*d degrees of freedom (sum(mean_z^2) for the diagonal family).
    var_chi2, var_p : float
        (S-1) times the sum of the standardized (whitened) sample variances, against chi^2 with
        k*d*(S-1) degrees of freedom, two-sided.
    p_value : float
        Bonferroni-combined: min(1, m * min(p-values)) over the m = 3 tests (4 for the full family).
    level : float
    passed : bool
        p_value >= level.
    scale_tril : ndarray of shape (k, d, d), or None
        The claimed Cholesky factor (full family); None for the diagonal family.
    offdiag_chi2, offdiag_p : float or None
        Full family: (S-1) times the sum of the squared whitened sample covariances W_ab, a < b, against
        chi^2 with k*d(d-1)/2 degrees of freedom (one-sided). Under the claim each sqrt(S-1) W_ab is a
        normalized sum of S-1 products of independent N(0, 1) pairs: mean 0, variance 1, uncorrelated
        with the others, normal up to O(1/S) (excess kurtosis 6/(S-1)); so the chi^2 law holds to
        O(1/S), ample for S in the hundreds (the default S = 2000).
    offdiag_z : ndarray of shape (k,), or None
        Full family: per sample the largest |sqrt(S-1) W_ab|, each ~ |N(0, 1)| under the claim.
    """

    indices: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    emp_mean: np.ndarray
    emp_std: np.ndarray
    mean_z: np.ndarray
    std_ratio: np.ndarray
    ks_stat: float
    ks_p: float
    mean_chi2: float
    mean_p: float
    var_chi2: float
    var_p: float
    p_value: float
    level: float
    passed: bool
    scale_tril: Optional[np.ndarray] = None
    offdiag_chi2: Optional[float] = None
    offdiag_p: Optional[float] = None
    offdiag_z: Optional[np.ndarray] = None

    @property
    def n_samples(self) -> int:
        return int(self.z.shape[0])

    @property
    def tests(self) -> int:
        """How many tests the Bonferroni correction is over: 3, or 4 for the full family."""
        return 3 if self.scale_tril is None else 4

    def to_dict(self, include_z: bool = False) -> dict:
        """JSON-ready dict; the (S, k, d) cloud only when asked for (the full family's fields only for it)."""
        d = asdict(self)
        if not include_z:
            d.pop("z")
        if self.scale_tril is None:  # the diagonal family's JSON stays as it was
            for key in ("scale_tril", "offdiag_chi2", "offdiag_p", "offdiag_z"):
                d.pop(key)
        d["n_samples"] = self.n_samples
        return jsonable(d)


def point_cloud_check(module, X, indices: Sequence[int], n_samples: int = 2000, seed: int = 0,
                      level: float = 0.01, mu: Optional[np.ndarray] = None,
                      sigma: Optional[np.ndarray] = None, scale_tril: Optional[np.ndarray] = None) -> PointCloudCheck:
    """Test whether the encoder's samples for each chosen x follow N(mu(x), Sigma(x)).

    Three tests, Bonferroni-corrected to the overall `level`: a KS test of the pooled
    standardized values (shape), a chi-square test of the mean errors (location) and a
    two-sided chi-square test of the variances (scale). A full-covariance run (or a claimed
    `scale_tril`) whitens the draws with L^-1 instead of dividing by sigma and adds a fourth,
    of the whitened off-diagonal covariances (correlation), Bonferroni over four.

    Parameters
    ----------
    module : VAEModule
    X : array or tensor of shape (n, p)
        Data already transformed as the model expects (`VAE._tensor` does this).
    indices : sequence of int, length k
    n_samples : int
        S draws per sample.
    seed : int
    level : float
        Overall significance level of the verdict.
    mu, sigma : ndarray of shape (k, d), optional
        A claimed posterior to test instead of the encoder's own (a wrong claim must fail). For a
        full-covariance run a claimed sigma alone claims Sigma = diag sigma^2.
    scale_tril : ndarray of shape (k, d, d), optional
        A claimed Cholesky factor (lower triangular, positive diagonal): the claim N(mu, L L^T).

    Returns
    -------
    PointCloudCheck
    """
    if n_samples < 2:
        raise ConfigError(f"n_samples must be >= 2 to estimate a std, got {n_samples}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    Xt = to_tensor(module, X)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise DataError("no samples chosen to check")
    if idx.min() < 0 or idx.max() >= len(Xt):
        raise DataError(f"indices must be in 0..{len(Xt) - 1}, got {idx.min()}..{idx.max()}")
    warn_batch_dependent(module)
    module.eval()
    with torch.inference_mode(), seeded(seed, Xt.device):
        qz = module.inference(Xt[torch.as_tensor(idx, device=Xt.device)])     # batch (k, d)
        z = qz.rsample((n_samples,))                                         # (S, k, d)
    z = z.double().cpu().numpy()
    mu = qz.mean.double().cpu().numpy() if mu is None else np.asarray(mu, np.float64)
    if scale_tril is not None or (sigma is None and module.cfg.posterior == "full"):
        L = _scale_tril(qz).double().cpu().numpy() if scale_tril is None else np.asarray(scale_tril, np.float64)
        if mu.shape != z.shape[1:] or L.shape != z.shape[1:] + z.shape[-1:]:
            raise DataError(f"mu and scale_tril must have shapes {z.shape[1:]} and {z.shape[1:] + z.shape[-1:]}, "
                            f"got {mu.shape} and {L.shape}")
        return _full_check(z, idx, mu, L, level)
    sigma = qz.stddev.double().cpu().numpy() if sigma is None else np.asarray(sigma, np.float64)
    if mu.shape != z.shape[1:] or sigma.shape != z.shape[1:]:
        raise DataError(f"mu and sigma must have shape {z.shape[1:]}, got {mu.shape} and {sigma.shape}")
    if module.cfg.posterior == "full":  # a claimed sigma on a full run: the claim Sigma = diag sigma^2
        return _full_check(z, idx, mu, np.einsum("kj,ij->kij", sigma, np.eye(sigma.shape[1])), level)
    S, k, d = z.shape
    emp_mean = z.mean(0)                                                     # (k, d)
    emp_std = z.std(0, ddof=1)                                               # (k, d)
    mean_z = (emp_mean - mu) / (sigma / math.sqrt(S))
    std_ratio = emp_std / sigma
    u = ((z - mu) / sigma).ravel()                                           # S*k*d values, N(0,1) under the claim
    ks = stats.kstest(u, "norm")
    mean_chi2 = float((mean_z ** 2).sum())
    mean_p = float(stats.chi2.sf(mean_chi2, k * d))
    dof = k * d * (S - 1)
    var_chi2 = float(((S - 1) * std_ratio ** 2).sum())
    var_p = float(min(1.0, 2 * min(stats.chi2.cdf(var_chi2, dof), stats.chi2.sf(var_chi2, dof))))
    p_value = float(min(1.0, 3 * min(ks.pvalue, mean_p, var_p)))
    return PointCloudCheck(indices=idx, mu=mu, sigma=sigma, z=z, emp_mean=emp_mean, emp_std=emp_std,
                           mean_z=mean_z, std_ratio=std_ratio, ks_stat=float(ks.statistic), ks_p=float(ks.pvalue),
                           mean_chi2=mean_chi2, mean_p=mean_p, var_chi2=var_chi2, var_p=var_p, p_value=p_value,
                           level=float(level), passed=bool(p_value >= level))


def _full_check(z: np.ndarray, idx: np.ndarray, mu: np.ndarray, L: np.ndarray, level: float) -> PointCloudCheck:
    """The point-cloud tests on whitened draws u = L^-1 (z - mu), (S, k, d): N(0, I) under the claim N(mu, L L^T)."""
    S, k, d = z.shape
    if not (np.diagonal(L, axis1=-2, axis2=-1) > 0).all():
        raise DataError("scale_tril must have a positive diagonal")
    sigma = np.sqrt((L ** 2).sum(-1))                                        # (k, d): sqrt(diag L L^T)
    r = torch.as_tensor(z - mu).permute(1, 2, 0)                             # (k, d, S)
    u = torch.linalg.solve_triangular(torch.as_tensor(np.tril(L)), r, upper=False).permute(2, 0, 1).numpy()  # (S, k, d)
    emp_mean, emp_std = z.mean(0), z.std(0, ddof=1)                          # (k, d)
    ubar = u.mean(0)                                                         # (k, d)
    uc = u - ubar
    W = np.einsum("ska,skb->kab", uc, uc) / (S - 1)                          # (k, d, d): whitened sample covariances
    ks = stats.kstest(u.ravel(), "norm")
    mean_chi2 = float(S * (ubar ** 2).sum())
    mean_p = float(stats.chi2.sf(mean_chi2, k * d))
    dof = k * d * (S - 1)
    var_chi2 = float((S - 1) * np.diagonal(W, axis1=-2, axis2=-1).sum())
    var_p = float(min(1.0, 2 * min(stats.chi2.cdf(var_chi2, dof), stats.chi2.sf(var_chi2, dof))))
    a, b = np.tril_indices(d, -1)
    off = math.sqrt(S - 1) * W[:, a, b]                                      # (k, d(d-1)/2): ~N(0, 1) each
    off_chi2 = float((off ** 2).sum())
    off_p = float(stats.chi2.sf(off_chi2, off.size)) if off.size else 1.0
    off_z = np.abs(off).max(1) if off.size else np.zeros(k)
    p_value = float(min(1.0, 4 * min(ks.pvalue, mean_p, var_p, off_p)))
    return PointCloudCheck(indices=idx, mu=mu, sigma=sigma, z=z, emp_mean=emp_mean, emp_std=emp_std,
                           mean_z=(emp_mean - mu) / (sigma / math.sqrt(S)), std_ratio=emp_std / sigma,
                           ks_stat=float(ks.statistic), ks_p=float(ks.pvalue), mean_chi2=mean_chi2, mean_p=mean_p,
                           var_chi2=var_chi2, var_p=var_p, p_value=p_value, level=float(level),
                           passed=bool(p_value >= level), scale_tril=L, offdiag_chi2=off_chi2, offdiag_p=off_p,
                           offdiag_z=off_z)


# --- the guard for batch-dependent layers ---------------------------------------------------

_BATCH_DEPENDENT = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def batch_dependent_layers(module) -> list:
    """Names of encoder layers whose output can depend on the rest of the batch or on chance.

    BatchNorm uses batch statistics in training mode (and running averages in eval mode);
    dropout is random in training mode. Either makes mu(x), sigma(x) no longer functions of x alone.
    """
    enc = getattr(module, "encoder", module)
    return [name for name, m in enc.named_modules() if isinstance(m, _BATCH_DEPENDENT)]


def warn_batch_dependent(module) -> list:
    """Warn (once per call) if the encoder has batch-dependent layers; returns their names."""
    names = batch_dependent_layers(module)
    if names:
        warnings.warn(f"the encoder has batch-dependent layers ({', '.join(names)}): mu(x) and sigma(x) are "
                      f"functions of x alone only in eval mode, where vaelens evaluates them", stacklevel=3)
    return names


# --- the aggregate posterior ----------------------------------------------------------------

def active_mask(mu: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> np.ndarray:
    """Which latents are Burda et al.'s active units, Var_x(mu_j) > threshold: a boolean mask (d,).

    `evaluate.active_units` gives their count and the variances.
    """
    return _active_units(mu, threshold)[1] > threshold


@dataclass(frozen=True)
class AggregatePosterior:
    """The mixture q(z) = (1/n) sum_i N(mu_i, Sigma_i) and its moments, beside the prior p(z).

    Attributes
    ----------
    mean : ndarray of shape (d,)
        E[z] = E_x[mu(x)].
    cov : ndarray of shape (d, d)
        Cov(z) = E_x[Sigma(x)] + Cov_x(mu(x)) (law of total variance; ddof=0).
    between : ndarray of shape (d,)
        Var_x(mu_j): how much the samples' posteriors differ.
    within : ndarray of shape (d,)
        E_x[sigma_j^2]: the uncertainty inside one sample's posterior (sigma the marginal std).
    total : ndarray of shape (d,)
        between + within = diag(cov).
    share_between : ndarray of shape (d,)
        between / total.
    active : ndarray of shape (d,), bool
        between > 0.01.
    kl_dim : ndarray of shape (d,)
        KL(N(mean_j, total_j) || N(prior_mean_j, prior_cov_jj)) per latent: moments against moments.
    kl_moment_matched : float
        KL(N(mean, cov) || N(prior_mean, prior_cov)). For the N(0, I) prior a lower bound on
        KL(q(z) || p(z)): both have the same first two moments, so the same cross-entropy to the
        Gaussian prior, and the Gaussian has the larger entropy. For a mixture prior it compares
        moments only and bounds nothing.
    mean_kl : float
        E_x KL(q(z|x) || p(z)), the ELBO's KL term averaged over the data: analytic for N(0, I),
        Monte Carlo for a mixture prior.
    n : int
    prior_mean : ndarray of shape (d,)
        The prior's mean (`model.moments`): 0 for N(0, I).
    prior_cov : ndarray of shape (d, d)
        The prior's covariance: I for N(0, I).
    mean_kl_se : float
        The Monte Carlo standard error of mean_kl (0 when analytic).
    """

    mean: np.ndarray
    cov: np.ndarray
    between: np.ndarray
    within: np.ndarray
    total: np.ndarray
    share_between: np.ndarray
    active: np.ndarray
    kl_dim: np.ndarray
    kl_moment_matched: float
    mean_kl: float
    n: int
    prior_mean: Optional[np.ndarray] = None
    prior_cov: Optional[np.ndarray] = None
    mean_kl_se: float = 0.0

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


# Draws of z for a mixture prior's E_x KL(q(z|x) || p(z)): this many in all, at least 2 per sample.
MEAN_KL_DRAWS = 20000


def _check_mu_sigma(mu, sigma, scale_tril=None):
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 2 or mu.shape != sigma.shape:
        raise DataError(f"mu and sigma must both have shape (n, d), got {mu.shape} and {sigma.shape}")
    if len(mu) < 2:
        raise DataError("the aggregate posterior needs at least 2 samples")
    if not (sigma > 0).all():
        raise DataError("sigma must be > 0 everywhere")
    if scale_tril is None:
        return mu, sigma, None
    L = np.asarray(scale_tril, np.float64)
    if L.shape != mu.shape + mu.shape[1:]:
        raise DataError(f"scale_tril must have shape {mu.shape + mu.shape[1:]}, got {L.shape}")
    return mu, sigma, L


def _kl_from_prior(mu, sigma, mean, total, cov, L=None):
    """KL divergences from N(0, I), float64: the mean of KL(q(z|x) || p(z)) over the samples, the
    moment-matched Gaussian's per latent (d,) and jointly (inf when cov is not positive definite)."""
    t = torch.tensor  # a copy: the arrays may be read-only views, which torch would warn about sharing
    d = len(mean)
    pz = Normal(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64))
    if L is None:
        mean_kl = float(kl_divergence(Normal(t(mu), t(sigma)), pz).sum(1).mean())
    else:
        mean_kl = float(kl_divergence(full_normal(t(mu), t(L)), full_normal(pz.loc, torch.diag(pz.scale))).mean())
    kl_dim = kl_divergence(Normal(t(mean), t(np.sqrt(total))), pz).numpy()
    L, info = torch.linalg.cholesky_ex(t(cov))
    kl_mm = math.inf
    if info == 0:
        mm = MultivariateNormal(t(mean), scale_tril=L)
        kl_mm = float(kl_divergence(mm, MultivariateNormal(pz.loc, scale_tril=torch.diag(pz.scale))))
    return mean_kl, kl_dim, kl_mm


def _kl_from_mixture(mu, sigma, L, mean, total, cov, prior, seed):
    """As `_kl_from_prior` for a prior given as a distribution (a mixture, the VampPrior): moments
    against the prior's moments, and E_x KL(q(z|x) || p(z)) by Monte Carlo (no closed form), with its s.e."""
    t = torch.tensor
    p_mean, p_cov = moments(prior)                                           # (d,), (d, d)
    kl_dim = kl_divergence(Normal(t(mean), t(np.sqrt(total))), Normal(p_mean, p_cov.diagonal().sqrt())).numpy()
    La, info = torch.linalg.cholesky_ex(t(cov))
    Lp, info_p = torch.linalg.cholesky_ex(p_cov)
    kl_mm = math.inf
    if info == 0 and info_p == 0:
        kl_mm = float(kl_divergence(MultivariateNormal(t(mean), scale_tril=La),
                                    MultivariateNormal(p_mean, scale_tril=Lp)))
    n, d = mu.shape
    S = max(2, MEAN_KL_DRAWS // n)
    q = diagonal_normal(t(mu), t(sigma)) if L is None else full_normal(t(mu), t(L))   # batch (n,)
    eps = torch.randn((S, n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = reparameterize(q, eps)                                               # (S, n, d)
    terms = q.log_prob(z) - log_prob_rows(prior, z.reshape(-1, d)).reshape(S, n)   # (S, n)
    se = float(terms.var(0).sum().div(S).sqrt() / n)                         # Monte Carlo part only: the data are fixed
    return float(terms.mean()), se, kl_dim, kl_mm, p_mean.numpy(), p_cov.numpy()


def aggregate_posterior(mu: np.ndarray, sigma: np.ndarray, scale_tril: Optional[np.ndarray] = None,
                        prior: Optional[Distribution] = None, seed: int = 0) -> AggregatePosterior:
    """Moments of the aggregate posterior from per-sample mu, sigma of shape (n, d).

    `scale_tril` (n, d, d): a full-covariance run's Cholesky factors (then Sigma = L L^T, sigma its
    marginal std). `prior`: p(z) as a distribution with event (d,) (`evaluate.prior_of(module)`: a
    mixture or the VampPrior), None for N(0, I); a mixture's mean KL is Monte Carlo, seeded by `seed`.
    """
    mu, sigma, L = _check_mu_sigma(mu, sigma, scale_tril)
    n = len(mu)
    mean = mu.mean(0)                                                        # (d,)
    within = (sigma ** 2).mean(0)                                            # (d,)
    mu_c = mu - mean
    cov_mu = mu_c.T @ mu_c / n                                               # (d, d), ddof=0: the mixture's own moments
    cov = cov_mu + (np.diag(within) if L is None else (L @ np.swapaxes(L, -1, -2)).mean(0))
    between = np.diag(cov_mu).copy()
    total = between + within
    if prior is None:
        mean_kl, kl_dim, kl_mm = _kl_from_prior(mu, sigma, mean, total, cov, L)
        d = len(mean)
        mean_kl_se, p_mean, p_cov = 0.0, np.zeros(d), np.eye(d)
    else:
        mean_kl, mean_kl_se, kl_dim, kl_mm, p_mean, p_cov = _kl_from_mixture(mu, sigma, L, mean, total, cov,
                                                                             to_float64(prior), seed)
    return AggregatePosterior(mean=mean, cov=cov, between=between, within=within, total=total,
                              share_between=between / total, active=between > ACTIVE_THRESHOLD, kl_dim=kl_dim,
                              kl_moment_matched=float(kl_mm), mean_kl=mean_kl, n=n, prior_mean=p_mean,
                              prior_cov=p_cov, mean_kl_se=mean_kl_se)


@dataclass(frozen=True)
class AggregateMonteCarlo:
    """Draws from the mixture q(z) compared with `aggregate_posterior`'s closed forms.

    Attributes
    ----------
    n_draws : int
    mean, mean_se : ndarray of shape (d,)
        Monte Carlo mean of z and its standard error.
    cov : ndarray of shape (d, d)
        Monte Carlo covariance.
    var_se : ndarray of shape (d,)
        Standard error of the Monte Carlo variances (from the spread of (z - mean)^2).
    mean_err_z, var_err_z : ndarray of shape (d,)
        (Monte Carlo - closed form) / standard error; N(0, 1)-ish when the decomposition holds.
    kl_mixture, kl_mixture_se : float
        Monte Carlo estimate of KL(q(z) || p(z)) for the mixture itself and the prior given (N(0, I)
        by default), log q(z) computed exactly over all n components (`evaluate.aggregate_posterior_stats`),
        and its standard error.
    mutual_info : float
        I(x; z), the information the code carries about which sample it came from; about
        mean_kl - kl_mixture (Hoffman & Johnson 2016, "ELBO surgery").
    max_abs_z : float
        The largest |mean_err_z| or |var_err_z|.
    passed : bool
        max_abs_z below the Bonferroni-corrected two-sided normal quantile at level 0.01 over 2d tests.
    """

    n_draws: int
    mean: np.ndarray
    mean_se: np.ndarray
    cov: np.ndarray
    var_se: np.ndarray
    mean_err_z: np.ndarray
    var_err_z: np.ndarray
    kl_mixture: float
    kl_mixture_se: float
    mutual_info: float
    max_abs_z: float
    passed: bool

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def aggregate_monte_carlo(mu: np.ndarray, sigma: np.ndarray, n_draws: int = 20000, seed: int = 0,
                          kl_draws: int = 2000, level: float = 0.01, scale_tril: Optional[np.ndarray] = None,
                          prior: Optional[Distribution] = None, agg: Optional[AggregatePosterior] = None
                          ) -> AggregateMonteCarlo:
    """Sample the mixture q(z) and compare its moments with the law-of-total-variance formulas.

    Parameters
    ----------
    mu, sigma : ndarray of shape (n, d)
    n_draws : int
        Draws for the moments: pick a sample i uniformly, then z ~ N(mu_i, Sigma_i).
    kl_draws : int
        Draws for the mixture KL (each costs n density evaluations).
    seed : int
    level : float
        Overall level of the verdict (Bonferroni over the 2d z-scores).
    scale_tril : ndarray of shape (n, d, d), optional
        A full-covariance run's Cholesky factors (Sigma_i = L_i L_i^T).
    prior : Distribution with event (d,), optional
        p(z) for KL(q(z) || p(z)) (`evaluate.prior_of`); None: N(0, I).
    agg : AggregatePosterior, optional
        `aggregate_posterior` of the same arguments, when the caller has it already.
    """
    mu, sigma, L = _check_mu_sigma(mu, sigma, scale_tril)
    n, d = mu.shape
    agg = aggregate_posterior(mu, sigma, L, prior, seed) if agg is None else agg
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_draws)
    if L is None:
        z = mu[i] + sigma[i] * rng.standard_normal((n_draws, d))             # (N, d)
    else:
        eps, z = rng.standard_normal((n_draws, d)), mu[i]                    # (N, d)
        for s in range(0, n_draws, 4096):  # L[i] in blocks: (N, d, d) at once would be N d^2 floats
            z[s:s + 4096] += np.einsum("nab,nb->na", L[i[s:s + 4096]], eps[s:s + 4096])   # mu + L eps
    m = z.mean(0)
    zc = z - m
    cov = zc.T @ zc / n_draws
    mean_se = np.sqrt(np.diag(cov) / n_draws)
    sq = zc ** 2                                                             # (N, d)
    var_se = sq.std(0, ddof=1) / math.sqrt(n_draws)
    mean_err_z = (m - agg.mean) / mean_se
    var_err_z = (np.diag(cov) - agg.total) / var_se
    max_abs = float(max(np.abs(mean_err_z).max(), np.abs(var_err_z).max()))
    crit = stats.norm.isf(level / (2 * 2 * d))

    # the mixture's own KL and I(x; z) come from the evaluation module, one implementation for both
    mix = aggregate_posterior_stats(mu, sigma, kl_draws, seed, scale_tril=L,
                                    prior=None if prior is None else to_float64(prior))
    kl_mix, kl_se = mix["aggregate_kl"], mix["aggregate_kl_se"]
    return AggregateMonteCarlo(n_draws=n_draws, mean=m, mean_se=mean_se, cov=cov, var_se=var_se,
                               mean_err_z=mean_err_z, var_err_z=var_err_z, kl_mixture=kl_mix, kl_mixture_se=kl_se,
                               mutual_info=mix["mutual_information"], max_abs_z=max_abs, passed=bool(max_abs < crit))
