"""Which choices make mu and sigma unique: the table of docs/posterior.md (issue #19), through the CLI.

For each prior (normal, mog, vamp) and posterior family (diagonal, full) it trains two seeds on the
bundled digits, runs `vaelens symmetry` on each and `vaelens compare` on the pair, and prints a
markdown table: the group measured, the largest ELBO change of each kind of map with its s.e., and
the agreement across seeds (MCC, Procrustes-aligned MCC, linear CKA).

    python benchmarks/uniqueness_table.py                      # 40 epochs per run
    python benchmarks/uniqueness_table.py --epochs 10 --out /tmp/u   # quicker

Prints the host, every command it ran, and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_nll import machine  # noqa: E402  (the host line every benchmark prints)

from vaelens.cli import main as vaelens  # noqa: E402

PRIORS = ("normal", "mog", "vamp")
POSTERIORS = ("diagonal", "full")
KINDS = ("signed permutation", "plane rotation", "orthogonal")


def run(args, log) -> None:
    """`vaelens ARGS` in this process (the CLI's own code path, without a fresh interpreter's imports)."""
    args = [str(a) for a in args]
    log.append("vaelens " + " ".join(shlex.quote(a) for a in args))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = vaelens(args)
    if rc not in (0,):
        raise SystemExit(f"vaelens {' '.join(args)} exited with {rc}:\n{out.getvalue()}")


def _change(kind: dict) -> str:
    c, se = kind["worst_change"], kind["worst_se"]
    if abs(c) < 5e-5:
        return f"{c:.0e} ± {se:.0e}"
    return f"{c:+.4f} ± {se:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--latent-dim", type=int, default=4)
    ap.add_argument("--hidden", default="64")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--limit", type=int, default=1000, help="samples for symmetry and compare")
    ap.add_argument("--out", type=Path, help="folder for the runs (default: a temporary one)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"host: {machine()}")
    log, rows = [], []
    t0 = time.perf_counter()
    with (contextlib.nullcontext(str(a.out)) if a.out else tempfile.TemporaryDirectory()) as root:
        root = Path(root)
        for prior in PRIORS:
            for post in POSTERIORS:
                runs, sym = [], []
                for s in seeds:
                    out = root / f"{prior}-{post}" / f"seed-{s}"
                    if not (out / "config.json").exists():
                        run(["train", "--seed", s, "--posterior", post, "--prior", prior, "--latent-dim",
                             a.latent_dim, "--hidden", a.hidden, "--epochs", a.epochs, "--out", out,
                             "--no-progress"], log)
                    run(["symmetry", out, "--limit", a.limit, "--samples", 8, "--json", out / "symmetry.json",
                         "--force"], log)
                    runs.append(out)
                    sym.append(json.loads((out / "symmetry.json").read_text()))
                cmp_json = root / f"{prior}-{post}" / "compare.json"
                run(["compare", *runs, "--limit", a.limit, "--json", cmp_json, "--force"], log)
                cmp = json.loads(cmp_json.read_text())
                rows.append((prior, post, sym, cmp))
    elapsed = time.perf_counter() - t0
    print(f"\n{len(log)} commands, {elapsed:.0f} s in all:")
    print("\n".join(f"  {c}" for c in log))
    print("\n| prior | posterior | group measured (seed " + " / ".join(map(str, seeds)) + ") | "
          "signed perm. ΔELBO | plane rot. ΔELBO | orthogonal ΔELBO | MCC | Procrustes MCC | CKA | expected |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prior, post, sym, cmp in rows:
        groups = [s["group"] for s in sym]
        group = groups[0] if len(set(groups)) == 1 else " / ".join(groups)
        k = sym[0]["kinds"]
        p = min(cmp["pairs"], key=lambda c: c["mcc_pearson"])
        measure = {"mcc": "MCC", "procrustes": "Procrustes MCC, CKA", "linear": "R², CKA"}[cmp["expected"]["measure"]]
        print(f"| {prior} | {post} | {group} | {_change(k[KINDS[0]])} | {_change(k[KINDS[1]])} | "
              f"{_change(k[KINDS[2]])} | {p['mcc_pearson']:.3f} | {p['procrustes_mcc']:.3f} | {p['cka']:.3f} | "
              f"{measure} |")
    print("\nΔELBO: the largest |change| of the mean per-sample ELBO (nats) among the maps of that kind tried on "
          f"seed {seeds[0]}, ± its paired s.e.; a kind is free when every map of it is within max(3 s.e., "
          f"{sym[0]['atol']:g}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
