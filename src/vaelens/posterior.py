"""What mu(x) and sigma(x) are: per-sample checks and the data set's aggregate posterior.

A data set has one mean and one covariance; a VAE gives every sample x its own
q(z|x) = N(mu(x), diag sigma(x)^2). Two questions are answered here with numbers:

* Are mu(x) and sigma(x) really the mean and std of what the model samples for x?
  `point_cloud_check` draws S reparameterized z through the encoder's own `rsample` and
  tests the cloud against N(mu, sigma^2).
* How do the per-sample posteriors add up to the data set's latent distribution?
  `aggregate_posterior` gives the mixture q(z) = mean_x q(z|x): its mean E[mu], its covariance
  E[diag sigma^2] + Cov(mu) (law of total variance), the split of each latent's variance into
  a between-sample part Var(mu) and a within-sample part E[sigma^2], and its distance from the
  prior. `aggregate_monte_carlo` checks all of it against draws from the mixture.
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

from .errors import ConfigError, DataError
from .evaluate import ACTIVE_THRESHOLD, aggregate_posterior_stats, to_tensor
from .evaluate import active_units as _active_units  # a count; this module's is the mask
from .io import jsonable
from .model import seeded


# --- point clouds --------------------------------------------------------------------------

@dataclass(frozen=True)
class PointCloudCheck:
    """S reparameterized draws per sample compared with the claimed N(mu, sigma^2).

    Attributes
    ----------
    indices : ndarray of shape (k,)
        Rows of X that were checked.
    mu, sigma : ndarray of shape (k, d)
        The claimed posterior (the encoder's, unless overridden).
    z : ndarray of shape (S, k, d)
        Draws through the encoder's own ``rsample`` path.
    emp_mean, emp_std : ndarray of shape (k, d)
        The cloud's mean and std (ddof=1).
    mean_z : ndarray of shape (k, d)
        Standardized mean errors (emp_mean - mu) / (sigma / sqrt(S)); N(0, 1) when the claim holds.
    std_ratio : ndarray of shape (k, d)
        emp_std / sigma; within about 1 +- 3/sqrt(2 S) when the claim holds.
    ks_stat, ks_p : float
        Kolmogorov-Smirnov test of all S*k*d pooled values (z - mu)/sigma against N(0, 1).
    mean_chi2, mean_p : float
        sum(mean_z^2) against chi^2 with k*d degrees of freedom.
    var_chi2, var_p : float
        sum((S-1) emp_std^2 / sigma^2) against chi^2 with k*d*(S-1) degrees of freedom, two-sided.
    p_value : float
        Bonferroni-combined: min(1, 3 * min(ks_p, mean_p, var_p)).
    level : float
    passed : bool
        p_value >= level.
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

    @property
    def n_samples(self) -> int:
        return int(self.z.shape[0])

    def to_dict(self, include_z: bool = False) -> dict:
        """JSON-ready dict; the (S, k, d) cloud only when asked for."""
        d = asdict(self)
        if not include_z:
            d.pop("z")
        d["n_samples"] = self.n_samples
        return jsonable(d)


def point_cloud_check(module, X, indices: Sequence[int], n_samples: int = 2000, seed: int = 0,
                      level: float = 0.01, mu: Optional[np.ndarray] = None,
                      sigma: Optional[np.ndarray] = None) -> PointCloudCheck:
    """Test whether the encoder's samples for each chosen x follow N(mu(x), sigma(x)^2).

    Three tests, Bonferroni-corrected to the overall `level`: a KS test of the pooled
    standardized values (shape), a chi-square test of the mean errors (location) and a
    two-sided chi-square test of the variances (scale).

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
        A claimed posterior to test instead of the encoder's own (a wrong claim must fail).

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
    sigma = qz.stddev.double().cpu().numpy() if sigma is None else np.asarray(sigma, np.float64)
    if mu.shape != z.shape[1:] or sigma.shape != z.shape[1:]:
        raise DataError(f"mu and sigma must have shape {z.shape[1:]}, got {mu.shape} and {sigma.shape}")
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
    """The mixture q(z) = (1/n) sum_i N(mu_i, diag sigma_i^2) and its moments.

    Attributes
    ----------
    mean : ndarray of shape (d,)
        E[z] = E_x[mu(x)].
    cov : ndarray of shape (d, d)
        Cov(z) = E_x[diag sigma(x)^2] + Cov_x(mu(x)) (law of total variance; ddof=0).
    between : ndarray of shape (d,)
        Var_x(mu_j): how much the samples' posteriors differ.
    within : ndarray of shape (d,)
        E_x[sigma_j^2]: the uncertainty inside one sample's posterior.
    total : ndarray of shape (d,)
        between + within = diag(cov).
    share_between : ndarray of shape (d,)
        between / total.
    active : ndarray of shape (d,), bool
        between > 0.01.
    kl_dim : ndarray of shape (d,)
        KL(N(mean_j, total_j) || N(0, 1)) per latent.
    kl_moment_matched : float
        KL(N(mean, cov) || N(0, I)). A lower bound on KL(q(z) || p(z)): both have the same first
        two moments, so the same cross-entropy to the Gaussian prior, and the Gaussian has the
        larger entropy.
    mean_kl : float
        E_x KL(q(z|x) || p(z)), the ELBO's KL term averaged over the data.
    n : int
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

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def _check_mu_sigma(mu, sigma):
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 2 or mu.shape != sigma.shape:
        raise DataError(f"mu and sigma must both have shape (n, d), got {mu.shape} and {sigma.shape}")
    if len(mu) < 2:
        raise DataError("the aggregate posterior needs at least 2 samples")
    if not (sigma > 0).all():
        raise DataError("sigma must be > 0 everywhere")
    return mu, sigma


def _kl_from_prior(mu, sigma, mean, total, cov):
    """KL divergences from N(0, I), float64: the mean of KL(q(z|x) || p(z)) over the samples, the
    moment-matched Gaussian's per latent (d,) and jointly (inf when cov is not positive definite)."""
    t = torch.tensor  # a copy: the arrays may be read-only views, which torch would warn about sharing
    d = len(mean)
    pz = Normal(torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64))
    mean_kl = float(kl_divergence(Normal(t(mu), t(sigma)), pz).sum(1).mean())
    kl_dim = kl_divergence(Normal(t(mean), t(np.sqrt(total))), pz).numpy()
    L, info = torch.linalg.cholesky_ex(t(cov))
    kl_mm = math.inf
    if info == 0:
        mm = MultivariateNormal(t(mean), scale_tril=L)
        kl_mm = float(kl_divergence(mm, MultivariateNormal(pz.loc, scale_tril=torch.diag(pz.scale))))
    return mean_kl, kl_dim, kl_mm


