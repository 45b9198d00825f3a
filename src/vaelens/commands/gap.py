"""`vaelens gap`: how close mu(x), sigma(x) are to the model's true posterior, and the two gaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..config import GAP_K, GAP_REFINE_LR, GAP_REFINE_LR_END, GAP_REFINE_STEPS
from ..errors import VaelensError
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..gap import InferenceGaps

NAME = "gap"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="true posterior vs mu(x), sigma(x): approximation and amortization gaps per sample",
        description="For the first --n samples: the model's true posterior p(z|x) ~ p(x|z) p(z) by importance "
                    "sampling (k draws from q* or, with --proposal encoder, from q(z|x); ESS and Pareto-k flag "
                    "unreliable samples); "
                    "per latent, how far mu(x) is from E_p[z] in true stds and sigma(x) / Std_p[z]; the best "
                    "Gaussian q* of the run's family per sample (diagonal or full covariance; Adam on a Monte "
                    "Carlo ELBO from the encoder's output, --steps steps); and log p(x) - L[q] split into the approximation gap log p(x) - L[q*] and "
                    "the amortization gap L[q*] - L[q] (Cremer, Li & Duvenaud 2018). docs/posterior.md.",
        epilog="examples:\n  vaelens gap runs/digits-...\n"
               "  vaelens gap RUN --data mnist --split test --n 1000 --k 1000 --steps 300 --json gap.json\n")
    common.add_run_args(p, split="test")
    p.add_argument("--n", type=int, default=500, help="use the first N samples")
    p.add_argument("--k", type=int, default=GAP_K, help="importance samples per sample")
    p.add_argument("--steps", type=int, default=GAP_REFINE_STEPS, help="Adam steps for q* (0: q* = q)")
    p.add_argument("--lr", type=float, default=GAP_REFINE_LR,
                   help=f"Adam's learning rate for q*, falling linearly to {GAP_REFINE_LR_END:g} of it")
    p.add_argument("--proposal", choices=("refined", "encoder"), default="refined",
                   help="importance sampler's proposal: q* (closer to p(z|x): more effective draws) or the encoder's q")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (and a binarized run's binarization)")
    common.add_json_args(p)
    return p


@dataclass
class GapResult(Result):
    gaps: InferenceGaps
    where: dict  # run, data, split
    json_path: Optional[Path] = None

    def to_dict(self) -> dict:
        return {**self.where, **self.gaps.to_dict()}

    def lines(self):
        from ..gap import MIN_ESS, PARETO_K_MAX

        g, w = self.gaps, self.where
        tp = g.posterior
        ok = tp.reliable
        use = ok if ok.any() else np.ones_like(ok)
        n, d = tp.mean.shape
        out = [f"gap {w['run']} on {w['data']} {w['split']}: {n} samples, k = {g.k} importance draws from "
               f"{'q*' if tp.proposal == 'refined' else 'q'}, "
               f"q*{' (full covariance)' if g.scale_tril_opt is not None else ''} from {g.steps} Adam steps "
               f"(lr {g.lr:g}, {g.draws} draws/step), ELBOs on {g.elbo_draws} "
               f"fresh draws",
               f"  {'dim':<4} {'|mu-E_p|/Std_p':>15} {'sigma / Std_p':>14} {'|m*-E_p|/Std_p':>15} "
               f"{'s* / Std_p':>11} {'MC s.e./Std_p':>14}"]
        dist, ratio = tp.distance[use].mean(0), tp.std_ratio[use].mean(0)
        dist_opt, ratio_opt = g.distance_opt[use].mean(0), g.std_ratio_opt[use].mean(0)
        floor = (tp.mean_se / tp.std)[use].mean(0)
        out += [f"  z{j:<3} {dist[j]:15.3f} {ratio[j]:14.3f} {dist_opt[j]:15.3f} {ratio_opt[j]:11.3f} {floor[j]:14.3f}"
                for j in range(d)]
        out.append(f"  (means over the {int(use.sum())} {'reliable ' if ok.any() else ''}samples; mu, sigma: the "
                   f"encoder's q; m*, s*: q*; E_p, Std_p: the true posterior; a distance of about 0.8 MC s.e. "
                   f"is Monte Carlo noise alone)")
        avg = g.averages()
        rows = (("log p(x) (IS estimate)", "log_px"), ("L[q*] (best Gaussian)", "elbo_optimal"),
                ("L[q] (encoder)", "elbo_amortized"), ("approximation gap", "approximation_gap"),
                ("amortization gap", "amortization_gap"))
        out += [f"  {label:<22} {avg[key]['mean']:10.3f} ± {avg[key]['se']:.3f} nats"
                f" (Monte Carlo part {avg[key]['mc_se']:.3f})" for label, key in rows]
        out.append("  (± s.e. of the mean over samples; gap = log p(x) - L[q] = approximation + amortization)")
        out.append(f"unreliable importance weights: {int((~ok).sum())} of {n} samples ({100 * (~ok).mean():.1f}%: "
                   f"ESS < {MIN_ESS:g} or Pareto k > {PARETO_K_MAX}); median ESS "
                   f"{np.median(tp.ess):.0f} of {g.k}")
        return out


def run(args) -> GapResult:
    if args.n < 1:
        raise VaelensError(f"--n must be >= 1, got {args.n}")
    if args.k < 2:
        raise VaelensError(f"--k must be >= 2, got {args.k}")
    if args.steps < 0:
        raise VaelensError(f"--steps must be >= 0, got {args.steps}")
    if not args.lr > 0:
        raise VaelensError(f"--lr must be > 0, got {args.lr}")
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    g = vae.inference_gaps(common.first_rows(ds.X, args.n), k=args.k, steps=args.steps, seed=args.seed, lr=args.lr,
                           proposal=args.proposal)
    return GapResult(g, {"run": str(args.run), "data": ds.name, "split": args.split}, json_out)
