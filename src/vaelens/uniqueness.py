"""In what sense mu(x) and sigma(x) are unique.

* Within one model they are functions of x: `batch_invariance` checks that the same x gets the
  same mu, sigma whatever else is in the batch.
* Across equally good models they are not: the prior N(0, I) and the ELBO are unchanged by a
  signed permutation of the latent axes (`signed_permutation`), so mu, sigma are at best unique
  up to one. A rotation also leaves the prior unchanged, but a diagonal posterior cannot follow
  it, so it costs ELBO (`rotate`, `symmetry_report`; Rolinek et al. 2019).
* Across retrainings, `compare` measures how far two models' latents agree: matched
  correlations (MCC), linear CKA and linear-map R^2, with collapsed latents kept apart.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment


from .errors import ConfigError, DataError
from .evaluate import to_tensor
from .io import jsonable
from .model import diagonal_normal
from .posterior import active_mask, warn_batch_dependent

# Per-sample relative ELBO change allowed under a signed permutation: the map is exact, and the
# comparison runs in float64, so only rounding remains.
PERMUTATION_RTOL = 1e-4


# --- uniqueness within one model ------------------------------------------------------------

@dataclass(frozen=True)
class BatchInvariance:
    """Largest change of mu and sigma when the same samples are encoded in other batches.

    Attributes
    ----------
    max_abs_mu, max_abs_sigma : float
        Over all samples and all batch compositions tried.
    batch_sizes : list of int
    layers : list of str
        Encoder layers that may make the encoding batch-dependent (see `posterior.batch_dependent_layers`).
    passed : bool
        Both maxima within `atol`.
    """

    max_abs_mu: float
    max_abs_sigma: float
    batch_sizes: list
    layers: list
    atol: float
    passed: bool

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def batch_invariance(module, X, batch_sizes: Sequence[int] = (1, 7, 64), seed: int = 0,
                     atol: float = 1e-5) -> BatchInvariance:
    """Encode X whole, then shuffled in batches of other sizes, and compare per sample.

    Float32 matrix products may take different kernel paths for different batch sizes, so
    equality is checked to `atol`, not bit for bit.
    """
    layers = warn_batch_dependent(module)
    Xt = to_tensor(module, X)
    n = len(Xt)
    module.eval()
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        ref = module.inference(Xt)                                            # batch (n, d)
        dmu, dsig = 0.0, 0.0
        for b in batch_sizes:
            perm = torch.as_tensor(rng.permutation(n), device=Xt.device)
            mus, sigmas = [], []
            for i in range(0, n, b):
                q = module.inference(Xt[perm[i:i + b]])
                mus.append(q.mean)
                sigmas.append(q.stddev)
            mu = torch.empty_like(ref.mean)
            sigma = torch.empty_like(ref.stddev)
            mu[perm] = torch.cat(mus)
            sigma[perm] = torch.cat(sigmas)
            dmu = max(dmu, float((mu - ref.mean).abs().max()))
            dsig = max(dsig, float((sigma - ref.stddev).abs().max()))
    return BatchInvariance(max_abs_mu=dmu, max_abs_sigma=dsig, batch_sizes=list(batch_sizes), layers=layers,
                           atol=atol, passed=bool(dmu <= atol and dsig <= atol))


# --- latent symmetries ----------------------------------------------------------------------

def _linear_heads(module):
    enc = module.encoder
    first = module.decoder.first
    if not all(isinstance(m, torch.nn.Linear) for m in (enc.mu_head, enc.sigma_head, first)):
        raise ConfigError("latent symmetries need linear encoder heads and a linear first decoder layer")
    return enc.mu_head, enc.sigma_head, first


def signed_permutation(module, perm: Sequence[int], signs: Sequence[float]):
    """A copy of `module` whose latent j is signs[j] * (old latent perm[j]).

    mu_head rows are permuted and signed, sigma_head rows permuted (a std has no sign), and the
    decoder's first layer gets the matching columns, so the decoder sees the same input. The
    prior N(0, I) is invariant, hence the ELBO of every sample is unchanged.
    """
    d = module.latent_dim
    perm = np.asarray(perm, dtype=np.int64)
    signs = np.asarray(signs, dtype=np.float64)
    if sorted(perm.tolist()) != list(range(d)) or signs.shape != (d,) or not np.all(np.abs(signs) == 1):
        raise ConfigError(f"perm must be a permutation of 0..{d - 1} and signs {d} values of +-1")
    new = copy.deepcopy(module)
    mu_head, sigma_head, first = _linear_heads(new)
    p = torch.as_tensor(perm)
    s = torch.as_tensor(signs, dtype=mu_head.weight.dtype)
    with torch.no_grad():
        mu_head.weight.copy_(s[:, None] * mu_head.weight[p])
        mu_head.bias.copy_(s * mu_head.bias[p])
        sigma_head.weight.copy_(sigma_head.weight[p])
        sigma_head.bias.copy_(sigma_head.bias[p])
        first.weight.copy_(first.weight[:, p] * s[None, :])
    return new.eval()


def rotate(module, R: np.ndarray):
    """A copy of `module` whose posterior mean is R mu(x) and whose decoder reads R^T z.

    The sigma head is left as it is: the posterior stays diagonal in the new axes, which is
    exactly what a diagonal-Gaussian VAE can express. The mean path and the decoder are
    equivalent to the original; the posterior's shape is not, so the ELBO changes.
    """
    d = module.latent_dim
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (d, d) or not np.allclose(R @ R.T, np.eye(d), atol=1e-6):
        raise ConfigError(f"R must be an orthogonal {d}x{d} matrix")
    new = copy.deepcopy(module)
    mu_head, _, first = _linear_heads(new)
    Rt = torch.as_tensor(R, dtype=mu_head.weight.dtype)
    with torch.no_grad():
        mu_head.weight.copy_(Rt @ mu_head.weight)
        mu_head.bias.copy_(Rt @ mu_head.bias)
        first.weight.copy_(first.weight @ Rt.T)
    return new.eval()


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


def elbo_with_noise(module, x: torch.Tensor, eps: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample ELBO with given standard-normal noise eps (S, n, d), shape (n,).

    `VAEModule.terms` draws its own noise; fixing it here lets two models that should agree be
    compared on the same z (mapped through the symmetry), so the difference is exact, not Monte Carlo.
    `sigma` (n, d) replaces the encoder's scales.
    """
    qz = module.inference(x)                                                 # batch (n, d)
    if sigma is not None:
        qz = diagonal_normal(qz.mean, sigma)
    return module.draw(x, eps, qz=qz).terms.elbo


