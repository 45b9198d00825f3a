"""How close are mu(x) and sigma(x) to the truth? The model's true posterior, the best Gaussian per
sample, and the two gaps between them (Cremer, Li & Duvenaud 2018).

For fixed decoder weights the model has a true posterior p(z|x) = p(x|z) p(z) / p(x). The
encoder's q(z|x) = N(mu(x), Sigma(x)) (diagonal or full covariance) approximates it, and falls
short twice:

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
                        approximation gap       amortization gap

where q* is the best Gaussian of the run's family (diagonal, or full covariance) for this x alone
(`refine`): no such Gaussian equals p(z|x) (the first), and one network serves every x (the
second). Both gaps are KL divergences: log p(x) - L[q] = KL(q || p(z|x)).

* `true_posterior`: self-normalized importance sampling with q(z|x) (or q*) as the proposal gives
  E_p[z], Std_p[z] per sample, their Monte Carlo errors, the effective sample size and the
  Pareto-k diagnostic of the largest weights (Vehtari et al., "Pareto smoothed importance
  sampling"); the same weights give an importance-weighted estimate of log p(x) (Burda et al.
  2016), with q as the proposal draw for draw the one `evaluate.iwae_log_likelihood` computes.
* `refine`: q* by Adam on a seeded reparameterized Monte Carlo ELBO, per sample, in one batched
  tensor, started from the encoder (Kim et al. 2018's semi-amortized inference, without the
  backward pass into the encoder).
* `inference_gaps`: log p(x), L[q], L[q*] and the gaps per sample, with standard errors. L[q*] is
  evaluated on fresh noise, independent of the optimization's, so it is not optimistically biased;
  the importance sampler's proposal is q* by default (closer to p(z|x): more effective draws).
* `posterior_cloud`: the same draws and normalized weights for a few samples, kept for plotting
  (the report's "true posterior" section, the explorer's panel).

Per sample first: (n,) and (n, d) arrays; tensors inside, numpy outside.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .config import GAP_K, GAP_REFINE_LR, GAP_REFINE_LR_END, GAP_REFINE_STEPS
from .errors import ConfigError
from .evaluate import EPS_BLOCK, ROWS_PER_CALL, _draw, _row_generator, rows_per_call
from .model import VAEModule, diagonal_normal, full_normal, reparameterize, scale_tril

REFINE_DRAWS = 4          # reparameterized draws per sample and step in the optimized ELBO
ELBO_DRAWS = 200          # fresh draws per sample for each reported ELBO (L[q] and L[q*])
# A sample's importance-sampled moments are flagged unreliable below this effective sample size
# (the mean's s.e. is then over Std_p / 10) or when the largest weights' fitted Pareto shape exceeds
# 0.7: beyond it the weights' variance is effectively infinite and no k is enough (Vehtari et al.).
MIN_ESS = 100.0
PARETO_K_MAX = 0.7
# Each purpose draws from its own per-row streams; the IS stream is `seed` itself, so its log p(x)
# equals `iwae_log_likelihood(..., seed=seed)`. XOR with a high bit keeps the others apart from
# every other seed's IS stream.
_STREAM_OPT = 1 << 48
_STREAM_ELBO = 2 << 48


def _chunks(n: int, k: int, rows: int = ROWS_PER_CALL) -> Tuple[int, int]:
    """Rows and draws per decoder call for `rows` (z, x) pairs a call (`evaluate.rows_per_call`), as
    `iwae_log_likelihood` chooses them (same noise, same figures)."""
    batch = max(1, min(n, rows // min(k, rows)))
    chunk = max(1, min(k, rows // batch))
    return batch, min(k, -(-chunk // EPS_BLOCK) * EPS_BLOCK)


def gaussian(loc: torch.Tensor, scale: torch.Tensor):
    """q(z|x) from a proposal or q* as `refine` gives it: scale (n, d) is the diagonal family's std,
    (n, d, d) the full family's Cholesky factor."""
    return full_normal(loc, scale) if scale.ndim == 3 else diagonal_normal(loc, scale)


