"""In what sense mu(x) and sigma(x) are unique.

* Within one model they are functions of x: `batch_invariance` checks that the same x gets the
  same mu, sigma whatever else is in the batch.
* Across equally good models they are not: the ELBO is unchanged by every orthogonal map of the
  latent space that maps the posterior family and the prior to themselves. `symmetry_report`
  (in `symmetries`) measures which maps are free for a trained model: signed permutations for a
  diagonal posterior (Rolinek et al. 2019), every orthogonal map for a full-covariance posterior
  with the N(0, I) or the VampPrior. `signed_permutation` and `rotate` edit a copy's weights.
* Across retrainings, `compare` measures how far two models' latents agree: matched
  correlations (MCC), linear CKA, linear-map R^2 and an orthogonal-Procrustes-aligned MCC, with
  collapsed latents kept apart; `expected_agreement` says which of them the models' symmetry
  group makes meaningful.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment

from .errors import ConfigError, DataError
from .evaluate import to_tensor
from .io import jsonable
from .latentmaps import check_orthogonal, plane_rotation  # noqa: F401  (plane_rotation re-exported: tests use it)
from .posterior import active_mask, warn_batch_dependent
from .symmetries import PERMUTATION_RTOL, MapCost, SymmetryReport, symmetry_report  # noqa: F401  (re-exported)


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
    if module.cfg.posterior != "diagonal":
        # the Cholesky factor of a permuted covariance is not the permuted factor: no edit of the
        # heads gives it, so the map is applied to the distributions instead
        raise ConfigError("editing the heads needs --posterior diagonal; for a full-covariance model use "
                          "vaelens.latentmaps.MappedVAE (what symmetry_report does)")
    return enc.mu_head, enc.sigma_head, first


def signed_permutation(module, perm: Sequence[int], signs: Sequence[float]):
    """A copy of a diagonal-posterior `module` whose latent j is signs[j] * (old latent perm[j]).

    mu_head rows are permuted and signed, sigma_head rows permuted (a std has no sign), and the
    decoder's first layer gets the matching columns, so the decoder sees the same input. A MoG
    prior's means are permuted and signed and its scales permuted; N(0, I) is invariant and the
    VampPrior follows the encoder. Hence the ELBO of every sample is unchanged.
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
        if new.cfg.prior == "mog":
            new.prior_means.copy_(new.prior_means[:, p] * s)                 # (K, d)
            new.prior_raw_scales.copy_(new.prior_raw_scales[:, p])
    return new.eval()


def rotate(module, R: np.ndarray):
    """A copy of a diagonal-posterior `module` whose posterior mean is R mu(x) and whose decoder reads R^T z.

    The sigma head is left as it is: the posterior stays diagonal in the new axes with the old
    sigmas. The mean path and the decoder are equivalent to the original; the posterior's shape is
    not. (`latentmaps.MappedVAE` maps the whole model, sigma moment-matched and prior included.)
    """
    d = module.latent_dim
    R = check_orthogonal(R, d)
    new = copy.deepcopy(module)
    mu_head, _, first = _linear_heads(new)
    Rt = torch.as_tensor(R, dtype=mu_head.weight.dtype)
    with torch.no_grad():
        mu_head.weight.copy_(Rt @ mu_head.weight)
        mu_head.bias.copy_(Rt @ mu_head.bias)
        first.weight.copy_(first.weight @ Rt.T)
    return new.eval()


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
    procrustes_mcc : float
        Mean |correlation| between b's active latents and a's active means turned by the orthogonal
        map that best fits b on the matching half (orthogonal Procrustes), scored on the other half:
        the agreement to read when the models are invariant under rotations, where the axes
        themselves carry no meaning.
    procrustes_corr : ndarray of shape (m_b,)
        Those held-out correlations, one per active latent of b.
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
    procrustes_mcc: float
    procrustes_corr: np.ndarray
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

    def verdict(self, threshold: float = 0.9, measure: str = "mcc") -> str:
        """One line: identical up to signed permutation, up to a rotation, up to a linear map, or different.

        `measure` "procrustes" (a model whose group is the orthogonal maps, see `expected_agreement`)
        judges agreement up to a rotation by the Procrustes-aligned MCC before the axis-by-axis one.
        """
        if len(self.pairs) == 0:
            return "no active latents to compare"
        r2 = min(self.r2_ab, self.r2_ba)
        if measure == "procrustes" and self.procrustes_mcc >= threshold and r2 >= threshold \
                and self.mcc_pearson < threshold:
            return (f"same code up to a rotation (Procrustes MCC {self.procrustes_mcc:.3f} >= {threshold}, R^2 "
                    f"{r2:.3f}), as this model's symmetry group allows")
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


