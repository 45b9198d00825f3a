"""`vaelens compare`: do retrainings (e.g. train --seeds) learn the same latents?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..errors import VaelensError
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..uniqueness import Comparison

NAME = "compare"


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME,
        help="do retrainings (e.g. train --seeds) learn the same latents? MCC, Procrustes MCC, CKA, linear R^2",
        description="Encode the same data with every run and compare each pair: mean correlation coefficient "
                    "(|Pearson| and |Spearman| of latent means matched by the Hungarian method on one half of "
                    "the samples, scored on the other), the Procrustes-aligned MCC (a's means turned by the "
                    "orthogonal map fitted to b on the first half, correlated axis by axis on the other), linear "
                    "CKA, held-out R^2 of the best linear map both ways, and a per-latent table that also "
                    "compares sigma. Inactive latents (Var mu <= 0.01) are listed apart. From the runs' "
                    "posterior family and prior, one line says which agreement their symmetry group makes "
                    "meaningful: the MCC when only signed permutations are free (diagonal posterior, or a MoG "
                    "prior), the Procrustes MCC, R^2 and CKA when every rotation is free (full covariance with "
                    "the normal or VampPrior; `vaelens symmetry` measures the group).",
        epilog="examples:\n  vaelens train --seeds 0,1,2 --out runs/seeds\n"
               "  vaelens compare runs/seeds/seed-0 runs/seeds/seed-1 runs/seeds/seed-2\n"
               "  vaelens compare A B --data test.csv --json cmp.json\n")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="two or more run directories")
    common.add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default="train", help="the data set's own split")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="seed for the matching/scoring split")
    common.add_json_args(p)
    return p


@dataclass
class CompareResult(Result):
    runs: List[Path]
    where: dict  # data, split
    n: int
    pairs: List[Tuple[int, int, Comparison]]
    expected: dict  # group, measure, line: see uniqueness.expected_agreement
    json_path: Optional[Path] = None

    def to_dict(self) -> dict:
        return {"runs": [str(r) for r in self.runs], **self.where, "expected": self.expected,
                "pairs": [dict(a=a, b=b, **c.to_dict()) for a, b, c in self.pairs]}

    def lines(self):
        out = [f"compare {len(self.runs)} runs on {self.where['data']} {self.where['split']} ({self.n} samples; "
               f"matching fitted on one half, scored on the other)",
               f"  {'A':<5} {'B':<5} {'active':<7} {'MCC P':>6} {'MCC S':>6} {'Procr.':>6} {'CKA':>6} {'R2 A>B':>7} "
               f"{'R2 B>A':>7}"]
        out += [f"  {a:<5} {b:<5} {f'{int(c.active_a.sum())}/{int(c.active_b.sum())}':<7} {c.mcc_pearson:6.3f} "
                f"{c.mcc_spearman:6.3f} {c.procrustes_mcc:6.3f} {c.cka:6.3f} {c.r2_ab:7.3f} {c.r2_ba:7.3f}"
                for a, b, c in self.pairs]
        out += [f"  run {i}: {run}" for i, run in enumerate(self.runs)]
        a, b, c = min(self.pairs, key=lambda p: p[2].mcc_pearson)  # the first of equally bad pairs
        out += [f"  matched latents, runs {a} and {b} (the pair with the lowest MCC):",
                f"  {'z_A':>4} {'z_B':>4} {'corr':>7} {'spearman':>8} {'mean sig A':>10} {'mean sig B':>10} "
                f"{'corr log sig':>12}"]
        out += [f"  {i:4d} {j:4d} {r:7.3f} {rho:8.3f} {sa:10.4f} {sb:10.4f} {sc:12.3f}"
                for (i, j), r, rho, sa, sb, sc in zip(c.pairs, c.corr, c.spearman, c.sigma_a, c.sigma_b,
                                                      c.sigma_corr)]
        out.append(f"  inactive latents: run {a} {c.inactive_a.tolist()}, run {b} {c.inactive_b.tolist()}"
                   + (f"; active but unmatched: run {a} {c.unmatched_a.tolist()}, run {b} {c.unmatched_b.tolist()}"
                      if len(c.unmatched_a) or len(c.unmatched_b) else ""))
        out.append(f"expected: {self.expected['line']}")
        out.append(f"verdict: {c.verdict(measure=self.expected['measure'])}"
                   + (" (worst pair)" if len(self.pairs) > 1 else ""))
        if self.expected["measure"] == "procrustes":
            worst = min(self.pairs, key=lambda p: p[2].procrustes_mcc)[2]
            out.append(f"  up to a rotation, the measure this model's group makes meaningful: Procrustes MCC "
                       f"{worst.procrustes_mcc:.3f}, R^2 {min(worst.r2_ab, worst.r2_ba):.3f}, CKA {worst.cka:.3f}"
                       + (" (worst pair)" if len(self.pairs) > 1 else ""))
        return out


def run(args) -> CompareResult:
    from ..api import VAE
    from ..uniqueness import compare, expected_agreement

    if len(args.runs) < 2:
        raise VaelensError("compare needs at least two run directories")
    common.check_limit(args.limit)
    json_out = common.check_output(args.json, args.force)
    args.run = args.runs[0]
    vae0, ds = common.load_run_and_data(args)
    X = common.first_rows(ds.X, args.limit)
    vaes = [vae0]
    for run_dir in args.runs[1:]:  # every run loaded (and checked) before any encoding
        v = VAE.load(run_dir)
        if v.n_features_in_ != vae0.n_features_in_:
            raise VaelensError(f"{run_dir}: expects {v.n_features_in_} features, {args.runs[0]} "
                               f"{vae0.n_features_in_}; compare runs trained on the same kind of data")
        vaes.append(v)
    kinds = {(v.config_.model.posterior, v.config_.model.prior) for v in vaes}
    a_kind, b_kind = (sorted(kinds) * 2)[:2]
    expected = expected_agreement(*a_kind, *b_kind)
    posts = [v.encode(X, seed=args.seed) for v in vaes]
    pairs = [(a, b, compare(posts[a].mu, posts[b].mu, posts[a].sigma, posts[b].sigma, seed=args.seed))
             for a in range(len(posts)) for b in range(a + 1, len(posts))]
    return CompareResult(list(args.runs), {"data": ds.name, "split": args.split}, len(X), pairs, expected, json_out)
