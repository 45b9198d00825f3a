"""`vaelens evaluate`: ELBO, IWAE log-likelihood, active units, I(x; z) and aggregate KL of a run.

Data that `vaelens train` would stream (`vaelens.stream.choose`: a .npy/.parquet file over 512 MiB, or a
folder/glob of shards over it) is evaluated chunk by chunk (`vaelens.evaluate_stream`), memory independent of
the row count; I(x; z) and the aggregate KL then come from a seeded subsample of rows (docs/streaming.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import data as data_mod
from ..config import DEVICES
from ..errors import VaelensError
from . import _common as common
from .info import family_text
from .render import Result, se_cell

NAME = "evaluate"
DISTRIBUTED = True  # under torchrun the ranks share the log-likelihood rows; rank 0 reports

_EPILOG = ("examples:\n  vaelens evaluate runs/digits-...\n"
           "  vaelens evaluate runs/mnist-... --data-dir ~/data/mnist --iw-samples 5000 --json eval.json\n"
           "  vaelens evaluate RUN --split train --limit 1000 --iw-samples 100\n"
           "  vaelens evaluate RUN --data test.csv --label-column class   # a table's own test file\n"
           "  torchrun --nproc_per_node=2 -m vaelens evaluate RUN   # log p(x) rows shared between 2 processes\n")


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME, epilog=_EPILOG,
        help="ELBO, IWAE log-likelihood, active units, mutual information and aggregate KL of a run",
        description="Evaluate a run on its data set's test split, or on a file (--data FILE, read with the run's "
                    "feature columns): per-sample ELBO terms averaged, the importance-weighted estimate of log p(x) "
                    "(Burda et al. 2016) in nats and bits per dimension, active units, I(x; z) and KL(q(z) || p(z)). "
                    "Binarized runs are evaluated on one seeded binarization of the data. Every density is in the "
                    "space the model sees (binarized pixels, grey levels, standardized units or data units; the "
                    "output says which); a standardized run also gives log p(x) in data units. Data that "
                    "'vaelens train' would stream (a large .npy/.parquet file, a folder or glob of shards) is "
                    "evaluated in chunks, memory independent of its length; I(x; z) and the aggregate KL then use a "
                    "seeded subsample of 10000 rows.")
    common.add_run_args(p, split=None, split_help="a built-in set's own split (default: test); a --data file is "
                                                  "evaluated whole")
    p.add_argument("--iw-samples", type=int, default=5000, help="importance samples K for log p(x); 0 skips it")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (and the binarization)")
    p.add_argument("--batch-size", type=int, help="data points per IWAE decoder call (default: automatic)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where to compute; auto picks cuda when available")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--per-sample", action="store_true", help="include per-sample values in the JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass
class EvaluateResult(Result):
    numbers: dict  # Evaluation.to_dict() with the run, data, split, seed and processes
    json_path: Optional[Path] = None

    def to_dict(self) -> dict:
        return self.numbers

    def lines(self):
        r = self.numbers
        what = f"{r['data']} {r['split']} split" if r["split"] else r["data"]
        n = f"{r['n']} samples" if r["split"] else f"all {r['n']} samples"
        out = [f"evaluate {r['run']} on {what} ({n}, {r['features']} features"
               f"{', binarized once with seed %d' % r['seed'] if r['binarized'] else ''})",
               f"  densities in nats of the model's input: {r['space']}"]
        if r.get("family"):  # not the default diagonal family with N(0, I)
            out.append(f"  {r['family']}; KL(q(z|x) || p(z)) by Monte Carlo with the ELBO's draws where torch "
                       f"has no closed form; a dimension's KL is its marginals' KL (they do not sum to the KL)")
        short = _SHORT.get(r["space"], r["space"])
        rows = [(f"ELBO [{short}]", r["elbo"], r["elbo_se"], "nats"),
                ("  reconstruction E_q[log p(x|z)]", r["rec"], None, "nats"),
                ("  KL(q(z|x) || p(z))", r["kl"], None, "nats")]
        if r["log_likelihood"] is not None:
            rows += [(f"log p(x) [{short}], IWAE k={r['iw_samples']}", r["log_likelihood"], r["log_likelihood_se"],
                      "nats"),
                     ("-log p(x) per dimension", r["bits_per_dim"], None, "bits/dim")]
        if r.get("log_likelihood_data_units") is not None:
            rows.append(("log p(x) [data units]", r["log_likelihood_data_units"], r["log_likelihood_se"],
                         "nats (standardized - sum log std)"))
        rows += [("I(x; z)", r["mutual_information"], r["mutual_information_se"],
                  f"nats (at most log n = {r['mutual_information_max']:.2f})"),
                 ("KL(q(z) || p(z)), aggregate", r["aggregate_kl"], r["aggregate_kl_se"], "nats")]
        w = max(34, max(len(name) for name, *_ in rows))
        out.append(f"  {'metric':{w}s} {'mean':>12s} {'± s.e.':>8s}")
        out += [f"  {name:{w}s} {v:12.4f} {se_cell(se)}  {unit}" for name, v, se, unit in rows]
        out.append(f"  {'active units':{w}s} {r['active_units']:>12d} {'':8s}  of {r['latent_dim']} "
                   f"(Cov_x E_q[z_u] > {r['active_threshold']:g})")
        if r.get("streamed"):
            s = r["streamed"]
            out.append(f"  streamed in chunks of {s['chunk_rows']} rows; I(x; z) and the aggregate KL on "
                       + ("all rows" if s["aggregate_rows"] == r["n"] else
                          f"a subsample of {s['aggregate_rows']} rows (seeded by --seed)"))
        out.append(f"  {'dim':>5s} {'KL':>10s} {'activity':>10s}")
        out += [f"  {j:5d} {kl:10.4f} {act:10.4f}{'  active' if act > r['active_threshold'] else ''}"
                for j, (kl, act) in enumerate(zip(r["kl_per_dim"], r["activity"]))]
        return out


# the row labels' short form of `data.figure_space`
_SHORT = {"binarized pixels (0/1)": "binarized", "binarized values (0/1)": "binarized",
          "grey levels in [0, 1]": "grey levels", "standardized units (the run's mean and std)": "standardized",
          "data units": "data units"}


def evaluation_split(args, cfg) -> Optional[str]:
    """Which split of the data to evaluate: a built-in set's own (default test); None for a file, read whole."""
    if cfg.name in data_mod.BUILTIN:
        return args.split or "test"
    if args.data is not None:
        if args.split is not None:
            print(f"note: --split applies to the built-in data sets only; {cfg.path} is evaluated whole",
                  file=sys.stderr, flush=True)
        return None
    if args.split == "train":
        return "train"  # the run's own training file, asked for by name
    raise VaelensError(f"{args.run} was trained on {cfg.path}, which has no test split of its own; pass the test "
                       f"file with --data FILE (or --split train to evaluate the training file)")