@dataclass(frozen=True)
class SymmetryReport:
    """ELBO under a random signed permutation and under 45-degree rotations of the latent space.

    Attributes
    ----------
    perm, signs : ndarray of shape (d,)
    elbo : ndarray of shape (n,)
        Per-sample ELBO of the original model (float64, fixed noise).
    elbo_perm : ndarray of shape (n,)
    perm_max_rel_diff : float
        max |elbo_perm - elbo| / |elbo|.
    mu_max_change : float
        max |mu_perm - mu|: mu itself does change.
    mu_map_error : float
        max |mu_perm - signs * mu[:, perm]|: and it changes exactly as the symmetry says.
    perm_invariant : bool
        perm_max_rel_diff <= 1e-4.
    rotation_planes : ndarray of shape (r, 2)
        The pair of latents each rotation turns by 45 degrees (distinct pairs of active latents, at random).
    rotation_drop : ndarray of shape (r,)
        Mean ELBO lost per sample (nats) for each rotation, sigma head kept.
    rotation_drop_se : ndarray of shape (r,)
        Its standard error over samples (same noise for both models, so the difference is paired).
    rotation_drop_matched : ndarray of shape (r,)
        The loss when each rotated posterior gets the moment-matched diagonal
        sigma'_j^2 = sum_k R_jk^2 sigma_k^2 instead: the best a diagonal posterior can do by
        matching marginal variances.
    rotation_significant : bool
        Every rotation's drop exceeds 3 standard errors (two-sided 0.3% each, paired over samples).
    """

    perm: np.ndarray
    signs: np.ndarray
    elbo: np.ndarray
    elbo_perm: np.ndarray
    perm_max_rel_diff: float
    mu_max_change: float
    mu_map_error: float
    perm_invariant: bool
    rotation_planes: np.ndarray
    rotation_drop: np.ndarray
    rotation_drop_se: np.ndarray
    rotation_drop_matched: np.ndarray
    rotation_significant: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["elbo_mean"] = float(self.elbo.mean())
        d["elbo_perm_mean"] = float(self.elbo_perm.mean())
        d.pop("elbo")
        d.pop("elbo_perm")
        return jsonable(d)


