"""`vaelens score`: per-sample anomaly scores (negative ELBO, IWAE log p(x), reconstruction error, KL)
to .csv, .parquet or .npz; with labels and --normal, ROC-AUC and average precision of each score."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import data as data_mod
from ..errors import VaelensError
from ..io import atomic_write, prepare_output
from . import _common as common
from .evaluate import evaluation_split
from .render import Result

if TYPE_CHECKING:
    from ..api import VAE

NAME = "score"
SUFFIXES = (".npz", ".csv", ".parquet")
# each score oriented so that higher means "less like the training data"
SCORES = ("neg_elbo", "neg_log_px", "rec_error", "kl")

_EPILOG = ("examples:\n  vaelens score runs/digits-... --out scores.csv\n"
           "  vaelens score RUN --data test.npz --out scores.parquet --k 500 --normal 0,1,2,3,4,5,6,7,8\n")


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME, epilog=_EPILOG,
        help="write every sample's anomaly scores (-ELBO, IWAE log p(x), reconstruction error, KL)",
        description="Score every sample of the data (default: the run's test split; a --data file whole): the "
                    "negative ELBO (one z draw), the IWAE estimate of log p(x) with --k importance samples, the "
                    "reconstruction error (squared error between the model's input and the decoder mean at z = "
                    "mu(x), in the model's units) and KL(q(z|x) || p(z)), with the row index and label as written. "
                    "With --normal CLASSES and labels, also the ROC-AUC and average precision of each score for "
                    "'not one of CLASSES' as the positive class (higher score = more anomalous; log p(x) enters "
                    "as -log p(x)).")
    common.add_run_args(p, split=None, split_help="a built-in set's own split (default: test); a --data file is "
                                                  "scored whole")
    p.add_argument("--out", type=Path, required=True, help="output .csv, .parquet or .npz")
    p.add_argument("--k", type=int, default=100, help="importance samples for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (and a binarized run's bits)")
    p.add_argument("--limit", type=int, help="score only the first N samples")
    p.add_argument("--normal", type=common.str_list, metavar="CLASSES",
                   help="comma-separated labels of the normal classes: report ROC-AUC and average precision")
    common.add_json_args(p)
    return p


@dataclass
class ScoreResult(Result):
    path: Path
    n: int
    k: int
    means: dict
    normal: Optional[list] = None
    n_normal: int = 0
    n_anomalous: int = 0
    metrics: dict = field(default_factory=dict)  # {score: {"roc_auc": .., "average_precision": ..}}
    json_path: Optional[Path] = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "n": self.n, "k": self.k, "means": self.means, "normal": self.normal,
                "n_normal": self.n_normal, "n_anomalous": self.n_anomalous,
                "metrics": self.metrics}

    def lines(self):
        out = [f"wrote {self.path}: scores of {self.n} samples (log p(x) with k={self.k})"]
        out += [f"  mean {name:11s} {v:12.4f}" for name, v in self.means.items()]
        if self.metrics:
            out.append(f"  normal classes {','.join(self.normal)}: {self.n_normal} normal, "
                       f"{self.n_anomalous} anomalous (positive class)")
            out.append(f"  {'score':11s} {'ROC-AUC':>8s} {'avg prec':>9s}")
            out += [f"  {name:11s} {m['roc_auc']:8.4f} {m['average_precision']:9.4f}"
                    for name, m in self.metrics.items()]
        return out


def run(args) -> ScoreResult:
    from ..api import VAE

    suffix = args.out.suffix.lower()
    if suffix not in SUFFIXES:
        raise VaelensError(f"{args.out}: output must end in .csv, .parquet or .npz")
    if args.k < 1:
        raise VaelensError(f"--k must be >= 1 (importance samples), got {args.k}")
    if args.normal is not None and not args.normal:
        raise VaelensError("--normal: give at least one class, e.g. --normal 0,1")
    common.check_limit(args.limit, minimum=1)
    if suffix == ".parquet":
        common.require_pyarrow()
    common.check_output(args.out, args.force)
    json_out = common.check_output(args.json, args.force)
    vae = VAE.load(args.run)
    cfg = common.data_config(args, base=vae.config_.data)
    ds = data_mod.load(cfg, evaluation_split(args, cfg) or "train")
    common.show_notes(ds)
    labels = ds.labels()
    labels = None if labels is None else common.first_rows(labels, args.limit)
    # the labels are checked before the model's work: a typo in --normal should not cost the scoring
    is_normal, known = (None, None) if args.normal is None else normal_mask(labels, args.normal)
    cols = sample_scores(vae, common.first_rows(ds.X, args.limit), args.k, args.seed)
    table = {"index": np.arange(len(cols["kl"]))}
    if labels is not None:
        table["label"] = labels  # as written in the file
    table.update(cols)
    out = prepare_output(args.out, force=True)  # checked above; this creates its folder
    if suffix == ".npz":
        atomic_write(out, lambda f: np.savez(f, **table))
    else:
        common.write_table(out, table)
    means = {name: float(np.mean(v)) for name, v in cols.items()}
    if is_normal is None:
        return ScoreResult(out, len(cols["kl"]), args.k, means, json_path=json_out)
    metrics = detection_metrics({k: v[known] for k, v in cols.items()}, is_normal[known])
    return ScoreResult(out, len(cols["kl"]), args.k, means, list(args.normal), int(is_normal[known].sum()),
                       int((~is_normal[known]).sum()), metrics, json_out)


def sample_scores(vae: VAE, X: np.ndarray, k: int, seed: int) -> dict:
    """Per-sample columns (float64): neg_elbo, log_px, neg_log_px, rec_error, kl: the figures the Python
    API gives for the same rows and seed (`VAE.elbo_terms` with one seeded draw, `VAE.log_likelihood`,
    `VAE.reconstruction_error`)."""
    terms = vae.elbo_terms(X, n_samples=1, seed=seed)
    log_px = vae.log_likelihood(X, k=k, seed=seed).astype(np.float64)
    return {"neg_elbo": -terms["elbo"], "log_px": log_px, "neg_log_px": -log_px,
            "rec_error": vae.reconstruction_error(X, seed=seed), "kl": terms["kl"]}


def normal_mask(labels: Optional[np.ndarray], classes, where: str = "--normal") -> np.ndarray:
    """Two boolean (n,) arrays: which rows' label is one of `classes` (strings as typed). Numeric labels compare
    as numbers, so "1" matches 1 and 1.0; and which rows have a label at all (missing ones, NaN, are left
    out of the metrics). Refuses data without labels, a class that no row has, and a
    split that leaves no normal or no anomalous row (the AUC would be undefined)."""
    if labels is None:
        raise VaelensError(f"{where}: the data has no labels (name the label column with --label-column)")
    labels = np.asarray(labels)
    known = ~np.isnan(labels) if labels.dtype.kind == "f" else np.ones(len(labels), bool)
    if labels.dtype.kind in "iuf":
        try:
            wanted = np.array([float(c) for c in classes])
        except ValueError:
            raise VaelensError(f"{where}: the labels are numbers, got {','.join(classes)}") from None
        mask = np.isin(labels.astype(np.float64), wanted)
        present = np.isin(wanted, labels.astype(np.float64))
    else:
        mask = np.isin(labels.astype(str), list(classes))
        present = np.isin(np.asarray(classes), labels.astype(str))
    missing = [c for c, ok in zip(classes, present) if not ok]
    if missing:
        raise VaelensError(f"{where}: no sample has label {', '.join(missing)}")
    if mask[known].all():
        raise VaelensError(f"{where}: every labelled sample is normal; the data needs anomalous (other) labels too")
    return mask, known


def detection_metrics(cols: dict, is_normal: np.ndarray) -> dict:
    """ROC-AUC and average precision of each score, the anomalous (not normal) rows as the positive class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = (~is_normal).astype(int)
    return {name: {"roc_auc": float(roc_auc_score(y, cols[name])),
                   "average_precision": float(average_precision_score(y, cols[name]))} for name in SCORES}