def aggregate_posterior(mu: np.ndarray, sigma: np.ndarray) -> AggregatePosterior:
    """Moments of the aggregate posterior from per-sample mu, sigma of shape (n, d)."""
    mu, sigma = _check_mu_sigma(mu, sigma)
    n = len(mu)
    mean = mu.mean(0)                                                        # (d,)
    within = (sigma ** 2).mean(0)                                            # (d,)
    mu_c = mu - mean
    cov_mu = mu_c.T @ mu_c / n                                               # (d, d), ddof=0: the mixture's own moments
    cov = cov_mu + np.diag(within)
    between = np.diag(cov_mu).copy()
    total = between + within
    mean_kl, kl_dim, kl_mm = _kl_from_prior(mu, sigma, mean, total, cov)
    return AggregatePosterior(mean=mean, cov=cov, between=between, within=within, total=total,
                              share_between=between / total, active=between > ACTIVE_THRESHOLD, kl_dim=kl_dim,
                              kl_moment_matched=float(kl_mm), mean_kl=mean_kl, n=n)


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
        Monte Carlo estimate of KL(q(z) || N(0, I)) for the mixture itself, log q(z) computed
        exactly over all n components (`evaluate.aggregate_posterior_stats`), and its standard error.
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
                          kl_draws: int = 2000, level: float = 0.01) -> AggregateMonteCarlo:
    """Sample the mixture q(z) and compare its moments with the law-of-total-variance formulas.

    Parameters
    ----------
    mu, sigma : ndarray of shape (n, d)
    n_draws : int
        Draws for the moments: pick a sample i uniformly, then z ~ N(mu_i, sigma_i^2).
    kl_draws : int
        Draws for the mixture KL (each costs n density evaluations).
    seed : int
    level : float
        Overall level of the verdict (Bonferroni over the 2d z-scores).
    """
    mu, sigma = _check_mu_sigma(mu, sigma)
    n, d = mu.shape
    agg = aggregate_posterior(mu, sigma)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_draws)
    z = mu[i] + sigma[i] * rng.standard_normal((n_draws, d))                 # (N, d)
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
    mix = aggregate_posterior_stats(mu, sigma, kl_draws, seed)
    kl_mix, kl_se = mix["aggregate_kl"], mix["aggregate_kl_se"]
    return AggregateMonteCarlo(n_draws=n_draws, mean=m, mean_se=mean_se, cov=cov, var_se=var_se,
                               mean_err_z=mean_err_z, var_err_z=var_err_z, kl_mixture=kl_mix, kl_mixture_se=kl_se,
                               mutual_info=mix["mutual_information"], max_abs_z=max_abs, passed=bool(max_abs < crit))