def _noise(seed: int, start: int, b: int, c: int, like: torch.Tensor) -> torch.Tensor:
    """c standard-normal draws for each of rows start..start+b-1 from their own streams: (c, b, d)."""
    return torch.stack([_draw(_row_generator(seed, start + j, like.device), c, like) for j in range(b)], 1)


class _Stream:
    """`total` standard-normal draws for each of rows start..start+b-1, handed out `take(c)` at a time.

    Refilled `_REFILL` draws (a multiple of EPS_BLOCK) at a time from each row's own generator, so a row
    gets exactly the draws one `_draw(g, total)` call would give, whatever the rows around it, while
    memory stays at _REFILL x b x d instead of total x b x d.
    """

    def __init__(self, seed: int, start: int, b: int, total: int, like: torch.Tensor):
        self.gens = [_row_generator(seed, start + j, like.device) for j in range(b)]
        self.left, self.like = total, like
        self.buf = like.new_empty((0, b, like.shape[1]))

    def take(self, c: int) -> torch.Tensor:
        while len(self.buf) < c and self.left > 0:
            new = min(_REFILL, self.left)
            self.left -= new
            fresh = torch.stack([_draw(g, new, self.like) for g in self.gens], 1)   # (new, b, d)
            self.buf = torch.cat([self.buf, fresh])
        out, self.buf = self.buf[:c], self.buf[c:]
        return out


_REFILL = 2 * EPS_BLOCK


# --- the true posterior by self-normalized importance sampling ------------------------------

@dataclass(frozen=True)
class TruePosterior:
    """p(z|x) per sample, importance-sampled with q(z|x) as the proposal, beside the encoder's q.

    Attributes
    ----------
    mean, std : ndarray of shape (n, d)
        E_p[z] and Std_p[z] (self-normalized importance sampling, k draws per sample).
    mean_se, std_se : ndarray of shape (n, d)
        Delta-method Monte Carlo standard errors: sqrt(sum_i wbar_i^2 (z_i - mean)^2) for the mean,
        sqrt(sum_i wbar_i^2 ((z_i - mean)^2 - var)^2) / (2 std) for the std (wbar: normalized weights).
    ess : ndarray of shape (n,)
        Effective sample size (sum w)^2 / sum w^2, between 1 and k.
    pareto_k : ndarray of shape (n,)
        Fitted generalized-Pareto shape of the largest weights (-inf for equal weights, NaN for k < 25).
    log_px, log_px_se : ndarray of shape (n,)
        IWAE estimate of log p(x) from the same weights and its delta-method s.e. sqrt(1/ess - 1/k).
    mu, sigma : ndarray of shape (n, d)
        The encoder's q(z|x).
    k : int
    proposal : {"encoder", "refined"}
        The importance sampler's proposal: the encoder's q, or q* (`refine`).
    """

    mean: np.ndarray
    std: np.ndarray
    mean_se: np.ndarray
    std_se: np.ndarray
    ess: np.ndarray
    pareto_k: np.ndarray
    log_px: np.ndarray
    log_px_se: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    k: int
    proposal: str = "encoder"

    @property
    def reliable(self) -> np.ndarray:
        """(n,) bool: ESS >= MIN_ESS and Pareto k <= PARETO_K_MAX (NaN k: ESS alone decides)."""
        return (self.ess >= MIN_ESS) & ~(self.pareto_k > PARETO_K_MAX)

    @property
    def distance(self) -> np.ndarray:
        """|mu(x) - E_p[z]| / Std_p[z], shape (n, d): how far the encoder's mean is, in true stds."""
        return np.abs(self.mu - self.mean) / self.std

    @property
    def std_ratio(self) -> np.ndarray:
        """sigma(x) / Std_p[z], shape (n, d): below 1 the encoder is overconfident."""
        return self.sigma / self.std

    def to_dict(self) -> dict:
        ok = self.reliable
        use = ok if ok.any() else np.ones_like(ok)
        return {"k": self.k, "proposal": self.proposal, "n": int(len(self.ess)), "unreliable": int((~ok).sum()),
                "unreliable_share": float((~ok).mean()), "min_ess": MIN_ESS, "pareto_k_max": PARETO_K_MAX,
                "ess_median": float(np.median(self.ess)),
                "distance_per_dim": self.distance[use].mean(0).tolist(),
                "std_ratio_per_dim": self.std_ratio[use].mean(0).tolist(),
                "mean_se_per_dim": (self.mean_se / self.std)[use].mean(0).tolist(),
                "averaged_over": "reliable samples" if ok.any() else "all samples (none reliable)"}


