"""`vaelens check`: are mu(x) and sigma(x) (a full run's L(x) L(x)^T) the mean and spread of the model's own draws?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import _common as common
from .render import Result

if TYPE_CHECKING:  # the result's type; the module (torch, scipy) loads when the command runs
    from ..posterior import PointCloudCheck

NAME = "check"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="point-cloud check: are mu(x) and sigma(x) the mean and std of the model's own draws?",
        description="For chosen samples, draw S reparameterized z through the encoder's sampling path and test "
                    "the cloud against N(mu(x), sigma(x)^2): standardized mean errors, std ratios, a KS test of "
                    "the pooled (z - mu)/sigma against N(0, 1) and chi-square tests of the means and variances, "
                    "Bonferroni-combined at --level. A full-covariance run is tested against N(mu(x), L(x) L(x)^T): "
                    "the same tests on the whitened draws L^-1 (z - mu), and a fourth, a chi-square test of their "
                    "off-diagonal covariances (the correlations), Bonferroni over four.",
        epilog="examples:\n  vaelens check runs/digits-...\n  vaelens check RUN --indices 0,5,9 --samples 5000\n"
               "  vaelens check RUN --data table.csv --n 20 --json check.json\n")
    common.add_run_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--indices", type=common.index_list, help="comma-separated rows to check")
    g.add_argument("--n", type=int, default=10, help="check this many random rows")
    p.add_argument("--samples", type=int, default=2000, help="draws S per sample")
    p.add_argument("--level", type=float, default=0.01, help="overall significance level of the verdict")
    p.add_argument("--seed", type=int, default=0, help="seed for the rows chosen and the draws")
    common.add_json_args(p)
    return p


@dataclass
class CheckResult(Result):
    check: PointCloudCheck
    where: dict  # run, data, split
    level: float
    json_path: Optional[Path] = None

    @property
    def exit_code(self) -> int:
        return 0 if self.check.passed else 1

    @property
    def verdict(self) -> str:
        return "PASS" if self.check.passed else "FAIL"

    def to_dict(self) -> dict:
        return {**self.check.to_dict(), **self.where, "verdict": self.verdict}

    def lines(self):
        c, w = self.check, self.where
        k, d = c.mu.shape
        S = c.n_samples
        out = [f"check {w['run']} on {w['data']} {w['split']}: {k} samples x {S} draws of z (d = {d})",
               f"  {'index':>6} {'max|mean err|':>15} {'std ratio min..max':>18}   mu (first 4){'':16}"
               f"sigma (first 4)"]
        out += [f"  {c.indices[r]:6d} {np.abs(c.mean_z[r]).max():10.2f} s.e. "
                f"{c.std_ratio[r].min():7.4f}..{c.std_ratio[r].max():.4f}   "
                + " ".join(f"{v:6.2f}" for v in c.mu[r, :4]) + "   " + " ".join(f"{v:5.3f}" for v in c.sigma[r, :4])
                for r in range(k)]
        band = 3 / np.sqrt(2 * S)
        full = c.scale_tril is not None
        u = "L^-1 (z - mu)" if full else "(z - mu)/sigma"
        claim = "N(mu(x), L(x) L(x)^T)" if full else "N(mu(x), sigma(x)^2)"
        out += [f"  (a true claim gives mean errors ~ N(0, 1) s.e. and std ratios within about 1 +- {band:.3f})",
                f"  KS, pooled {u} vs N(0, 1): D = {c.ks_stat:.4f}, p = {c.ks_p:.3g}",
                f"  chi-square of the mean errors:        {c.mean_chi2:.1f} on {k * d} dof, p = {c.mean_p:.3g}",
                f"  chi-square of the variances:          {c.var_chi2:.0f} on {k * d * (S - 1)} dof, "
                f"p = {c.var_p:.3g}"]
        if full:
            out.append(f"  chi-square of the correlations:       {c.offdiag_chi2:.1f} on {k * d * (d - 1) // 2} dof, "
                       f"p = {c.offdiag_p:.3g} (whitened off-diagonal covariances; largest |z| "
                       f"{c.offdiag_z.max():.2f})")
        out.append(f"verdict: {self.verdict}: combined p = {c.p_value:.3g} (Bonferroni over {c.tests} tests) "
                   f"{'>=' if c.passed else '<'} level {self.level:g}; "
                   + ((f"the draws are {claim}: mu is their mean and "
                       + ("L L^T their covariance" if full else "sigma their std"))
                      if c.passed else f"the draws do not follow {claim}"))
        return out


def run(args) -> CheckResult:
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    c = vae.check(ds.X, indices=args.indices, n=args.n, n_samples=args.samples, level=args.level, seed=args.seed)
    return CheckResult(c, {"run": str(args.run), "data": ds.name, "split": args.split}, args.level, json_out)