def symmetry_report(module, X, seed: int = 0, n_samples: int = 16, n_rotations: int = 3,
                    max_rows: int = 2000) -> SymmetryReport:
    """Apply a random signed permutation and 45-degree plane rotations to a trained model; compare ELBOs.

    Everything runs in float64 on copies of the model with the same standard-normal noise,
    mapped through each symmetry, so the permutation's ELBO difference is rounding only.

    Parameters
    ----------
    module : VAEModule
    X : array or tensor of shape (n, p), transformed as the model expects
    seed : int
    n_samples : int
        Draws of z per sample for the reconstruction term.
    n_rotations : int
    max_rows : int
        Use at most this many rows of X (the first ones).
    """
    base = copy.deepcopy(module).double().eval()
    x = to_tensor(module, X)[:max_rows].double()
    n, d = len(x), module.latent_dim
    rng = np.random.default_rng(seed)
    perm = rng.permutation(d)
    signs = rng.choice([-1.0, 1.0], size=d)
    if (perm == np.arange(d)).all() and (signs > 0).all():
        signs[rng.integers(d)] = -1.0  # the identity would test nothing
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((n_samples, n, d), generator=g, dtype=torch.float64).to(x.device)   # (S, n, d)
    pm = signed_permutation(base, perm, signs)
    tp = torch.as_tensor(perm, device=x.device)
    ts = torch.as_tensor(signs, device=x.device)
    with torch.inference_mode():
        elbo = elbo_with_noise(base, x, eps)                                 # (n,)
        elbo_p = elbo_with_noise(pm, x, ts * eps[..., tp])                   # same z, mapped: z' = signs * z[perm]
        q0, qp = base.inference(x), pm.inference(x)
        mu_change = float((qp.mean - q0.mean).abs().max())
        mu_map = float((qp.mean - ts * q0.mean[:, tp]).abs().max())
        drops, ses, matched, planes = [], [], [], []
        # planes of active latents first: rotating two collapsed latents (mu = 0, sigma = 1, unread by
        # the decoder) changes nothing, which says nothing about the code
        act = np.flatnonzero(active_mask(q0.mean.cpu().numpy()))
        pool = act if len(act) >= 2 else np.arange(d)
        pairs = [(int(a), int(b)) for k, a in enumerate(pool) for b in pool[k + 1:]]
        for r in rng.permutation(len(pairs))[:n_rotations]:
            i, j = pairs[r]
            planes.append((i, j))
            R = plane_rotation(d, i, j)
            rm = rotate(base, R)
            Rt = torch.as_tensor(R, device=x.device)
            diff = elbo - elbo_with_noise(rm, x, eps)                        # (n,)
            sig_mm = torch.sqrt((q0.stddev ** 2) @ (Rt ** 2).T)                # (n, d)
            diff_mm = elbo - elbo_with_noise(rm, x, eps, sigma=sig_mm)
            drops.append(float(diff.mean()))
            ses.append(float(diff.std() / math.sqrt(n)) if n > 1 else 0.0)
            matched.append(float(diff_mm.mean()))
    elbo_np, elbo_p_np = elbo.cpu().numpy(), elbo_p.cpu().numpy()
    rel = float((np.abs(elbo_p_np - elbo_np) / np.maximum(np.abs(elbo_np), 1e-12)).max())
    drops, ses = np.asarray(drops), np.asarray(ses)
    return SymmetryReport(perm=perm, signs=signs, elbo=elbo_np, elbo_perm=elbo_p_np, perm_max_rel_diff=rel,
                          rotation_planes=np.asarray(planes, dtype=np.int64).reshape(-1, 2),
                          mu_max_change=mu_change, mu_map_error=mu_map, perm_invariant=bool(rel <= PERMUTATION_RTOL),
                          rotation_drop=drops, rotation_drop_se=ses, rotation_drop_matched=np.asarray(matched),
                          rotation_significant=bool(n_rotations > 0 and np.all(drops > 3 * ses)))


