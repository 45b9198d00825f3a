"""`vaelens report`: one self-contained HTML page with every figure of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import VaelensError
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..report import Report

NAME = "report"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME, help="write a self-contained HTML report with every figure of a run",
        description="One HTML file (figures embedded, no network) showing the run, reconstructions,\n"
                    "the latent map with per-sample ellipses, point clouds, the aggregate posterior\n"
                    "against the prior and, with --compare, the agreement across seeds. The figures\n"
                    "are also saved as PNG in RUN/figures/. A binarized run is shown the data binarized\n"
                    "once with --seed, as `vaelens evaluate` evaluates it.",
        epilog="examples:\n  vaelens report runs/digits-...\n"
               "  vaelens report runs/seeds/seed-0 --compare runs/seeds/seed-1 runs/seeds/seed-2\n"
               "  vaelens report RUN --data test.csv --out test-report.html --json report.json\n")
    common.add_run_args(p)
    p.add_argument("--out", type=Path, help="HTML file (default RUN/report.html)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RUN", help="other runs (seeds) on the same data")
    p.add_argument("--dims", type=common.dim_pair, help="the two latent dimensions of the latent map, e.g. 0,3 "
                                                        "(default: the two most active)")
    p.add_argument("--max-points", type=int, default=2000, help="larger data sets are subsampled (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed for the subsample and every draw")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation metrics (the slowest part)")
    p.add_argument("--no-gap", action="store_true", help="skip the true-posterior section (importance sampling "
                                                         "and q* on 4 samples)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the computed figures as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    return p


@dataclass
class ReportResult(Result):
    report: Report
    run: Path
    json_path: Optional[Path] = None

    def to_dict(self) -> dict:
        return self.report.to_dict()

    def lines(self):
        rep, num = self.report, self.report.numbers
        out = [f"wrote {rep.path} ({rep.path.stat().st_size / 1e6:.1f} MB, {rep.seconds:.1f} s); "
               f"figures in {self.report.figure_dir}"]
        out += [f"  note: {note}" for note in rep.notes]
        out.append(f"  {'section':<16} status")
        out += [f"  {sid:<16} {'skipped: ' + why if why else 'ok'}" for sid, why in rep.sections.items()]
        out.append(f"  {num['posterior']} q(z|x), prior {num['prior_name']}; "
                   f"active units {num['active_units']} of {num['latent_dim']} (Var mu > 0.01)")
        if "point_cloud" in num:
            pc = num["point_cloud"]
            out.append(f"  point-cloud check {'passed' if pc['passed'] else 'FAILED'} (p = {pc['p_value']:.3g}, "
                       f"{len(pc['indices'])} samples x {pc['n_samples']} draws)")
        if "aggregate" in num:
            agg = num["aggregate"]
            if "prior_var" in agg:  # a mixture prior: its own marginal variances
                out.append(f"  {'dim':<5} {'between':>9} {'within':>9} {'total':>9} {'prior':>9}  (aggregate posterior)")
                out += [f"  z{j:<4} {agg['between'][j]:9.4f} {agg['within'][j]:9.4f} {agg['total'][j]:9.4f} "
                        f"{agg['prior_var'][j]:9.4f}" for j in range(num["latent_dim"])]
            else:
                out.append(f"  {'dim':<5} {'between':>9} {'within':>9} {'total':>9}  (aggregate posterior; prior total 1)")
                out += [f"  z{j:<4} {agg['between'][j]:9.4f} {agg['within'][j]:9.4f} {agg['total'][j]:9.4f}"
                        for j in range(num["latent_dim"])]
        if "compare" in num:
            cmp = num["compare"]
            out.append(f"  MCC with {cmp['runs'][0]}: "
                       + ", ".join(f"{r}: {c:.3f}" for r, c in zip(cmp["runs"][1:], cmp["mcc"][0][1:])))
        return out


def run(args) -> ReportResult:
    from ..report import build_report

    if args.max_points < 10:
        raise VaelensError(f"--max-points must be >= 10, got {args.max_points}")
    out = common.check_output(args.out if args.out is not None else args.run / "report.html", args.force, "report")
    json_out = common.check_output(args.json, args.force)
    vae, ds = common.load_run_and_data(args)
    rep = build_report(args.run, ds, out, vae=vae, compare_runs=args.compare,
                       seed=args.seed, max_points=args.max_points, dims=args.dims, evaluate=not args.no_eval,
                       gap=not args.no_gap,
                       overwrite=args.force)
    return ReportResult(rep, args.run, json_out)
