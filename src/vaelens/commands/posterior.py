"""`vaelens posterior`: the data set's aggregate posterior, between-sample vs within-sample variance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import VaelensError
from . import _common as common
from .info import prior_text
from .render import Result

if TYPE_CHECKING:
    from ..posterior import AggregateMonteCarlo, AggregatePosterior

NAME = "posterior"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="the data set's aggregate posterior: variance between samples vs within a sample",
        description="q(z) = mean over x of q(z|x). Its mean is E[mu(x)], its covariance E[Sigma(x)] + "
                    "Cov(mu(x)) (law of total variance; Sigma = diag sigma^2, or L L^T for a full-covariance run). "
                    "Per latent: Var(mu) between samples, E[sigma^2] within "
                    "a sample, each checked against a Monte Carlo sample of the mixture; and q(z) against the "
                    "run's prior p(z) (N(0, I), a mixture, or the VampPrior): its moments against the prior's, "
                    "and KL(q(z) || p(z)) by Monte Carlo.",
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
    prior: str = "N(0, I)"  # p(z) in words (`info.prior_text`)

    @property
    def verdict(self) -> str:
        return "PASS" if self.mc.passed else "FAIL"

    def to_dict(self) -> dict:
        return {**self.where, "prior": self.prior, "aggregate": self.agg.to_dict(), "monte_carlo": self.mc.to_dict(),
                "verdict": self.verdict}

    def lines(self):
        agg, mc, w = self.agg, self.mc, self.where
        normal = self.prior == "N(0, I)"
        out = [f"aggregate posterior q(z) of {w['run']} on {w['data']} {w['split']} ({agg.n} samples); "
               f"p(z) = {self.prior}",
               f"  {'dim':<4} {'E[mu]':>8} {'Var(mu)':>9} {'E[sig^2]':>9} {'total':>8} {'between':>8} "
               f"{'MC total':>9} {'± s.e.':>7} {'z':>6}" + ("" if normal else f" {'p mean':>8} {'p var':>8}")]
        out += [f"  z{j:<3} {agg.mean[j]:8.3f} {agg.between[j]:9.4f} {agg.within[j]:9.4f} {agg.total[j]:8.4f} "
                f"{100 * agg.share_between[j]:7.1f}% {mc.cov[j, j]:9.4f} {mc.var_se[j]:7.4f} {mc.var_err_z[j]:6.2f}"
                + ("" if normal else f" {agg.prior_mean[j]:8.3f} {agg.prior_cov[j, j]:8.4f}")
                + f"{'' if agg.active[j] else '  inactive'}" for j in range(len(agg.mean))]
        out.append("  between = Var(mu) / total: the share of a latent's variance that tells samples apart")
        if normal:
            out += [f"  KL(N(mean, cov) || N(0, I)), moment-matched: {agg.kl_moment_matched:.4f} nats (a lower bound)",
                    f"  KL(q(z) || N(0, I)), Monte Carlo:          {mc.kl_mixture:.4f} ± {mc.kl_mixture_se:.4f} nats",
                    f"  mean KL(q(z|x) || p(z)) (the ELBO's term): {agg.mean_kl:.4f} nats; "
                    f"I(x; z) = {mc.mutual_info:.4f}"]
        else:
            out += [f"  p(z)'s moments (p mean, p var above); KL between the Gaussians of q(z)'s and p(z)'s moments: "
                    f"{agg.kl_moment_matched:.4f} nats (compares moments; no bound for a mixture prior)",
                    f"  KL(q(z) || p(z)), Monte Carlo:             {mc.kl_mixture:.4f} ± {mc.kl_mixture_se:.4f} nats",
                    f"  mean KL(q(z|x) || p(z)) (the ELBO's term): {agg.mean_kl:.4f} ± {agg.mean_kl_se:.4f} nats "
                    f"(Monte Carlo); I(x; z) = {mc.mutual_info:.4f}"]
        out.append(f"verdict: {self.verdict}: law of total variance vs {mc.n_draws} draws of the mixture, largest "
                   f"|z| = {mc.max_abs_z:.2f} over {2 * len(agg.mean)} means and variances")
        return out


def run(args) -> PosteriorResult:
    from ..evaluate import prior_of
    from ..posterior import aggregate_monte_carlo, aggregate_posterior

    if args.draws < 100:
        raise VaelensError(f"--draws must be >= 100, got {args.draws}")
    common.check_limit(args.limit)
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    post = vae.encode(common.first_rows(ds.X, args.limit), seed=args.seed)
    prior = prior_of(vae.module_)                                            # None for N(0, I)
    agg = aggregate_posterior(post.mu, post.sigma, post.scale_tril, prior, seed=args.seed)
    mc = aggregate_monte_carlo(post.mu, post.sigma, n_draws=args.draws, seed=args.seed, scale_tril=post.scale_tril,
                               prior=prior, agg=agg)
    return PosteriorResult(agg, mc, {"run": str(args.run), "data": ds.name, "split": args.split}, json_out,
                           prior_text(vae.config_.model))