# --- across retrainings ---------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """How well two models' latent codes for the same samples agree.

    Attributes
    ----------
    mcc_pearson, mcc_spearman : float
        Mean |correlation| over latent pairs matched by the Hungarian method on one half of the
        samples and scored on the other half (active latents only).
    cka : float
        Linear CKA of the active latents' means (Kornblith et al. 2019), all samples.
    r2_ab, r2_ba : float
        Held-out R^2 of the best affine map from a's active means to b's, and back.
    pairs : ndarray of shape (m, 2)
        Matched (latent of a, latent of b), Pearson matching.
    corr, spearman : ndarray of shape (m,)
        Signed held-out correlations of the matched pairs.
    sigma_a, sigma_b : ndarray of shape (m,)
        Mean sigma of each matched latent.
    sigma_corr : ndarray of shape (m,)
        Correlation of log sigma across samples within each matched pair.
    active_a, active_b : ndarray of shape (d_a,), (d_b,), bool
    inactive_a, inactive_b : ndarray
        Indices of collapsed latents, reported apart so they neither inflate nor hide the score.
    unmatched_a, unmatched_b : ndarray
        Active latents left without a partner when the active counts differ.
    """

    mcc_pearson: float
    mcc_spearman: float
    cka: float
    r2_ab: float
    r2_ba: float
    pairs: np.ndarray
    corr: np.ndarray
    spearman: np.ndarray
    sigma_a: np.ndarray
    sigma_b: np.ndarray
    sigma_corr: np.ndarray
    active_a: np.ndarray
    active_b: np.ndarray
    inactive_a: np.ndarray
    inactive_b: np.ndarray
    unmatched_a: np.ndarray
    unmatched_b: np.ndarray

    def verdict(self, threshold: float = 0.9) -> str:
        """One line: identical up to signed permutation, up to a linear map, or different."""
        if len(self.pairs) == 0:
            return "no active latents to compare"
        r2 = min(self.r2_ab, self.r2_ba)
        if self.mcc_pearson >= threshold and r2 >= threshold:
            return f"same code up to a signed permutation (MCC {self.mcc_pearson:.3f} >= {threshold})"
        if r2 >= threshold:
            return (f"same code up to a linear map (R^2 {r2:.3f}), but not axis by axis "
                    f"(MCC {self.mcc_pearson:.3f} < {threshold}): the map mixes latents")
        return f"different codes (MCC {self.mcc_pearson:.3f}, linear R^2 {r2:.3f})"

    def to_dict(self) -> dict:
        d = jsonable(asdict(self))
        d["verdict"] = self.verdict()
        return d


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations between the columns of a (n, da) and b (n, db), shape (da, db)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na = np.sqrt((a ** 2).sum(0))
    nb = np.sqrt((b ** 2).sum(0))
    return (a.T @ b) / np.maximum(np.outer(na, nb), 1e-300)


def _rank(a: np.ndarray) -> np.ndarray:
    return np.apply_along_axis(stats.rankdata, 0, a)


def _matched(fit_a, fit_b, test_a, test_b):
    cfit = np.abs(_corr(fit_a, fit_b))
    rows, cols = linear_sum_assignment(-cfit)
    ctest = _corr(test_a, test_b)
    return rows, cols, ctest[rows, cols]


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centered kernel alignment between representations a (n, da) and b (n, db)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = np.linalg.norm(a.T @ b) ** 2
    den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    return float(num / den) if den > 0 else 0.0


def _r2(fit_x, fit_y, test_x, test_y) -> float:
    """Held-out R^2 of the least-squares affine map x -> y, pooled over y's columns."""
    A = np.hstack([fit_x, np.ones((len(fit_x), 1))])
    coef, *_ = np.linalg.lstsq(A, fit_y, rcond=None)
    pred = np.hstack([test_x, np.ones((len(test_x), 1))]) @ coef
    ss_res = ((test_y - pred) ** 2).sum()
    ss_tot = ((test_y - test_y.mean(0)) ** 2).sum()
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else 0.0