def procrustes_corr(fit_a, fit_b, test_a, test_b) -> np.ndarray:
    """Held-out correlations (m_b,) of b's columns with a's turned by the orthogonal Procrustes map fitted on the fit rows.

    a and b are centred by their fit-half means; when their widths differ the narrower is padded
    with zero columns (an orthogonal map needs square shapes), and only b's real columns are scored.
    """
    m = max(fit_a.shape[1], fit_b.shape[1])

    def prep(v, mean):
        v = v - mean
        return np.hstack([v, np.zeros((len(v), m - v.shape[1]))])

    ma, mb = fit_a.mean(0), fit_b.mean(0)
    R, _ = orthogonal_procrustes(prep(fit_a, ma), prep(fit_b, mb))          # argmin ||A R - B||, R^T R = I
    turned = prep(test_a, ma) @ R                                            # (n_test, m)
    k = test_b.shape[1]
    return np.diag(_corr(turned[:, :k], test_b))


def expected_agreement(posterior_a: str, prior_a: str, posterior_b: Optional[str] = None,
                       prior_b: Optional[str] = None) -> dict:
    """What agreement across retrainings the models' symmetry group allows, from their configs.

    Returns {"group", "measure", "line"}: measure "mcc" (axis by axis after signed-permutation
    matching) when the group is the signed permutations, "procrustes" (Procrustes-aligned MCC, R^2,
    CKA) when every orthogonal map is free, "linear" (R^2, CKA) for models of different kinds.
    The group is the one `symmetry_report` measures for these choices (docs/posterior.md).
    """
    posterior_b = posterior_a if posterior_b is None else posterior_b
    prior_b = prior_a if prior_b is None else prior_b
    if (posterior_a, prior_a) != (posterior_b, prior_b):
        return {"group": None, "measure": "linear",
                "line": (f"the runs differ (posterior {posterior_a} vs {posterior_b}, prior {prior_a} vs {prior_b}): "
                         "no common symmetry group, so only a linear map can relate them; read R^2 and CKA")}
    kind = f"posterior {posterior_a}, prior {prior_a}"
    if posterior_a == "full" and prior_a in ("normal", "vamp"):
        return {"group": "orthogonal maps", "measure": "procrustes",
                "line": (f"{kind}: every orthogonal map of the latent space leaves the ELBO unchanged, so "
                         "retrainings can agree at most up to a rotation: read the Procrustes-aligned MCC, R^2 "
                         "and CKA; the axis-by-axis MCC is not meaningful")}
    why = ("a diagonal posterior makes" if posterior_a == "diagonal" else "the MoG prior's diagonal components make")
    return {"group": "signed permutations", "measure": "mcc",
            "line": (f"{kind}: {why} rotations cost ELBO, so the latents are at best unique up to a "
                     "signed permutation: the axis-by-axis MCC is meaningful (1 = the same axes); the "
                     "Procrustes-aligned MCC, R^2 and CKA also count agreement up to a rotation")}


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
                          procrustes_mcc=0.0, procrustes_corr=empty, pairs=np.zeros((0, 2), np.int64), corr=empty, spearman=empty, sigma_a=empty,
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
    pcorr = procrustes_corr(A[fit], B[fit], A[test], B[test])
    return Comparison(
        mcc_pearson=float(np.abs(corr).mean()), mcc_spearman=float(np.abs(rho).mean()),
        cka=linear_cka(A, B), r2_ab=_r2(A[fit], B[fit], A[test], B[test]), r2_ba=_r2(B[fit], A[fit], B[test], A[test]),
        procrustes_mcc=float(np.abs(pcorr).mean()), procrustes_corr=pcorr, pairs=np.stack([ia[rows], ib[cols]], 1), corr=corr, spearman=rho_pairs,
        sigma_a=sigma_a[:, ia[rows]].mean(0), sigma_b=sigma_b[:, ib[cols]].mean(0), sigma_corr=sig_corr,
        active_a=act_a, active_b=act_b, inactive_a=np.flatnonzero(~act_a), inactive_b=np.flatnonzero(~act_b),
        unmatched_a=np.setdiff1d(ia, ia[rows]), unmatched_b=np.setdiff1d(ib, ib[cols]))