class _Running:
    """Running self-normalized sums over chunks of draws, rescaled to the largest log-weight so far.

    With w = exp(log w - m) and u = z - mu(x): W0 = sum w, W1 = sum w u, W2 = sum w u^2 and the same
    with w^2 (V0, V1, V2) for the ESS and the mean's s.e.; float64 and centred at mu(x) so that the
    variance W2/W0 - (W1/W0)^2 does not cancel. Also the `tail` largest log-weights, for Pareto k.
    """

    def __init__(self, b: int, d: int, tail: int, device):
        f = dict(dtype=torch.float64, device=device)
        self.m = torch.full((b,), -math.inf, **f)
        self.W0, self.V0 = torch.zeros(b, **f), torch.zeros(b, **f)
        self.W1, self.W2, self.V1, self.V2, self.V3, self.V4 = (torch.zeros(b, d, **f) for _ in range(6))
        self.top = torch.empty(0, b, **f)
        self.tail = tail

    def add(self, lw: torch.Tensor, u: torch.Tensor) -> None:
        """lw (c, b) log-weights, u (c, b, d) draws minus mu(x), both float64."""
        m = torch.maximum(self.m, lw.max(0).values)                          # (b,)
        a = torch.where(torch.isfinite(self.m), torch.exp(self.m - m), torch.zeros_like(m))
        w = torch.exp(lw - m)                                                # (c, b)
        w2 = w.square()
        self.W0 = self.W0 * a + w.sum(0)
        self.V0 = self.V0 * a.square() + w2.sum(0)
        a, w, w2 = a[:, None], w[..., None], w2[..., None]
        self.W1 = self.W1 * a + (w * u).sum(0)
        self.W2 = self.W2 * a + (w * u.square()).sum(0)
        self.V1 = self.V1 * a.square() + (w2 * u).sum(0)
        self.V2 = self.V2 * a.square() + (w2 * u.square()).sum(0)
        self.V3 = self.V3 * a.square() + (w2 * u.pow(3)).sum(0)
        self.V4 = self.V4 * a.square() + (w2 * u.pow(4)).sum(0)
        self.m = m
        top = torch.cat([self.top, lw])
        self.top = top.topk(min(self.tail, len(top)), dim=0).values          # (tail, b), descending

    def finish(self, k: int) -> dict:
        mean_u = self.W1 / self.W0[:, None]                                  # (b, d)
        var = (self.W2 / self.W0[:, None] - mean_u.square()).clamp(min=0)
        a, V0, W02 = mean_u, self.V0[:, None], self.W0[:, None].square()
        # delta method: Var(sum wbar f) ~ sum wbar^2 (f - E f)^2, with f = u - a (mean), (u - a)^2 (variance)
        c2 = self.V2 - 2 * a * self.V1 + a.square() * V0                    # sum w^2 (u - a)^2
        c4 = self.V4 - 4 * a * self.V3 + 6 * a.square() * self.V2 - 4 * a.pow(3) * self.V1 + a.pow(4) * V0
        var_se2 = (c4 - 2 * var * c2 + var.square() * V0) / W02
        std = var.sqrt()
        ess = self.W0.square() / self.V0
        return {"mean_u": mean_u, "std": std, "mean_se": (c2 / W02).clamp(min=0).sqrt(),
                "std_se": var_se2.clamp(min=0).sqrt() / (2 * std), "ess": ess,
                "log_px": self.m + self.W0.log() - math.log(k),
                "log_px_se": (1 / ess - 1 / k).clamp(min=0).sqrt(), "top": self.top}