def compare(mu_a: np.ndarray, mu_b: np.ndarray, sigma_a: Optional[np.ndarray] = None,
            sigma_b: Optional[np.ndarray] = None, active_a: Optional[np.ndarray] = None,
            active_b: Optional[np.ndarray] = None, seed: int = 0) -> Comparison:
    """Compare two models' posteriors for the same n samples.

    Parameters
    ----------
    mu_a, mu_b : ndarray of shape (n, d_a), (n, d_b)
    sigma_a, sigma_b : ndarray of the same shapes, optional
    active_a, active_b : bool ndarray of shape (d_a,), (d_b,), optional
        Default: `posterior.active_mask` (Var mu > 0.01).
    seed : int
        Seeds the split of the samples into a matching half and a scoring half.
    """
    mu_a = np.asarray(mu_a, np.float64)
    mu_b = np.asarray(mu_b, np.float64)
    if mu_a.ndim != 2 or mu_b.ndim != 2 or len(mu_a) != len(mu_b):
        raise DataError(f"mu_a and mu_b must be (n, d) arrays for the same samples, got {mu_a.shape}, {mu_b.shape}")
    n = len(mu_a)
    if n < 8:
        raise DataError(f"comparing latents needs at least 8 samples, got {n}")
    sigma_a = np.ones_like(mu_a) if sigma_a is None else np.asarray(sigma_a, np.float64)
    sigma_b = np.ones_like(mu_b) if sigma_b is None else np.asarray(sigma_b, np.float64)
    act_a = active_mask(mu_a) if active_a is None else np.asarray(active_a, bool)
    act_b = active_mask(mu_b) if active_b is None else np.asarray(active_b, bool)
    ia, ib = np.flatnonzero(act_a), np.flatnonzero(act_b)
    perm = np.random.default_rng(seed).permutation(n)
    fit, test = perm[: n // 2], perm[n // 2:]
    A, B = mu_a[:, ia], mu_b[:, ib]
    if len(ia) == 0 or len(ib) == 0:
        empty = np.zeros(0)
        return Comparison(mcc_pearson=0.0, mcc_spearman=0.0, cka=0.0, r2_ab=0.0, r2_ba=0.0,
                          pairs=np.zeros((0, 2), np.int64), corr=empty, spearman=empty, sigma_a=empty,
                          sigma_b=empty, sigma_corr=empty, active_a=act_a, active_b=act_b,
                          inactive_a=np.flatnonzero(~act_a), inactive_b=np.flatnonzero(~act_b),
                          unmatched_a=ia, unmatched_b=ib)
    rows, cols, corr = _matched(A[fit], B[fit], A[test], B[test])
    # Spearman = Pearson of ranks, ranked within each half so the halves stay independent
    ra_fit, rb_fit, ra_test, rb_test = _rank(A[fit]), _rank(B[fit]), _rank(A[test]), _rank(B[test])
    _, _, rho = _matched(ra_fit, rb_fit, ra_test, rb_test)
    rho_pairs = _corr(ra_test, rb_test)[rows, cols]                    # for the Pearson-matched table
    la, lb = np.log(sigma_a[:, ia[rows]]), np.log(sigma_b[:, ib[cols]])
    sig_corr = np.array([_corr(la[:, [j]], lb[:, [j]])[0, 0] for j in range(len(rows))])
    return Comparison(
        mcc_pearson=float(np.abs(corr).mean()), mcc_spearman=float(np.abs(rho).mean()),
        cka=linear_cka(A, B), r2_ab=_r2(A[fit], B[fit], A[test], B[test]), r2_ba=_r2(B[fit], A[fit], B[test], A[test]),
        pairs=np.stack([ia[rows], ib[cols]], 1), corr=corr, spearman=rho_pairs,
        sigma_a=sigma_a[:, ia[rows]].mean(0), sigma_b=sigma_b[:, ib[cols]].mean(0), sigma_corr=sig_corr,
        active_a=act_a, active_b=act_b, inactive_a=np.flatnonzero(~act_a), inactive_b=np.flatnonzero(~act_b),
        unmatched_a=np.setdiff1d(ia, ia[rows]), unmatched_b=np.setdiff1d(ib, ib[cols]))
