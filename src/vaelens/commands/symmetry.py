"""`vaelens symmetry`: which orthogonal maps of the latent space leave the ELBO unchanged, measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import VaelensError
from ..config import SYMMETRY_ATOL
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..symmetries import SymmetryReport

NAME = "symmetry"

_PRIOR_MAP = {"normal": "N(0, I) maps to itself",
              "mog": "each component N(m_k, S_k) -> N(R m_k, diag(R S_k R^T)) (the components are diagonal)",
              "vamp": "the VampPrior is the encoder at the pseudo-inputs, so it maps as q(z|x) does"}
_POSTERIOR_MAP = {"diagonal": "N(R mu, diag(R Sigma R^T)), the moment-matched diagonal Gaussian",
                  "full": "N(R mu, R Sigma R^T) exactly (its Cholesky factor)"}
_PLURAL = {"signed permutation": "signed permutations", "plane rotation": "plane rotations",
           "orthogonal": "orthogonal maps"}


def _num(x: float, width: int) -> str:
    """Fixed point, except the rounding-sized numbers of exact maps, which read better as 1e-16."""
    return f"{x:{width}.4f}" if x == 0 or abs(x) >= 5e-5 else f"{x:{width}.1e}"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="which maps of the latent space (signed permutations, rotations, orthogonal) leave the ELBO unchanged",
        description="Map the trained model's whole latent space by an orthogonal R: q(z|x) becomes R q(z|x) "
                    "projected onto the run's posterior family (diagonal: the moment-matched diagonal "
                    "Gaussian; full: exact), the decoder's first layer W becomes W R^T, and the prior's "
                    "parameters are mapped the same way (N(0, I) is invariant; MoG components are projected "
                    "onto diagonal ones; the VampPrior follows the encoder). Three kinds of R are tried: "
                    "random signed permutations, Givens rotations by several angles in random planes of "
                    "active latents, and Haar-random orthogonal maps. For each, the mean per-sample ELBO "
                    "change with its paired standard error (float64, the same noise mapped through R, or "
                    "paired draws where the family cannot hold R q exactly). A kind counts as a symmetry "
                    "when every map of it changes the ELBO by at most max(3 s.e., --atol); the verdict names "
                    "the group measured. Exit status 1 when a signed permutation, exact in every family, "
                    "changes it.",
        epilog="examples:\n  vaelens symmetry runs/digits-...\n"
               "  vaelens symmetry RUN --rotations 5 --orthogonal 5 --json sym.json\n")
    common.add_run_args(p)
    p.add_argument("--limit", type=int, default=2000, help="use the first N samples")
    p.add_argument("--permutations", type=int, default=3, help="random signed permutations to try (at least 1)")
    p.add_argument("--rotations", type=int, default=3,
                   help="random planes to rotate in, each by 11.25, 22.5 and 45 degrees")
    p.add_argument("--orthogonal", type=int, default=3, help="Haar-random orthogonal maps to try")
    p.add_argument("--samples", type=int, default=16, help="draws of z per sample for the ELBO")
    p.add_argument("--atol", type=float, default=SYMMETRY_ATOL,
                   help="a map is free when |ELBO change| <= max(3 s.e., ATOL) nats per sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the maps and the noise")
    common.add_json_args(p)
    return p


@dataclass
class SymmetryResult(Result):
    report: SymmetryReport
    where: dict  # run, data, split
    samples: int
    json_path: Optional[Path] = None

    @property
    def exit_code(self) -> int:
        return 0 if self.report.perm_invariant else 1

    def to_dict(self) -> dict:
        return {**self.report.to_dict(), **self.where}

    def lines(self):
        from ..symmetries import KINDS, PERMUTATION_RTOL

        r, w = self.report, self.where
        wide = max([len(m.label) for m in r.maps] + [3])
        out = [f"symmetry {w['run']} on {w['data']} {w['split']} ({len(r.elbo)} samples, {self.samples} draws each, "
               f"float64); posterior {r.posterior}, prior {r.prior}",
               f"  each map R acts on the whole model: q(z|x) -> {_POSTERIOR_MAP[r.posterior]}; decoder's first "
               f"layer W -> W R^T; prior: {_PRIOR_MAP[r.prior]}",
               f"  signed permutation: z'_j = sign_j * z_perm(j), perm {r.perm.tolist()}, "
               f"signs {[int(s) for s in r.signs]}",
               f"    mu changes by up to {r.mu_max_change:.4f}; mu' - sign * mu[perm] is at most {r.mu_map_error:.2e}",
               f"    mean ELBO {r.elbo.mean():.6f} -> {r.elbo_perm.mean():.6f} nats; largest per-sample relative "
               f"change {r.perm_max_rel_diff:.2e} (tolerance {PERMUTATION_RTOL:g})",
               f"  {'kind':<19} {'map':<{wide}} {'ELBO change':>11} {'± s.e.':>9}  {'family holds R q, R p':<21} free",
               ]
        out += [f"  {m.kind:<19} {m.label:<{wide}} {_num(m.change, 11)} {_num(m.se, 9)}  "
                f"{'exactly' if m.exact else f'no (rel. err {m.projection_error:.2g})':<21} "
                f"{'yes' if m.within else 'NO'}" for m in r.maps]
        out.append(f"  (nats/sample; free: |change| <= max(3 s.e., {r.atol:g}): 3 s.e. of a paired mean is 0.3% "
                   f"Monte Carlo noise, the floor keeps rounding and a converged model's degenerate optimum free)")
        for kind in KINDS:
            k = r.kinds[kind]
            if k["tried"]:
                out.append(f"  {_PLURAL[kind] + ':':<20} {'invariant' if k['invariant'] else 'NOT invariant'} "
                           f"({k['tried']} tried; largest change {_num(k['worst_change'], 0).strip()} ± "
                           f"{_num(k['worst_se'], 0).strip()})")
        unchanged = "unchanged" if r.perm_invariant else "CHANGED"
        out.append(f"verdict: ELBO {unchanged} under signed permutation; group measured: {r.group}")
        return out


def run(args) -> SymmetryResult:
    from ..symmetries import symmetry_report

    if args.rotations < 0 or args.orthogonal < 0 or args.permutations < 1 or args.samples < 1:
        raise VaelensError("--rotations and --orthogonal must be >= 0, --permutations and --samples >= 1")
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise VaelensError(f"--atol must be a number >= 0, got {args.atol}")
    common.check_limit(args.limit)
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    X = vae.model_input(common.first_rows(ds.X, args.limit), args.seed)
    r = symmetry_report(vae.module_, X, seed=args.seed, n_samples=args.samples, n_rotations=args.rotations,
                        n_permutations=args.permutations, n_orthogonal=args.orthogonal, atol=args.atol)
    return SymmetryResult(r, {"run": str(args.run), "data": ds.name, "split": args.split}, args.samples, json_out)