def tail_length(k: int) -> int:
    """PSIS's tail: the ceil(min(k / 5, 3 sqrt(k))) largest weights (Vehtari et al.)."""
    return int(math.ceil(min(0.2 * k, 3 * math.sqrt(k))))


def pareto_k(top: np.ndarray) -> np.ndarray:
    """Pareto-k diagnostic per sample from its largest log-weights, `top` (n, M + 1), in any order.

    The M largest, minus the (M + 1)-th as threshold, are fitted by a generalized Pareto
    distribution with Zhang & Stephens' (2009) estimator and the weakly informative prior on k of
    Vehtari et al.'s PSIS (the same fit as arviz's `_gpdfit`, vectorized over samples).
    """
    top = np.sort(np.asarray(top, np.float64), axis=1)                      # ascending
    n, M = top.shape[0], top.shape[1] - 1
    if M < 5:
        return np.full(n, np.nan)
    peak = top[:, -1:]
    x = np.exp(top[:, 1:] - peak) - np.exp(top[:, :1] - peak)                # (n, M) exceedances, ascending
    flat = x[:, -1] <= 1e-12                                                 # equal weights: no tail at all
    x[flat] = 1.0
    m_est = 30 + int(math.sqrt(M))
    b = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1) - 0.5))                 # (m_est,)
    b = b[None, :] / (3 * x[:, int(M / 4 + 0.5) - 1:int(M / 4 + 0.5)]) + 1 / x[:, -1:]   # (n, m_est)
    with np.errstate(all="ignore"):
        kk = np.log1p(-b[:, :, None] * x[:, None, :]).mean(-1)              # (n, m_est)
        L = M * (np.log(-(b / kk)) - kk - 1)                                 # profile log-likelihood
        L = np.where(np.isfinite(L), L, -np.inf)
        wts = np.exp(L - L.max(1, keepdims=True))
        wts /= wts.sum(1, keepdims=True)
        b_post = (b * wts).sum(1)
        k_post = np.log1p(-b_post[:, None] * x).mean(1)
    k_post = (M * k_post + 10 * 0.5) / (M + 10)                              # prior: 10 pseudo-observations of 0.5
    k_post[flat] = -np.inf
    return k_post


