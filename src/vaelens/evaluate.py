"""Evaluation to the field's standard: ELBO terms, the IWAE estimate of log p(x), active units,
mutual information and the aggregate posterior's distance from the prior.

Per sample first: the ELBO, its terms and the log-likelihood estimate have shape (n,) (per-dimension
KL (n, d)); callers average. Data-set quantities (active units, I(x; z), KL(q(z) || p(z))) are
scalars with their per-dimension or per-draw parts alongside. Tensors inside, numpy outside;
every entry point puts the module in eval mode under `torch.inference_mode()`.

References: Burda, Grosse & Salakhutdinov 2016 (IWAE estimate, active units); Hoffman & Johnson
2016 and He et al. 2019 (mutual information under the encoder's joint distribution).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch.distributions import Categorical, Distribution, MixtureSameFamily, MultivariateNormal, Normal
from tqdm import tqdm

from . import dist
from .errors import ConfigError, DataError
from .model import GaussianMixture, VAEModule, diagonal_normal, full_normal, scale_tril, seeded

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Cov_x(E_q[z_u]) exceeds this
# (z, x) pairs per decoder call: large enough for big matmuls, small enough (tens of MB on MNIST)
# that K = 5000 needs no more memory than K = 50.
ROWS_PER_CALL = 8192
# Each row's noise is drawn in blocks of this many draws of z whatever the chunking, so that a row's
# draws are the same for every chunk_size (torch's normal sampler is not split-invariant).
EPS_BLOCK = 128
# Entries of the (draws x data) log-density matrix held at once when estimating log q(z).
_MIXTURE_BLOCK = 4_000_000
# A mixture prior's log_prob holds every z against its K components: temporaries of pairs x K entries
# for diagonal components (`model.GaussianMixture`, one matrix product), pairs x K x d for full ones (a
# full-covariance VampPrior: torch's MixtureSameFamily). Calls are sized so that one such temporary
# holds at most this many (128 MB in float64), whatever K: a diagonal VampPrior of K = 500 gets the
# full ROWS_PER_CALL (8192) pairs per call, a full-covariance one in d = 50 gets 640.
PRIOR_ENTRIES = 1 << 24

ArrayLike = Union[np.ndarray, torch.Tensor]
# glibc serves the decoder's tens-of-MB temporaries from its heap once its mmap threshold has
# grown, and the heap then fragments: without a trim, k = 5000 on all of MNIST's test set grew
# past 20 GB of RSS. Returning free heap pages every few dozen data batches keeps it under 1 GB.
_TRIM_EVERY = 32


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class Evaluation:
    """Everything `evaluate` measures on n samples with p features and d latent dimensions.

    Attributes
    ----------
    elbo, rec, kl : ndarray of shape (n,)
        Per-sample ELBO = rec - kl in nats; rec is a Monte Carlo estimate, kl analytic (Monte Carlo
        with the same draws for a mixture prior: `VAEModule.kl`).
    kl_dim : ndarray of shape (n, d)
    log_likelihood : ndarray of shape (n,) or None
        IWAE estimate of log p(x) with `iw_samples` importance samples (None when 0).
    activity : ndarray of shape (d,)
        Cov_x(E_q[z_u]): the variance over the data of each posterior mean.
    active_units : int
        Dimensions with activity above `active_threshold`.
    mutual_information, mutual_information_se : float
        I(x; z) in nats under q(z|x) and the empirical distribution of x (at most log n), and its
        Monte Carlo standard error.
    aggregate_kl, aggregate_kl_se : float
        KL(q(z) || p(z)) in nats and its Monte Carlo standard error.
    features : int
        p, for bits per dimension.
    """

    elbo: np.ndarray
    rec: np.ndarray
    kl: np.ndarray
    kl_dim: np.ndarray
    log_likelihood: Optional[np.ndarray]
    iw_samples: int
    activity: np.ndarray
    active_units: int
    active_threshold: float
    mutual_information: float
    mutual_information_se: float
    aggregate_kl: float
    aggregate_kl_se: float
    aggregate_draws: int
    features: int

    @property
    def n(self) -> int:
        return int(self.elbo.shape[0])

    @property
    def nll(self) -> Optional[float]:
        """Mean negative log-likelihood in nats (the number papers report)."""
        return None if self.log_likelihood is None else float(-self.log_likelihood.mean())

    def bits_per_dim(self) -> Optional[float]:
        return None if self.log_likelihood is None else float(bits_per_dim(-self.log_likelihood, self.features).mean())

    def to_dict(self, per_sample: bool = False) -> dict:
        """JSON-ready summary (means, standard errors, per-dimension figures); `per_sample` adds the arrays."""
        n = self.n
        se = lambda a: float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
        out = {
            "n": n,
            "features": self.features,
            "latent_dim": int(self.kl_dim.shape[1]),
            "elbo": float(self.elbo.mean()), "elbo_se": se(self.elbo),
            "rec": float(self.rec.mean()), "kl": float(self.kl.mean()),
            "kl_per_dim": [float(v) for v in self.kl_dim.mean(0)],
            "iw_samples": self.iw_samples,
            "log_likelihood": None if self.log_likelihood is None else float(self.log_likelihood.mean()),
            "log_likelihood_se": None if self.log_likelihood is None else se(self.log_likelihood),
            "nll": self.nll,
            "bits_per_dim": self.bits_per_dim(),
            "active_units": self.active_units,
            "active_threshold": self.active_threshold,
            "activity": [float(v) for v in self.activity],
            "mutual_information": self.mutual_information,
            "mutual_information_se": self.mutual_information_se,
            "mutual_information_max": math.log(n),
            "aggregate_kl": self.aggregate_kl,
            "aggregate_kl_se": self.aggregate_kl_se,
            "aggregate_draws": self.aggregate_draws,
        }
        if per_sample:
            out["per_sample"] = {"elbo": self.elbo.tolist(), "rec": self.rec.tolist(), "kl": self.kl.tolist(),
                                 "log_likelihood": None if self.log_likelihood is None
                                 else self.log_likelihood.tolist()}
        return out


def bits_per_dim(nats: ArrayLike, p: int) -> np.ndarray:
    """Convert nats per sample into bits per feature: nats / (p ln 2)."""
    return np.asarray(nats, dtype=np.float64) / (p * math.log(2))


def rows_per_call(module: VAEModule) -> int:
    """(z, x) pairs per call of `VAEModule.draw`: `ROWS_PER_CALL`, fewer for a prior of many components.

    N(0, I) costs d per pair, a mixture of diagonal components K, of full ones K d (see
    `PRIOR_ENTRIES`). For a mixture the count is a multiple of `EPS_BLOCK` (at least one block, the
    fewest draws of a row that one call takes), so that rounding a row's draws per call up to whole
    blocks never takes a call past it. The normal prior keeps ROWS_PER_CALL, and with it its chunking.
    """
    cfg = module.cfg
    if cfg.prior == "normal":
        return ROWS_PER_CALL
    full_components = cfg.prior == "vamp" and cfg.posterior == "full"      # the VampPrior's are q's
    rows = min(ROWS_PER_CALL, PRIOR_ENTRIES // (cfg.components * (cfg.latent_dim if full_components else 1)))
    return max(EPS_BLOCK, rows // EPS_BLOCK * EPS_BLOCK)


def elbo_batch(module: VAEModule, n_samples: int, batch_size: int = 4096) -> int:
    """Rows per call of `elbo_terms`: `batch_size`, capped at `rows_per_call` / `n_samples` for a mixture
    prior (its KL broadcasts every draw against K components)."""
    if module.cfg.prior == "normal":
        return batch_size
    return min(batch_size, max(1, rows_per_call(module) // n_samples))


def iwae_batch(module: VAEModule, n: int, k: int) -> int:
    """`iwae_log_likelihood`'s default rows per decoder call for n rows and k samples: about
    `rows_per_call` (z, x) pairs per call."""
    rows = rows_per_call(module)
    return max(1, min(n, rows // min(k, rows)))


# --- per-sample terms -----------------------------------------------------------------------------

def elbo_terms(module: VAEModule, X: ArrayLike, n_samples: int = 1, batch_size: int = 4096,
               seed: Optional[int] = 0) -> dict:
    """Per-sample ELBO terms: ``elbo``, ``rec``, ``kl`` of shape (n,) and ``kl_dim`` (n, d), float64.

    The reconstruction term averages `n_samples` draws of z per sample; the KL is analytic where
    torch has the pair, else Monte Carlo with the same draws (`VAEModule.kl`). A mixture prior caps
    the batch at `rows_per_call` / `n_samples` rows (its KL broadcasts every draw against K components).
    """
    x_all = to_tensor(module, X)
    batch_size = elbo_batch(module, n_samples, batch_size)
    parts = {"elbo": [], "rec": [], "kl": [], "kl_dim": []}
    module.eval()
    with torch.inference_mode(), seeded(seed, x_all.device):
        for i in range(0, len(x_all), batch_size):
            t = module.terms(x_all[i:i + batch_size], n_samples=n_samples)
            for k in parts:
                parts[k].append(getattr(t, k).double())
    return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}


def iwae_log_likelihood(module: VAEModule, X: ArrayLike, k: int = 5000, *, chunk_size: Optional[int] = None,
                        batch_size: Optional[int] = None, progress: bool = False,
                        seed: Optional[int] = 0, distributed: bool = False, row_offset: int = 0) -> np.ndarray:
    """The importance-weighted estimate of log p(x) with `k` samples from q(z|x), shape (n,), float64.

    log p(x) ~= log (1/k) sum_k p(x|z_k) p(z_k) / q(z_k|x): a lower bound in expectation that
    tightens as k grows (Burda et al. 2016). The k weights of a sample are drawn `chunk_size` at a
    time and folded into a float64 running log-sum-exp, so memory does not grow with k.

    Every sample draws its noise from its own generator, seeded by (`seed`, its row index), so a
    sample's estimate does not depend on `batch_size`, `chunk_size` or how the rows are split
    between processes.

    Parameters
    ----------
    module : VAEModule
    X : array of shape (n, p)
        Already in the model's units (standardized / binarized as the model expects).
    k : int
        Importance samples per data point (5000 in the standard protocol).
    chunk_size, batch_size : int, optional
        Importance samples and data points per decoder call; by default about `rows_per_call`
        (z, x) pairs per call (`ROWS_PER_CALL`, fewer for a mixture prior of many components);
        chunk_size is rounded up to a multiple of `EPS_BLOCK`. They change
        speed and memory, not the figures.
    progress : bool
        Show a tqdm bar over the data points (this process's share of them).
    seed : int or None
        Seeds the draws without disturbing torch's global generator; None draws a seed from it.
    distributed : bool
        Under torchrun, every rank computes a contiguous share of the rows and all ranks get the
        whole result in row order; every rank must call with the same X. Ignored outside torchrun.
    row_offset : int
        X's first row's number when X is a chunk of a table (streamed): row i draws as row row_offset + i.

    Returns
    -------
    ndarray of shape (n,)
    """
    if k < 1:
        raise ConfigError(f"k (importance samples) must be >= 1, got {k}")
    x_all = to_tensor(module, X)
    n = len(x_all)
    start, stop = dist.shard_range(n) if distributed else (0, n)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)))
    rows = rows_per_call(module)
    if batch_size is None:
        batch_size = iwae_batch(module, n, k)
    if chunk_size is None:
        chunk_size = max(1, min(k, rows // batch_size))
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    chunk_size = min(k, -(-chunk_size // EPS_BLOCK) * EPS_BLOCK)
    bar = tqdm(total=stop - start, desc=f"IWAE k={k}", unit="sample", dynamic_ncols=True) if progress else None
    out = [torch.empty(0, dtype=torch.float64, device=x_all.device)]
    module.eval()
    with torch.inference_mode():
        pz = module.prior()                                                  # once: the weights are fixed
        for i in range(start, stop, batch_size):
            x = x_all[i:min(i + batch_size, stop)]                           # (b, p)
            gens = [_row_generator(seed, row_offset + i + j, x.device) for j in range(len(x))]
            qz = module.inference(x)                                         # batch (b, d), once for all k
            acc = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
            for j in range(0, k, chunk_size):
                c = min(chunk_size, k - j)
                eps = torch.stack([_draw(g, c, qz.mean) for g in gens], 1)   # (c, b, d)
                lw = module.draw(x, eps, qz=qz, pz=pz, weights=True, closed_form=True).log_w   # (c, b) float32
                acc = torch.logaddexp(acc, torch.logsumexp(lw.double(), 0))
            out.append(acc - math.log(k))
            if len(out) % _TRIM_EVERY == 0:
                _trim_heap()
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    ll = torch.cat(out)
    if distributed:
        ll = dist.gather_rows(ll, n)
    return ll.cpu().numpy()


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """A generator of its own for row `row`, seeded by a splitmix64 hash of (seed, row), so that
    nearby seeds and rows give unrelated streams (and it costs microseconds, not a SeedSequence's 60)."""
    m = 2 ** 64 - 1
    x = (seed * 0x9E3779B97F4A7C15 + row + 1) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return torch.Generator(device=device).manual_seed(x >> 1)


def _draw(g: torch.Generator, c: int, like: torch.Tensor) -> torch.Tensor:
    """c standard normal draws of dimension d from g, shape (c, d), in blocks of `EPS_BLOCK`."""
    d = like.shape[1]
    return torch.cat([torch.randn((min(EPS_BLOCK, c - i), d), generator=g, dtype=like.dtype, device=like.device)
                      for i in range(0, c, EPS_BLOCK)])


# --- data-set quantities --------------------------------------------------------------------------

def active_units(mu: ArrayLike, threshold: float = ACTIVE_THRESHOLD):
    """Burda et al.'s active units from posterior means mu (n, d).

    Returns
    -------
    count : int
        Dimensions u with Cov_x(E_q[z_u]) = Var_x(mu_u(x)) > threshold.
    activity : ndarray of shape (d,)
    """
    mu = np.asarray(mu, dtype=np.float64)
    activity = mu.var(axis=0)
    return int((activity > threshold).sum()), activity


def aggregate_posterior_stats(mu: ArrayLike, sigma: ArrayLike, n_draws: Optional[int] = 2000,
                              seed: Optional[int] = 0, *, scale_tril: Optional[ArrayLike] = None,
                              prior: Optional[Distribution] = None) -> dict:
    """I(x; z) and KL(q(z) || p(z)) for q(z) = (1/n) sum_j q(z|x_j), by Monte Carlo.

    Draws z_i ~ q(z|x_i) for `n_draws` data points i chosen at random (all of them when None or
    >= n) and computes log q(z_i) exactly over the whole data set. Then (Hoffman & Johnson 2016)
    I(x; z) = E[log q(z_i|x_i) - log q(z_i)] and KL(q(z) || p(z)) = E[log q(z_i) - log p(z_i)];
    their sum is an estimate of the mean KL(q(z|x) || p(z)) from the same draws.
    Each term of the MI estimate is at most log n, the MI of a code that identifies every sample.

    Parameters
    ----------
    mu, sigma : arrays of shape (n, d)
    n_draws : int or None
    seed : int or None
    scale_tril : array of shape (n, d, d), optional
        The Cholesky factors of a full-covariance run's q(z|x); None: q(z|x) = N(mu, diag sigma^2).
    prior : Distribution with event (d,), optional
        p(z) (`prior_of(module)`: a mixture, or the VampPrior); None: N(0, I).

    Returns
    -------
    dict with ``mutual_information``, ``mutual_information_se``, ``aggregate_kl``, ``aggregate_kl_se``
    (floats, nats) and ``draws`` (int).
    """
    mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)
    sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
    n, d = mu.shape
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    if n_draws is None or n_draws >= n:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(n, generator=g)[:n_draws]
    eps = torch.randn((len(idx), d), generator=g, dtype=torch.float64)      # (m, d)
    if scale_tril is None:
        z = mu[idx] + sigma[idx] * eps                                       # (m, d)
        log_q_own = Normal(mu[idx], sigma[idx]).log_prob(z).sum(-1)          # (m,): log q(z_i|x_i)
        log_qz = _log_mixture(z, mu, sigma)                                  # (m,)
    else:
        L = torch.as_tensor(np.asarray(scale_tril), dtype=torch.float64)     # (n, d, d)
        q_own = full_normal(mu[idx], L[idx])                                 # batch (m,)
        z = q_own.loc + (q_own.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)  # (m, d): mu + L eps
        log_q_own = q_own.log_prob(z)                                        # (m,)
        log_qz = _log_mixture_full(z, mu, L)                                 # (m,)
    if prior is None:
        log_pz = Normal(torch.zeros(d, dtype=z.dtype), torch.ones(d, dtype=z.dtype)).log_prob(z).sum(-1)  # (m,)
    else:
        log_pz = log_prob_rows(prior, z)                                     # (m,)
    mi_terms = log_q_own - log_qz
    kl_terms = log_qz - log_pz
    m = len(idx)
    se = lambda t: float(t.std() / math.sqrt(m)) if m > 1 else float("nan")  # noqa: E731
    return {"mutual_information": float(mi_terms.mean()), "mutual_information_se": se(mi_terms),
            "aggregate_kl": float(kl_terms.mean()), "aggregate_kl_se": se(kl_terms), "draws": m}


def _log_mixture(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log (1/n) sum_j N(z_i; mu_j, diag sigma_j^2) for every row of z (m, d), shape (m,): the equal-weight
    `GaussianMixture` of the n posteriors, whose density is one float64 matrix product per block of rows."""
    uniform = torch.zeros(len(mu), dtype=mu.dtype, device=mu.device)         # (n,): log-weights, normalized there
    return log_prob_rows(GaussianMixture(uniform, mu, sigma), z)


def _log_mixture_full(z: torch.Tensor, mu: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """log (1/n) sum_j N(z_i; mu_j, L_j L_j^T) for every row of z (m, d), shape (m,), float64.

    As `_log_mixture` with full precisions P_j = L_j^-T L_j^-1: the Mahalanobis distance
    z^T P z - 2 z^T P mu + mu^T P mu is one (r, F) x (F, b) matmul over F = d(d+1)/2 + d features
    (z_a z_b for a <= b, and z), for a block of b components; float64, as there, because the
    expansion subtracts terms as large as |L^-1 z|^2 (measured against torch's mixture density: errors
    of 1e-12 nats for unit scales, 2e-6 for scales of 1e-3 about means of order 1; 5x faster than
    whitening each z by each L_j, 3 s for 2000 draws, n = 10000, d = 50). Components go in blocks of about
    `_MIXTURE_BLOCK` / F, and the blocks' log-sums are folded into a running log-sum-exp.
    """
    n, d = mu.shape
    a, c = torch.triu_indices(d, d)                                          # (F',): the pairs a <= b
    twice = torch.where(a == c, 1.0, 2.0).to(z.dtype)                        # off-diagonal pairs count twice
    A = torch.cat([z[:, a] * z[:, c], z], 1)                                 # (m, F)
    comps = max(1, min(n, _MIXTURE_BLOCK // A.shape[1]))
    acc = torch.full((len(z),), -math.inf, dtype=z.dtype)
    for j in range(0, n, comps):
        Lb, mb = L[j:j + comps], mu[j:j + comps]                             # (b, d, d), (b, d)
        Li = torch.linalg.solve_triangular(Lb, torch.eye(d, dtype=Lb.dtype).expand(len(Lb), d, d), upper=False)
        P = Li.transpose(-1, -2) @ Li                                        # (b, d, d): precisions
        Pm = (P @ mb.unsqueeze(-1)).squeeze(-1)                              # (b, d)
        B = torch.cat([P[:, a, c] * twice, -2 * Pm], 1)                      # (b, F)
        const = (mb * Pm).sum(-1)                                            # (b,)
        log_norm = -Lb.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * d * math.log(2 * math.pi)   # (b,)
        rows = max(1, _MIXTURE_BLOCK // len(Lb))
        part = torch.cat([torch.logsumexp(log_norm - 0.5 * (A[i:i + rows] @ B.T + const).clamp(min=0), 1)
                          for i in range(0, len(z), rows)])                  # (m,)
        acc = torch.logaddexp(acc, part)
    return acc - math.log(n)


def log_prob_rows(p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """p.log_prob(z) for z (m, d), shape (m,), in blocks of rows: a mixture's log_prob builds K entries per
    row (a `GaussianMixture`: one product) or K d (the generic broadcast), kept within `_MIXTURE_BLOCK` a block."""
    K = p.mixture_distribution.logits.shape[-1] if isinstance(p, MixtureSameFamily) else 1
    per_row = K if isinstance(p, GaussianMixture) else K * z.shape[-1]      # GaussianMixture: one (rows, K) product
    rows = max(1, _MIXTURE_BLOCK // per_row)
    return torch.cat([p.log_prob(z[i:i + rows]) for i in range(0, len(z), rows)])


def prior_of(module: VAEModule) -> Optional[Distribution]:
    """The module's p(z) with float64 parameters on the CPU (for the float64 draws of the aggregate
    posterior), or None for N(0, I), which the callers compute in closed form."""
    if module.cfg.prior == "normal":
        return None
    module.eval()
    with torch.inference_mode():
        return to_float64(module.prior())


def to_float64(p: Distribution) -> Distribution:
    """The same latent distribution (either Gaussian family, or a mixture of them) with float64 CPU parameters."""
    if isinstance(p, GaussianMixture):
        comp = p.component_distribution.base_dist
        return GaussianMixture(p.mixture_distribution.logits.double().cpu(), comp.loc.double().cpu(),
                               comp.scale.double().cpu())
    if isinstance(p, MixtureSameFamily):
        mix = Categorical(logits=p.mixture_distribution.logits.double().cpu(), validate_args=False)
        return MixtureSameFamily(mix, to_float64(p.component_distribution), validate_args=False)
    if isinstance(p, MultivariateNormal):
        return full_normal(p.loc.double().cpu(), p.scale_tril.double().cpu())
    return diagonal_normal(p.mean.double().cpu(), p.stddev.double().cpu())


def encode_all(module: VAEModule, X: ArrayLike, batch_size: int = 4096, tril: bool = False):
    """Posterior means and marginal scales of every sample, float64 numpy arrays of shape (n, d).

    With `tril` also the Cholesky factors L of the covariances, (n, d, d) (diagonal for the diagonal family).
    """
    x_all = to_tensor(module, X)
    mus, sigmas, Ls = [], [], []
    module.eval()
    with torch.inference_mode():
        for i in range(0, len(x_all), batch_size):
            qz = module.inference(x_all[i:i + batch_size])                 # batch (b,), event (d,)
            mus.append(qz.mean.double())
            sigmas.append(qz.stddev.double())
            if tril:
                Ls.append(scale_tril(qz).double())
    out = torch.cat(mus).cpu().numpy(), torch.cat(sigmas).cpu().numpy()
    return (*out, torch.cat(Ls).cpu().numpy()) if tril else out


def evaluate(module: VAEModule, X: ArrayLike, iw_samples: int = 5000, *, elbo_samples: int = 10,
             aggregate_draws: Optional[int] = 2000, active_threshold: float = ACTIVE_THRESHOLD,
             batch_size: Optional[int] = None, chunk_size: Optional[int] = None, progress: bool = False,
             seed: Optional[int] = 0, distributed: bool = False) -> Evaluation:
    """All of the metrics above on X (n, p), already in the model's units.

    Parameters
    ----------
    iw_samples : int
        Importance samples for the log-likelihood; 0 skips it.
    elbo_samples : int
        Draws of z per sample for the reconstruction term of the ELBO.
    aggregate_draws : int or None
        Draws of z for I(x; z) and KL(q(z) || p(z)); None uses one per sample.
    distributed : bool
        Under torchrun, share the log-likelihood's rows between the ranks (see `iwae_log_likelihood`);
        the cheaper metrics are computed by every rank, so all ranks return the same Evaluation.
    """
    if iw_samples < 0:
        raise ConfigError(f"iw_samples must be >= 0, got {iw_samples}")
    if elbo_samples < 1:
        raise ConfigError(f"elbo_samples must be >= 1, got {elbo_samples}")
    x_all = to_tensor(module, X)
    terms = elbo_terms(module, x_all, n_samples=elbo_samples, seed=seed)
    ll = None
    if iw_samples:
        ll = iwae_log_likelihood(module, x_all, iw_samples, chunk_size=chunk_size, batch_size=batch_size,
                                 progress=progress, seed=seed, distributed=distributed)
    L = None
    if module.cfg.posterior == "full":
        mu, sigma, L = encode_all(module, x_all, tril=True)
    else:
        mu, sigma = encode_all(module, x_all)
    count, activity = active_units(mu, active_threshold)
    agg = aggregate_posterior_stats(mu, sigma, aggregate_draws, seed, scale_tril=L, prior=prior_of(module))
    return Evaluation(elbo=terms["elbo"], rec=terms["rec"], kl=terms["kl"], kl_dim=terms["kl_dim"],
                      log_likelihood=ll, iw_samples=iw_samples, activity=activity, active_units=count,
                      active_threshold=active_threshold, mutual_information=agg["mutual_information"],
                      mutual_information_se=agg["mutual_information_se"],
                      aggregate_kl=agg["aggregate_kl"], aggregate_kl_se=agg["aggregate_kl_se"],
                      aggregate_draws=agg["draws"], features=int(x_all.shape[1]))


# --- helpers --------------------------------------------------------------------------------------

def to_tensor(module: VAEModule, X: ArrayLike) -> torch.Tensor:
    """X (n, p), an array or a tensor already in the model's units, as float32 on the module's device."""
    device = next(module.parameters()).device
    x = torch.as_tensor(X, dtype=torch.float32, device=device)
    if x.ndim != 2:
        raise DataError(f"X: expected shape (n, p), got {tuple(x.shape)}")
    return x
