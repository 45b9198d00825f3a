"""Which orthogonal maps of the latent space leave a trained model's ELBO unchanged: measured.

`symmetry_report` maps the whole model (posterior, decoder, prior; see `latentmaps`) by three kinds
of orthogonal map and compares the per-sample ELBO with the original's on the same noise mapped
through the map:

* signed permutations (z'_j = s_j z_perm(j)): every family here holds them exactly;
* rotations by several angles in random planes of two (active) latents (Givens rotations);
* Haar-random orthogonal maps (rotations and reflections of the whole space).

A kind of map is a symmetry when every map of that kind tried changes the mean ELBO by no more than
max(3 s.e., atol) nats per sample; the verdict names the group the measured kinds make up.

Expected (Rolinek et al. 2019; Lucas et al. 2019): the diagonal family with N(0, I), a MoG (its
components are diagonal) or the VampPrior is invariant under signed permutations only; the full
family with N(0, I) or the VampPrior (whose components are the encoder's full-covariance posteriors)
under every orthogonal map; the full family with a MoG prior again under signed permutations only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .config import SYMMETRY_ATOL
from .evaluate import to_tensor
from .io import jsonable
from .latentmaps import MappedVAE, haar_orthogonal, paired_noise, plane_rotation, signed_permutation_matrix
from .posterior import active_mask

# Per-sample relative ELBO change allowed under a signed permutation: the map is exact, and the
# comparison runs in float64, so only rounding remains.
PERMUTATION_RTOL = 1e-4
DEFAULT_ANGLES = (math.pi / 16, math.pi / 8, math.pi / 4)
KINDS = ("signed permutation", "plane rotation", "orthogonal")
# The family holds a mapped distribution exactly when the projection changes its covariance by
# less than this (relative): float64 rounding is ~1e-16.
EXACT_RTOL = 1e-9


@dataclass(frozen=True)
class MapCost:
    """One map R applied to the whole model, and what it changed.

    change, se : mean over samples of ELBO(mapped) - ELBO(original) in nats, and its standard error
        (paired: the same or paired noise for both models).
    max_rel_diff : largest per-sample |change| / |ELBO|.
    projection_error : how far the posterior family and the prior's family are from holding R q and
        R p (relative; 0 up to rounding when they hold them exactly).
    exact_pairing : the mapped noise gives z' = R z exactly (else paired draws, see `paired_noise`).
    within : |change| <= max(3 se, atol).
    """

    kind: str
    label: str
    R: np.ndarray
    change: float
    se: float
    max_rel_diff: float
    projection_error: float
    exact_pairing: bool
    within: bool

    @property
    def exact(self) -> bool:
        """Whether the families hold the mapped posterior and prior exactly (the map is a symmetry by theory)."""
        return self.projection_error <= EXACT_RTOL


@dataclass(frozen=True)
class SymmetryReport:
    """ELBO under signed permutations, plane rotations and Haar-random orthogonal maps of the latent space.

    Attributes
    ----------
    posterior, prior : str
        The model's posterior family and prior.
    maps : list of MapCost
        Every map tried, in the order of `KINDS`.
    atol : float
        The tolerance's floor in nats per sample (see `SYMMETRY_ATOL`).
    kinds : dict
        Per kind of map: tried, invariant (every map within tolerance), worst change and its s.e.
    group : str
        The group the model is measured to be invariant under, e.g. "signed permutations".
    perm, signs : ndarray of shape (d,)
        The first signed permutation tried.
    elbo : ndarray of shape (n,)
        Per-sample ELBO of the original model (float64, fixed noise).
    elbo_perm : ndarray of shape (n,)
        Under the first signed permutation.
    perm_max_rel_diff : float
        max |elbo_perm - elbo| / |elbo|.
    mu_max_change : float
        max |mu_perm - mu|: mu itself does change.
    mu_map_error : float
        max |mu_perm - signs * mu[:, perm]|: and it changes exactly as the symmetry says.
    perm_invariant : bool
        perm_max_rel_diff <= PERMUTATION_RTOL.
    rotation_planes : ndarray of shape (r, 2)
        The planes of the 45-degree rotations (distinct pairs of active latents, at random).
    rotation_drop, rotation_drop_se : ndarray of shape (r,)
        Mean ELBO lost per sample (nats) by each 45-degree rotation of the whole model, and its s.e.
    rotation_drop_matched : ndarray of shape (r,)
        The same numbers (the mapped posterior is always the moment-matched one now); kept for
        readers of older JSON.
    rotation_significant : bool
        Every 45-degree rotation loses ELBO beyond the tolerance.
    """

    posterior: str
    prior: str
    maps: list
    atol: float
    kinds: dict
    group: str
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
        d["maps"] = [dict(asdict(m), exact=m.exact) for m in self.maps]
        d["elbo_mean"] = float(self.elbo.mean())
        d["elbo_perm_mean"] = float(self.elbo_perm.mean())
        d.pop("elbo")
        d.pop("elbo_perm")
        return jsonable(d)


def group_name(kinds: dict) -> str:
    """The group that the kinds of map found free make up, in words."""
    ok = {k: v["invariant"] for k, v in kinds.items() if v["tried"]}
    if not ok:
        return "none tried"
    if all(ok.values()):
        if "orthogonal" in ok:
            return "orthogonal maps (rotations and reflections)"
        return "signed permutations and the plane rotations tried" if ok.get("plane rotation") else \
            "signed permutations"
    if ok.get("signed permutation"):
        return ("signed permutations (and the plane rotations tried, but not general orthogonal maps)"
                if ok.get("plane rotation") else "signed permutations")
    return "none of the maps tried"


def _signed_permutations(d: int, count: int, rng: np.random.Generator):
    out = []
    for _ in range(count):
        perm, signs = rng.permutation(d), rng.choice([-1.0, 1.0], size=d)
        if (perm == np.arange(d)).all() and (signs > 0).all():
            signs[rng.integers(d)] = -1.0  # the identity would test nothing
        out.append((perm, signs))
    return out


def _planes(mu: np.ndarray, count: int, rng: np.random.Generator):
    # planes of active latents first: rotating two collapsed latents (mu = 0, sigma = 1, unread by
    # the decoder) changes nothing, which says nothing about the code
    d = mu.shape[1]
    act = np.flatnonzero(active_mask(mu))
    pool = act if len(act) >= 2 else np.arange(d)
    pairs = [(int(a), int(b)) for k, a in enumerate(pool) for b in pool[k + 1:]]
    return [pairs[r] for r in rng.permutation(len(pairs))[:count]]


def map_cost(base, x: torch.Tensor, eps: torch.Tensor, elbo: torch.Tensor, R: np.ndarray, kind: str,
             label: str, atol: float = SYMMETRY_ATOL):
    """Apply R to the whole model `base` (float64) and compare per-sample ELBOs on paired noise.

    Returns (MapCost, the mapped model's per-sample ELBO (n,), its q(z|x)).
    """
    mapped = MappedVAE(base, R)
    q0, q1 = base.inference(x), mapped.inference(x)                          # batch (n,), event (d,)
    O, pair_err = paired_noise(q0, q1, mapped.R)                             # (n, d, d)
    eps1 = (O @ eps.unsqueeze(-1)).squeeze(-1)                               # (S, n, d): z' = R z when exact
    elbo1 = mapped.draw(x, eps1, qz=q1).terms.elbo                           # (n,)
    diff = (elbo1 - elbo).cpu().numpy()
    n = len(diff)
    change, se = float(diff.mean()), float(diff.std() / math.sqrt(n)) if n > 1 else 0.0
    rel = float((np.abs(diff) / np.maximum(np.abs(elbo.cpu().numpy()), 1e-12)).max())
    cost = MapCost(kind=kind, label=label, R=np.asarray(R), change=change, se=se, max_rel_diff=rel,
                   projection_error=mapped.projection_error(x), exact_pairing=bool(pair_err <= 1e-8),
                   within=bool(abs(change) <= max(3 * se, atol)))
    return cost, elbo1, q1


def _kinds(maps) -> dict:
    out = {}
    for kind in KINDS:
        ms = [m for m in maps if m.kind == kind]
        worst = max(ms, key=lambda m: abs(m.change), default=None)
        out[kind] = {"tried": len(ms), "invariant": bool(ms) and all(m.within for m in ms),
                     "exact": bool(ms) and all(m.exact for m in ms),
                     "worst_change": worst.change if worst else None, "worst_se": worst.se if worst else None}
    return out


def symmetry_report(module, X, seed: int = 0, n_samples: int = 16, n_rotations: int = 3, max_rows: int = 2000,
                    n_permutations: int = 3, angles: Sequence[float] = DEFAULT_ANGLES, n_orthogonal: int = 3,
                    atol: Optional[float] = None) -> SymmetryReport:
    """Map a trained model by signed permutations, plane rotations and Haar orthogonal maps; compare ELBOs.

    Everything runs in float64 on copies of the model with the same standard-normal noise, mapped
    through each map (`latentmaps.paired_noise`), so an exact symmetry's difference is rounding only.

    Parameters
    ----------
    module : VAEModule
    X : array or tensor of shape (n, p), transformed as the model expects
    seed : int
        Seeds the maps and the noise.
    n_samples : int
        Draws of z per sample.
    n_rotations : int
        Planes to rotate in, each by every angle in `angles` (radians).
    max_rows : int
        Use at most this many rows of X (the first ones).
    n_permutations, n_orthogonal : int
        Random signed permutations (at least one is always tried) and Haar orthogonal maps.
    atol : float, optional
        The tolerance's floor, nats per sample (default `SYMMETRY_ATOL`).
    """
    atol = SYMMETRY_ATOL if atol is None else float(atol)
    base = copy.deepcopy(module).double().eval()
    x = to_tensor(module, X)[:max_rows].double()
    n, d = len(x), module.latent_dim
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((n_samples, n, d), generator=g, dtype=torch.float64).to(x.device)   # (S, n, d)
    maps, rot45 = [], []
    with torch.inference_mode():
        q0 = base.inference(x)
        elbo = base.draw(x, eps, qz=q0).terms.elbo                           # (n,)
        perms = _signed_permutations(d, max(1, n_permutations), rng)
        for k, (perm, signs) in enumerate(perms):
            label = f"[{' '.join(map(str, perm))}] signs {''.join('+' if s > 0 else '-' for s in signs)}"
            cost, e1, q1 = map_cost(base, x, eps, elbo, signed_permutation_matrix(perm, signs),
                                    KINDS[0], label, atol)
            maps.append(cost)
            if k == 0:
                elbo_p, tp, ts = e1, torch.as_tensor(perm, device=x.device), torch.as_tensor(signs, device=x.device)
                mu_change = float((q1.mean - q0.mean).abs().max())
                mu_map = float((q1.mean - ts * q0.mean[:, tp]).abs().max())
        planes = _planes(q0.mean.cpu().numpy(), n_rotations, rng)
        for i, j in planes:
            for a in angles:
                cost, *_ = map_cost(base, x, eps, elbo, plane_rotation(d, i, j, a), KINDS[1],
                                    f"z{i}, z{j} by {math.degrees(a):g}°", atol)
                maps.append(cost)
                if math.isclose(a, math.pi / 4):
                    rot45.append(((i, j), cost))
        for k in range(n_orthogonal):
            R = haar_orthogonal(d, rng)
            maps.append(map_cost(base, x, eps, elbo, R, KINDS[2],
                                 f"Haar #{k} (det {np.linalg.det(R):+.0f})", atol)[0])
    elbo_np, elbo_p_np = elbo.cpu().numpy(), elbo_p.cpu().numpy()
    kinds = _kinds(maps)
    drops = np.asarray([-c.change for _, c in rot45])
    return SymmetryReport(
        posterior=module.cfg.posterior, prior=module.cfg.prior, maps=maps, atol=atol, kinds=kinds,
        group=group_name(kinds), perm=perms[0][0], signs=perms[0][1], elbo=elbo_np, elbo_perm=elbo_p_np,
        perm_max_rel_diff=maps[0].max_rel_diff, mu_max_change=mu_change, mu_map_error=mu_map,
        perm_invariant=bool(maps[0].max_rel_diff <= PERMUTATION_RTOL),
        rotation_planes=np.asarray([p for p, _ in rot45], dtype=np.int64).reshape(-1, 2),
        rotation_drop=drops, rotation_drop_se=np.asarray([c.se for _, c in rot45]),
        rotation_drop_matched=drops.copy(),
        rotation_significant=bool(len(rot45) > 0 and all(not c.within and c.change < 0 for _, c in rot45)))
