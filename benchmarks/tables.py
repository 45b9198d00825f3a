"""Held-out log p(x) of the default `vaelens train` on small tables, against linear-Gaussian baselines.

Tables (all offline): scikit-learn's bundled iris, wine, breast_cancer and diabetes, a synthetic
factor-analysis table (3 factors, 12 features, per-feature noise) and a synthetic nonlinear one (2
latents through tanh into 10 features). Each is written as a CSV with an ``id`` column (1, 2, ...),
the features and a ``class`` column (diabetes: its target; synthetic: the sign of the first latent),
shuffled with a fixed seed and split 75/25 into train.csv and test.csv. Then, as a user would:

    vaelens train --data train.csv --label-column class --likelihood gaussian --standardize \\
        --columns <the features> --out RUN

(every other setting the default for a data file; ``--columns`` lists the features so that the id
column is left out whether or not this vaelens excludes id-like columns by itself), and the held-out
figure is the run's IWAE estimate of log p(x) on test.csv (`VAE.load(RUN).log_likelihood`, k = 1000,
seed 0), which standardizes with the run's own transform (fitted on the training rows it kept after
holding out its validation share). The baselines are fitted on all of train.csv standardized with its
mean and std: an independent Gaussian per feature, a full-covariance Gaussian (maximum likelihood) and
`sklearn.decomposition.FactorAnalysis` with the number of factors chosen by 5-fold cross-validated
log-likelihood. Every figure is in nats per test row, in the units of train.csv standardized with its
mean and std: the run's figure is moved into them exactly by the log-Jacobian of the change of
standardization, sum_j log(s_run_j / s_train_j).

    python benchmarks/tables.py --threads 1 [--tables iris,wine] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLIT_SEED = 0
IWAE_K = 1000


def tables() -> dict:
    """{name: (X float64 (n, p), feature names, class column)}."""
    from sklearn import datasets

    out = {}
    for name, load in (("iris", datasets.load_iris), ("wine", datasets.load_wine),
                       ("breast_cancer", datasets.load_breast_cancer), ("diabetes", datasets.load_diabetes)):
        b = load()
        names = [f"f{j}_" + "".join(c if c.isalnum() else "_" for c in str(n)) for j, n in enumerate(b.feature_names)]
        out[name] = (np.asarray(b.data, dtype=np.float64), names, np.asarray(b.target))
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 3))
    W = rng.normal(size=(3, 12))
    X = z @ W + rng.normal(size=(500, 12)) * rng.uniform(0.3, 1.0, 12)
    out["synthetic_fa"] = (X, [f"x{j}" for j in range(12)], (z[:, 0] > 0).astype(int))
    z = rng.normal(size=(600, 2))
    W = rng.normal(size=(2, 10))
    X = np.tanh(z @ W) * 3 + 0.1 * rng.normal(size=(600, 10))
    out["synthetic_nonlinear"] = (X, [f"x{j}" for j in range(10)], (z[:, 0] > 0).astype(int))
    return out


def write_split(folder: Path, X: np.ndarray, names: list, y: np.ndarray):
    """train.csv and test.csv (id, features, class), 75/25 after a seeded shuffle; returns the index arrays."""
    idx = np.random.default_rng(SPLIT_SEED).permutation(len(X))
    n_tr = int(round(0.75 * len(X)))
    parts = {"train": idx[:n_tr], "test": idx[n_tr:]}
    for part, rows in parts.items():
        lines = [",".join(["id", *names, "class"])]
        lines += [",".join([str(i + 1), *(repr(float(v)) for v in X[i]), str(y[i])]) for i in rows]
        (folder / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return parts["train"], parts["test"]


def baselines(tr: np.ndarray, te: np.ndarray) -> dict:
    """Held-out mean log-likelihoods of the linear-Gaussian baselines, data already standardized."""
    from scipy.stats import multivariate_normal
    from sklearn.decomposition import FactorAnalysis
    from sklearn.model_selection import cross_val_score

    p = tr.shape[1]
    indep = float(np.mean(np.sum(-0.5 * (te - tr.mean(0)) ** 2 / tr.var(0) - 0.5 * np.log(2 * np.pi * tr.var(0)), 1)))
    cov = np.cov(tr, rowvar=False, bias=True)
    full = float(np.mean(multivariate_normal(tr.mean(0), cov, allow_singular=False).logpdf(te)))
    cv = {k: float(cross_val_score(FactorAnalysis(k, random_state=0), tr, cv=5).mean()) for k in range(1, p)}
    k = max(cv, key=cv.get)
    fa = float(FactorAnalysis(k, random_state=0).fit(tr).score(te))
    return {"independent": indep, "full_cov": full, "fa": fa, "fa_factors": k}


def run_vaelens(folder: Path, names: list, threads: int, extra: list) -> tuple:
    """Train with the CLI (defaults for a data file); (run dir, seconds)."""
    run = folder / "run"
    cmd = [sys.executable, "-m", "vaelens", "train", "--data", str(folder / "train.csv"), "--label-column", "class",
           "--likelihood", "gaussian", "--standardize", "--columns", ",".join(names), "--out", str(run),
           "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"vaelens train failed on {folder.name}:\n{p.stdout}{p.stderr}")
    if p.stderr.strip():
        print(p.stderr.strip(), file=sys.stderr)
    return run, time.perf_counter() - t0


def vaelens_loglik(run: Path, X_te: np.ndarray, tr_std: np.ndarray) -> dict:
    """The run's held-out log p(x) per row, moved into the units of train.csv's standardization."""
    from vaelens import VAE
    from vaelens import checkpoint as ck

    vae = VAE.load(run)
    ll = vae.log_likelihood(X_te.astype(np.float32), k=IWAE_K, seed=0)
    run_std = np.asarray(vae.config_.transform.std, dtype=np.float64)
    shift = float(np.sum(np.log(run_std) - np.log(tr_std)))
    s = ck.read_summary(run)
    cfg = vae.config_
    return {"vaelens": float(ll.mean()) + shift, "epochs": f"{s['best_epoch']}/{s['epochs_run']}",
            "hidden": ",".join(map(str, cfg.model.hidden)) or "linear", "latent_dim": cfg.model.latent_dim}


def host() -> str:
    cpu, flags = platform.processor() or "unknown CPU", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import torch

    avx = "AVX-512" if " avx512f" in flags else "no AVX-512"
    return f"{cpu} ({avx}, {os.cpu_count()} CPUs), torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", help="comma-separated subset of the tables")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--keep", type=Path, help="keep the CSVs and runs in this folder (default: a temporary one)")
    ap.add_argument("extra", nargs="*", help="extra `vaelens train` flags, after --")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    chosen = tables()
    if args.tables:
        chosen = {k: chosen[k] for k in args.tables.split(",")}
    work = args.keep or Path(tempfile.mkdtemp(prefix="vaelens-tables-"))
    print(f"host: {host()}; {args.threads} thread(s)")
    head = (f"{'table':20s} {'n':>4s} {'test':>4s} {'p':>3s} {'indep':>8s} {'full cov':>8s} {'FA (k)':>12s} "
            f"{'vaelens':>8s} {'- FA':>7s} {'epochs':>9s} {'train s':>7s}")
    print(head)
    rows = []
    for name, (X, names, y) in chosen.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        i_tr, i_te = write_split(folder, X, names, y)
        mean, std = X[i_tr].mean(0), X[i_tr].std(0)
        b = baselines((X[i_tr] - mean) / std, (X[i_te] - mean) / std)
        run, secs = run_vaelens(folder, names, args.threads, args.extra)
        v = vaelens_loglik(run, X[i_te], std)
        row = {"table": name, "n_train": len(i_tr), "n_test": len(i_te), "p": X.shape[1], **b, **v,
               "margin_vs_fa": v["vaelens"] - b["fa"], "train_seconds": round(secs, 1)}
        rows.append(row)
        print(f"{name:20s} {len(i_tr):4d} {len(i_te):4d} {X.shape[1]:3d} {b['independent']:8.2f} "
              f"{b['full_cov']:8.2f} {b['fa']:8.2f} ({b['fa_factors']:2d}) {v['vaelens']:8.2f} "
              f"{row['margin_vs_fa']:+7.2f} {v['epochs']:>9s} {secs:7.1f}", flush=True)
    worse = [r["table"] for r in rows if r["margin_vs_fa"] < 0]
    print("vaelens >= factor analysis on every table" if not worse
          else f"vaelens below factor analysis on: {', '.join(worse)}")
    if args.json:
        args.json.write_text(json.dumps({"host": host(), "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
