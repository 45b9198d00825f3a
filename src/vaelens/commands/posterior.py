"""`vaelens posterior`: the data set's aggregate posterior, between-sample vs within-sample variance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import VaelensError
from ..posterior import AggregatePosterior, AggregateMonteCarlo, aggregate_monte_carlo, aggregate_posterior
from . import _common as common
from .render import Result

NAME = "posterior"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="the data set's aggregate posterior: variance between samples vs within a sample",
        description="q(z) = mean over x of q(z|x). Its mean is E[mu(x)], its covariance E[diag sigma(x)^2] + "
                    "Cov(mu(x)) (law of total variance). Per latent: Var(mu) between samples, E[sigma^2] within "
                    "a sample, each checked against a Monte Carlo sample of the mixture; and q(z)'s distance "
                    "from the prior N(0, I).",
        epilog="examples:\n  vaelens posterior runs/digits-...\n"
               "  vaelens posterior RUN --draws 100000 --json agg.json\n")
    common.add_run_args(p)
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--draws", type=int, default=50000, help="Monte Carlo draws from the mixture")
    p.add_argument("--seed", type=int, default=0)
    common.add_json_args(p)
    return p


@dataclass
class PosteriorResult(Result):
    agg: AggregatePosterior
    mc: AggregateMonteCarlo
    where: dict  # run, data, split
    json_path: Optional[Path] = None

    @property
    def verdict(self) -> str:
        return "PASS" if self.mc.passed else "FAIL"

    def to_dict(self) -> dict:
        return {**self.where, "aggregate": self.agg.to_dict(), "monte_carlo": self.mc.to_dict(),
                "verdict": self.verdict}

    def lines(self):
        agg, mc, w = self.agg, self.mc, self.where
        out = [f"aggregate posterior q(z) of {w['run']} on {w['data']} {w['split']} ({agg.n} samples)",
               f"  {'dim':<4} {'E[mu]':>8} {'Var(mu)':>9} {'E[sig^2]':>9} {'total':>8} {'between':>8} "
               f"{'MC total':>9} {'± s.e.':>7} {'z':>6}"]
        out += [f"  z{j:<3} {agg.mean[j]:8.3f} {agg.between[j]:9.4f} {agg.within[j]:9.4f} {agg.total[j]:8.4f} "
                f"{100 * agg.share_between[j]:7.1f}% {mc.cov[j, j]:9.4f} {mc.var_se[j]:7.4f} {mc.var_err_z[j]:6.2f}"
                f"{'' if agg.active[j] else '  inactive'}" for j in range(len(agg.mean))]
        out += ["  between = Var(mu) / total: the share of a latent's variance that tells samples apart",
                f"  KL(N(mean, cov) || N(0, I)), moment-matched: {agg.kl_moment_matched:.4f} nats (a lower bound)",
                f"  KL(q(z) || N(0, I)), Monte Carlo:          {mc.kl_mixture:.4f} ± {mc.kl_mixture_se:.4f} nats",
                f"  mean KL(q(z|x) || p(z)) (the ELBO's term): {agg.mean_kl:.4f} nats; I(x; z) = {mc.mutual_info:.4f}",
                f"verdict: {self.verdict}: law of total variance vs {mc.n_draws} draws of the mixture, largest |z| = "
                f"{mc.max_abs_z:.2f} over {2 * len(agg.mean)} means and variances"]
        return out


def run(args) -> PosteriorResult:
    if args.draws < 100:
        raise VaelensError(f"--draws must be >= 100, got {args.draws}")
    common.check_limit(args.limit)
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    post = vae.encode(common.first_rows(ds.X, args.limit), seed=args.seed)
    agg = aggregate_posterior(post.mu, post.sigma)
    mc = aggregate_monte_carlo(post.mu, post.sigma, n_draws=args.draws, seed=args.seed)
    return PosteriorResult(agg, mc, {"run": str(args.run), "data": ds.name, "split": args.split}, json_out)