def run(args) -> EvaluateResult:
    import torch

    from .. import dist, stream
    from ..api import VAE
    from ..train import resolve_device

    if args.iw_samples < 0:
        raise VaelensError(f"--iw-samples must be >= 0, got {args.iw_samples}")
    common.check_limit(args.limit, minimum=1)
    info = dist.env_info()
    json_out = common.check_output(args.json, args.force) if info.is_main else None  # rank 0 alone writes
    device = resolve_device(args.device)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    dist.setup(device)
    vae = VAE.load(args.run, device=str(device))
    cfg = common.data_config(args, base=vae.config_.data)
    split = evaluation_split(args, cfg)
    src = stream.choose(vae.config_.replace(data=cfg)) if split in (None, "train") else None
    if src is not None and args.limit is not None:
        src = src.limit(args.limit)
    progress = not args.no_progress and sys.stderr.isatty()
    if src is not None and stream.streams(vae.config_, src):
        r, name = _evaluate_streamed(args, vae, src, info, progress), src.name
    else:
        ds = data_mod.load(cfg, split or "train") if src is None else src.to_dataset()  # a file's "train": all of it
        if info.is_main:
            common.show_notes(ds)
        X = common.first_rows(ds.X, args.limit)
        ev = vae.evaluate(X, iw_samples=args.iw_samples, seed=args.seed, distributed=True, progress=progress,
                          batch_size=args.batch_size)
        r, name = ev.to_dict(per_sample=args.per_sample), ds.name
    r.update(run=str(args.run), data=name, split=split, binarized=vae.binarized_,
             seed=args.seed, processes=info.world_size, space=data_mod.figure_space(vae.config_))
    m = vae.config_.model
    if not m.factorized:  # the default's JSON stays as it was
        r.update(family=family_text(m), posterior=m.posterior, prior=m.prior, prior_components=m.components)
    if vae.config_.data.standardize:
        # x = mean + std * x', so log p(x) = log p(x') - sum(log std): comparable with models fitted on raw columns
        shift = data_mod.log_jacobian(vae.config_.transform)
        r.update(log_jacobian=shift, elbo_data_units=r["elbo"] + shift,
                 log_likelihood_data_units=None if r["log_likelihood"] is None else r["log_likelihood"] + shift)
    return EvaluateResult(r, json_out)


def _evaluate_streamed(args, vae, src, info, progress: bool) -> dict:
    """Data that `vaelens train` would stream (`stream.choose`), evaluated chunk by chunk with memory
    independent of n (`vaelens.evaluate_stream`). A binarized run binarizes chunk c with the seed (--seed, c),
    as `vaelens encode` does, so its figures differ from the in-memory binarization's."""
    if args.per_sample:
        raise VaelensError(f"--per-sample would hold every row's values of {src.name} ({src.n} rows, streamed) in "
                           f"the JSON; evaluate fewer rows (--limit) or without --per-sample")
    if args.batch_size is not None:
        raise VaelensError("--batch-size applies to data in memory; streamed data is evaluated in whole batches "
                           "of the automatic size")
    from .. import shards
    from ..evaluate_stream import evaluate_stream

    shards.scan(src, vae.config_.model.likelihood)  # bad rows named by shard file and row, before any work
    if info.is_main:
        common.show_notes(src)

    def read(lo: int, hi: int, c: int):
        seed = int(np.random.SeedSequence([args.seed, c]).generate_state(1)[0])
        return vae.model_input(src.read(lo, hi), seed)

    return evaluate_stream(vae.module_, read, src.n, src.p, args.iw_samples, seed=args.seed, progress=progress,
                           distributed=True)