def true_posterior(module: VAEModule, x_all: torch.Tensor, k: int = GAP_K, seed: int = 0,
                   proposal: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> TruePosterior:
    """Importance-sampled moments of p(z|x) for every row of x_all (n, p), in the model's units.

    The proposal is the encoder's q(z|x), or with `proposal` = (loc, scale), tensors (n, d) and
    (n, d) or (n, d, d) (a Cholesky factor), another Gaussian per row, such as q* from `refine`: any
    proposal gives consistent moments and an
    IWAE-type estimate of log p(x), and one closer to p(z|x) gives a larger ESS (in 50 latent
    dimensions the encoder's q often leaves an ESS of a few draws in a thousand). `mu`, `sigma` of the
    result are always the encoder's.

    Draws are taken `rows_per_call` (z, x) pairs per decoder call and folded into running sums,
    so memory does not grow with k; each row's noise comes from its own stream seeded by
    (seed, row), as in `iwae_log_likelihood` (whose log p(x) the encoder's proposal reproduces).
    """
    if k < 2:
        raise ConfigError(f"k (importance samples) must be >= 2, got {k}")
    n, d = len(x_all), module.latent_dim
    batch, chunk = _chunks(n, k, rows_per_call(module))
    parts, mus, sigmas, locs = [], [], [], []
    module.eval()
    with torch.inference_mode():
        pz = module.prior()                                                  # once: the weights are fixed
        for i in range(0, n, batch):
            x = x_all[i:i + batch]                                           # (b, p)
            q = module.inference(x)                                          # batch (b, d): the encoder's
            qz = q if proposal is None else gaussian(proposal[0][i:i + batch], proposal[1][i:i + batch])  # the proposal
            gens = [_row_generator(seed, i + j, x.device) for j in range(len(x))]
            acc = _Running(len(x), d, tail_length(k) + 1, x.device)
            for j in range(0, k, chunk):
                eps = torch.stack([_draw(g, min(chunk, k - j), qz.mean) for g in gens], 1)   # (c, b, d)
                dr = module.draw(x, eps, qz=qz, pz=pz, weights=True, closed_form=True)
                acc.add(dr.log_w.double(), (dr.z - qz.mean).double())        # u = z - the proposal's mean
            parts.append(acc.finish(k))
            mus.append(q.mean.double())
            sigmas.append(q.stddev.double())
            locs.append(qz.mean.double())
    cat = {key: torch.cat([p[key] for p in parts], 1 if key == "top" else 0).cpu().numpy() for key in parts[0]}
    mu, sigma = torch.cat(mus).cpu().numpy(), torch.cat(sigmas).cpu().numpy()
    return TruePosterior(mean=torch.cat(locs).cpu().numpy() + cat["mean_u"], std=cat["std"],
                         mean_se=cat["mean_se"], std_se=cat["std_se"], ess=cat["ess"],
                         pareto_k=pareto_k(cat["top"].T), log_px=cat["log_px"], log_px_se=cat["log_px_se"],
                         mu=mu, sigma=sigma, k=k, proposal="encoder" if proposal is None else "refined")


@dataclass(frozen=True)
class PosteriorCloud:
    """The importance-weighted draws behind `true_posterior`'s moments, for a few samples (to plot).

    Attributes
    ----------
    z : ndarray of shape (n, k, d)
        The proposal's draws, row r's noise from the stream (seed, r) exactly as `true_posterior`'s.
    weights : ndarray of shape (n, k)
        Self-normalized importance weights p(x, z) / proposal(z), each row summing to 1.
    loc, scale : ndarray of shape (n, d)
        The proposal: the encoder's q, or q* (`refine`); scale its marginal std.
    mu, sigma : ndarray of shape (n, d)
        The encoder's q(z|x).
    k : int
    proposal : {"encoder", "refined"}
    """

    z: np.ndarray
    weights: np.ndarray
    loc: np.ndarray
    scale: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    k: int
    proposal: str = "encoder"

    @property
    def mean(self) -> np.ndarray:
        """(n, d): sum_i wbar_i z_i, `true_posterior`'s E_p[z] from the same draws (up to float rounding)."""
        return np.einsum("nk,nkd->nd", self.weights, self.z)


def posterior_cloud(module: VAEModule, x_all: torch.Tensor, k: int = GAP_K, seed: int = 0,
                    proposal: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> PosteriorCloud:
    """The k draws and normalized weights per row of x_all (n, p) that `true_posterior` folds into
    running sums: the same noise, proposal and log-weights, kept instead of summed. Memory is
    n x k x d, so this is for the few samples a figure or the explorer shows, not a data set.
    """
    if k < 2:
        raise ConfigError(f"k (importance samples) must be >= 2, got {k}")
    batch, chunk = _chunks(len(x_all), k, rows_per_call(module))
    out = {key: [] for key in ("z", "w", "loc", "scale", "mu", "sigma")}
    module.eval()
    with torch.inference_mode():
        pz = module.prior()
        for i in range(0, len(x_all), batch):
            x = x_all[i:i + batch]                                           # (b, p)
            q = module.inference(x)                                          # batch (b, d)
            qz = q if proposal is None else gaussian(proposal[0][i:i + batch], proposal[1][i:i + batch])
            # one _draw(g, k) per row equals true_posterior's chunked draws: chunk is a multiple of EPS_BLOCK
            eps = _noise(seed, i, len(x), k, qz.mean)                         # (k, b, d)
            lw = torch.cat([module.draw(x, eps[j:j + chunk], qz=qz, pz=pz, weights=True, closed_form=True).log_w
                            for j in range(0, k, chunk)])                    # (k, b)
            out["w"].append(torch.softmax(lw.double(), 0).T)                 # (b, k)
            out["z"].append(reparameterize(qz, eps).transpose(0, 1).double())   # (b, k, d)
            for key, v in (("loc", qz.mean), ("scale", qz.stddev), ("mu", q.mean), ("sigma", q.stddev)):
                out[key].append(v.double())
    a = {key: torch.cat(v).cpu().numpy() for key, v in out.items()}
    return PosteriorCloud(z=a["z"], weights=a["w"], loc=a["loc"], scale=a["scale"], mu=a["mu"], sigma=a["sigma"],
                          k=k, proposal="encoder" if proposal is None else "refined")


# --- q*: the best Gaussian of the run's family per sample for the fixed decoder ----------------

def refine(module: VAEModule, x_all: torch.Tensor, steps: int = GAP_REFINE_STEPS, *, seed: int = 0,
           lr: float = GAP_REFINE_LR, draws: int = REFINE_DRAWS) -> Tuple[torch.Tensor, torch.Tensor]:
    """q*(z|x) = N(m, diag s^2) per row of x_all (n, p): returns m and s, tensors of shape (n, d); for a
    full-covariance run q* = N(m, L L^T) in the same family, and the second tensor is L, (n, d, d).

    m and log s start at the encoder's mu(x), log sigma(x) and are optimized jointly, as one
    (2, b, d) tensor, by Adam on the negative sum over rows of a Monte Carlo ELBO with `draws`
    reparameterized draws per row and step (analytic KL where torch has it, else Monte Carlo with
    the same draws). The full family adds L's d(d-1)/2 entries below the diagonal, a second tensor
    (b, d(d-1)/2) started at the encoder's, with log s the log of L's diagonal. The objective is a
    sum of per-row terms and Adam is per-coordinate, so every row is optimized exactly as it would
    be alone. Stopping rule: a fixed number of `steps`, the learning rate falling linearly from `lr`
    to GAP_REFINE_LR_END * lr. The noise of row r comes from its own stream (seed, r), so the result does
    not depend on how rows are batched. The decoder is a frozen copy: no gradient reaches it.
    """
    if steps < 0 or draws < 1 or not lr > 0:
        raise ConfigError(f"refine needs steps >= 0, draws >= 1, lr > 0; got {steps}, {draws}, {lr}")
    frozen = copy.deepcopy(module).eval().requires_grad_(False)
    rows = max(1, rows_per_call(module) // draws)
    full = module.cfg.posterior == "full"
    below = torch.tril_indices(module.latent_dim, module.latent_dim, offset=-1, device=x_all.device)
    locs, scales = [], []
    with torch.inference_mode():
        q0 = frozen.inference(x_all)                                         # batch (n, d)
        L0 = scale_tril(q0) if full else None                                # (n, d, d)
        init = torch.stack([q0.mean, L0.diagonal(dim1=-2, dim2=-1).log() if full else q0.stddev.log()])  # (2, n, d)
        off0 = L0[:, below[0], below[1]] if full else None                   # (n, d(d-1)/2)
    init = init.clone()                                                      # a normal tensor again, for autograd
    with torch.enable_grad():
        for i in range(0, len(x_all), rows):
            x = x_all[i:i + rows].clone()                                    # (b, p)
            theta = init[:, i:i + rows].clone().requires_grad_(True)         # (2, b, d): m, log s
            params = [theta] + ([off0[i:i + rows].clone().requires_grad_(True)] if full else [])
            eps = _Stream(seed ^ _STREAM_OPT, i, len(x), steps * draws, theta[0].detach())
            opt = torch.optim.Adam(params, lr=lr)
            decay = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: 1 - (1 - GAP_REFINE_LR_END) * min(t, steps) / max(steps, 1))
            for t in range(steps):
                qz = _refined(theta, params[1] if full else None, below)   # batch (b,), event (d,)
                e = eps.take(draws)                                          # (draws, b, d)
                loss = -frozen.draw(x, e, qz=qz, closed_form=True).terms.elbo.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                decay.step()
            locs.append(theta[0].detach())
            scales.append(scale_tril(_refined(theta, params[1] if full else None, below)).detach() if full
                          else theta[1].detach().exp())
    return torch.cat(locs), torch.cat(scales)


def _refined(theta: torch.Tensor, off: Optional[torch.Tensor], below: torch.Tensor):
    """q* from its parameters: theta (2, b, d) = m, log s; `off` (b, d(d-1)/2) L's entries below its
    diagonal s for the full family, None for the diagonal one."""
    if off is None:
        return diagonal_normal(theta[0], theta[1].exp())
    L = torch.diag_embed(theta[1].exp())                                     # (b, d, d)
    L[:, below[0], below[1]] = off                                           # out of place for autograd: L is new
    return full_normal(theta[0], L)


# --- the gaps --------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceGaps:
    """log p(x), L[q], L[q*] and the two gaps per sample, each with its Monte Carlo s.e.

    Attributes
    ----------
    log_px, log_px_se : (n,)
        Importance-weighted estimate with k draws from the proposal (`posterior`'s weights).
    elbo_amortized, elbo_amortized_se : (n,)
        L[q] of the encoder's q, `elbo_draws` fresh draws (analytic KL where torch has it).
    elbo_optimal, elbo_optimal_se : (n,)
        L[q*] on the same fresh draws (common random numbers), independent of the optimization's.
    approximation_gap, approximation_gap_se : (n,)
        log p(x) - L[q*]; the s.e. adds the two independent errors in quadrature.
    amortization_gap, amortization_gap_se : (n,)
        L[q*] - L[q]; the s.e. of the per-draw differences (the shared noise cancels most of it).
    mu_opt, sigma_opt : (n, d)
        q*'s mean and (marginal) std.
    posterior : TruePosterior
    k, steps, lr, draws, elbo_draws : the settings used.
    """

    log_px: np.ndarray
    log_px_se: np.ndarray
    elbo_amortized: np.ndarray
    elbo_amortized_se: np.ndarray
    elbo_optimal: np.ndarray
    elbo_optimal_se: np.ndarray
    approximation_gap: np.ndarray
    approximation_gap_se: np.ndarray
    amortization_gap: np.ndarray
    amortization_gap_se: np.ndarray
    mu_opt: np.ndarray
    sigma_opt: np.ndarray
    posterior: TruePosterior
    k: int
    steps: int
    lr: float
    draws: int
    elbo_draws: int
    scale_tril_opt: Optional[np.ndarray] = None  # (n, d, d): q*'s Cholesky factor, full-covariance runs only

    @property
    def distance_opt(self) -> np.ndarray:
        """|m*(x) - E_p[z]| / Std_p[z], shape (n, d)."""
        return np.abs(self.mu_opt - self.posterior.mean) / self.posterior.std

    @property
    def std_ratio_opt(self) -> np.ndarray:
        """s*(x) / Std_p[z], shape (n, d)."""
        return self.sigma_opt / self.posterior.std

    def averages(self) -> dict:
        """Mean over samples of each figure, with the s.e. over samples (which includes the Monte
        Carlo error, independent between samples) and the Monte Carlo part alone, sqrt(sum se^2) / n."""
        n = len(self.log_px)
        out = {}
        for name in ("log_px", "elbo_amortized", "elbo_optimal", "approximation_gap", "amortization_gap"):
            v, se = getattr(self, name), getattr(self, name + "_se")
            out[name] = {"mean": float(v.mean()),
                         "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                         "mc_se": float(np.sqrt(np.square(se).sum()) / n)}
        return out

    def to_dict(self) -> dict:
        tp = self.posterior
        use = tp.reliable if tp.reliable.any() else np.ones(len(tp.ess), bool)
        return {"settings": {"k": self.k, "proposal": tp.proposal, "steps": self.steps, "lr": self.lr,
                             "lr_end": self.lr * GAP_REFINE_LR_END, "draws_per_step": self.draws,
                             "elbo_draws": self.elbo_draws},
                "averages": self.averages(), "true_posterior": tp.to_dict(),
                "distance_opt_per_dim": self.distance_opt[use].mean(0).tolist(),
                "std_ratio_opt_per_dim": self.std_ratio_opt[use].mean(0).tolist()}


def _elbos(module: VAEModule, x_all: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, S: int,
           seed: int) -> dict:
    """L[q] and L[q*] per row on the same S fresh draws: means and s.e. (n,) and the difference's s.e."""
    rows = max(1, rows_per_call(module) // S)
    keys = ("amortized", "amortized_se", "optimal", "optimal_se", "diff_se")
    out = {key: [] for key in keys}
    module.eval()
    with torch.inference_mode():
        pz = module.prior()
        for i in range(0, len(x_all), rows):
            x = x_all[i:i + rows]                                            # (b, p)
            q = module.inference(x)                                          # batch (b, d)
            qs = gaussian(loc[i:i + rows], scale[i:i + rows])
            eps = _noise(seed ^ _STREAM_ELBO, i, len(x), S, q.mean)           # (S, b, d)
            e = []
            for qz in (q, qs):
                dr = module.draw(x, eps, qz=qz, pz=pz, closed_form=True)
                e.append((dr.log_px - dr.terms.kl).double())                 # (S, b): per-draw ELBO
            for name, v in (("amortized", e[0]), ("optimal", e[1])):
                out[name].append(v.mean(0))
                out[name + "_se"].append(v.std(0) / math.sqrt(S))
            out["diff_se"].append((e[1] - e[0]).std(0) / math.sqrt(S))
    return {key: torch.cat(v).cpu().numpy() for key, v in out.items()}


def inference_gaps(module: VAEModule, x_all: torch.Tensor, k: int = GAP_K, steps: int = GAP_REFINE_STEPS, *,
                   seed: int = 0, lr: float = GAP_REFINE_LR, draws: int = REFINE_DRAWS,
                   elbo_draws: int = ELBO_DRAWS, proposal: str = "refined") -> InferenceGaps:
    """log p(x), L[q], L[q*], both gaps and the true posterior for every row of x_all (n, p).

    `proposal`: the importance sampler's, "refined" (q*, default: closer to p(z|x) than q, so more
    effective draws and a tighter log p(x)) or "encoder" (q: log p(x) is then `iwae_log_likelihood`'s).
    """
    if elbo_draws < 2:
        raise ConfigError(f"elbo_draws must be >= 2, got {elbo_draws}")
    if proposal not in ("refined", "encoder"):
        raise ConfigError(f"proposal must be 'refined' or 'encoder', got {proposal!r}")
    loc, scale = refine(module, x_all, steps, seed=seed, lr=lr, draws=draws)
    tp = true_posterior(module, x_all, k, seed, proposal=(loc, scale) if proposal == "refined" else None)
    ev = _elbos(module, x_all, loc, scale, elbo_draws, seed)
    approx_se = np.sqrt(tp.log_px_se ** 2 + ev["optimal_se"] ** 2)
    return InferenceGaps(log_px=tp.log_px, log_px_se=tp.log_px_se,
                         elbo_amortized=ev["amortized"], elbo_amortized_se=ev["amortized_se"],
                         elbo_optimal=ev["optimal"], elbo_optimal_se=ev["optimal_se"],
                         approximation_gap=tp.log_px - ev["optimal"], approximation_gap_se=approx_se,
                         amortization_gap=ev["optimal"] - ev["amortized"], amortization_gap_se=ev["diff_se"],
                         mu_opt=loc.double().cpu().numpy(),
                         sigma_opt=gaussian(loc, scale).stddev.double().cpu().numpy(),
                         posterior=tp, k=k, steps=steps, lr=lr, draws=draws, elbo_draws=elbo_draws,
                         scale_tril_opt=scale.double().cpu().numpy() if scale.ndim == 3 else None)
