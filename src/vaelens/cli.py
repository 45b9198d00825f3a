"""The `vaelens` command line. The only module that parses argv or prints.

User errors (`VaelensError`) print one line and exit with status 2; `--debug` shows the
traceback. Existing outputs are never overwritten without `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2

_EPILOG_TRAIN = """examples:
  vaelens train                                  # digits, the built-in default
  vaelens train --data mnist --data-dir ~/data/mnist --binarize dynamic --epochs 50
  vaelens train --data table.csv --likelihood gaussian --standardize --label-column class
  vaelens train --seeds 0,1,2 --out runs/seeds    # one run per seed, for `vaelens compare`
  vaelens train --resume runs/digits-...         # continue a stopped run
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # Most flags default to None so that the config (or the data set's own default, named in the
    # help text) fills them; "(default: None)" after those would be noise, and wrong.
    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_list(text: str):
    text = text.strip()
    if text.lower() in ("", "none", "linear"):
        return ()
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return vals


def _seed_list(text: str):
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers >= 0, got {text!r}")
    return vals


def _str_list(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())


# --- shared options ---------------------------------------------------------------------------

def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None if not required else None, required=required,
                   help="built-in set (digits, mnist, fashion-mnist) or a .npy/.npz/.csv/.parquet file")
    g.add_argument("--data-dir", help="folder with the MNIST/Fashion-MNIST IDX files (default $VAELENS_DATA_DIR "
                                      "or ~/.cache/vaelens)")
    g.add_argument("--key", help="array name inside an .npz file")
    g.add_argument("--columns", type=_str_list, help="comma-separated feature columns of a table")
    g.add_argument("--label-column", help="table column (or .npz key) with labels; kept out of the features")

def _add_run_args(p: argparse.ArgumentParser, split: str = "train") -> None:
    """RUN, the data options and --split: what every command that reads a run and its data takes."""
    p.add_argument("run", type=Path, help="run directory")
    _add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default=split, help="the data set's own split")


def _add_json_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON file")


def _data_config(args, base=None):
    from .config import DataConfig
    from .data import BUILTIN

    spec = args.data
    fields = {}
    if spec is None:
        if base is not None:
            fields = {k: getattr(base, k) for k in ("name", "path", "key", "columns", "label_column", "data_dir")}
        else:
            fields = {"name": "digits"}
    elif spec in BUILTIN:
        fields = {"name": spec}
    else:
        fields = {"name": "file", "path": spec}
    for k in ("data_dir", "key", "columns", "label_column"):
        v = getattr(args, k, None)
        if v is not None:
            fields[k] = v
    if fields.get("name") in BUILTIN and fields.get("data_dir") is None:
        fields["data_dir"] = None
    return DataConfig(**fields) if base is None else _dc_replace(base, **fields)


def _dc_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _out_path(path: Path, force: bool, what: str = "output file") -> Path:
    """Refuse to overwrite an existing file unless --force."""
    if path.exists() and not force:
        from .errors import VaelensError

        raise VaelensError(f"{path}: {what} already exists; pass --force to overwrite it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- train ------------------------------------------------------------------------------------

# Defaults that depend on the data set, applied where the user gave no flag.
_DATA_DEFAULTS = {
    "digits": {"epochs": 200, "batch_size": 128},
    "mnist": {"epochs": 50, "batch_size": 128, "binarize": "dynamic"},
    "fashion-mnist": {"epochs": 50, "batch_size": 128},
}


def _add_train(sub) -> None:
    from .config import ACTIVATIONS, ARCHS, BINARIZE, DEVICES, GAUSSIAN_SCALES, LIKELIHOODS, OBJECTIVES, OPTIMIZERS, \
        SCHEDULES

    p = sub.add_parser("train", help="train a VAE and write a run directory", formatter_class=_Formatter,
                       epilog=_EPILOG_TRAIN, description="Train a VAE. With no arguments: the built-in digits set.")
    _add_data_args(p)
    g = p.add_argument_group("preprocessing")
    g.add_argument("--binarize", choices=BINARIZE, help="image binarization (default: none; mnist: dynamic)")
    g.add_argument("--standardize", action="store_true", default=None,
                   help="standardize features (mean 0, std 1; saved in the run) for continuous data")
    g.add_argument("--val-fraction", type=float, help="share of the training data held out for validation (0.1)")
    g.add_argument("--limit", type=int, help="use only the first N training samples")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, help="latent dimensions d (8)")
    g.add_argument("--hidden", type=_int_list, help="hidden sizes, e.g. 256,128; 'none' for a linear model")
    g.add_argument("--activation", choices=ACTIVATIONS)
    g.add_argument("--arch", choices=ARCHS, help="mlp, or conv for images")
    g.add_argument("--likelihood", choices=LIKELIHOODS, help="decoder distribution (bernoulli)")
    g.add_argument("--gaussian-scale", choices=GAUSSIAN_SCALES, help="gaussian decoder scale (per_feature)")
    g.add_argument("--fixed-scale", type=float, help="gaussian scale when --gaussian-scale fixed (1.0)")
    g.add_argument("--sigma-floor", type=float, help="smallest encoder sigma (1e-4)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (digits 200, mnist 50)")
    g.add_argument("--batch-size", type=int, help="global batch size (128)")
    g.add_argument("--lr", type=float, help="learning rate (1e-3)")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (constant)")
    g.add_argument("--lr-gamma", type=float, help="decay factor for the exponential and plateau schedules")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--objective", choices=OBJECTIVES, help="elbo, or iwae with --iw-samples K")
    g.add_argument("--iw-samples", type=int, help="K for the IWAE objective")
    g.add_argument("--dreg", action="store_true", default=None,
                   help="IWAE: doubly reparameterized encoder gradient (Tucker et al. 2018); same bound, "
                        "lower-variance encoder updates")
    g.add_argument("--beta", type=float, help="KL weight (1.0)")
    g.add_argument("--warmup-epochs", type=int, help="linear KL warm-up from 0 to beta over this many epochs")
    g.add_argument("--free-bits", type=float, help="free bits per latent dimension, in nats")
    g.add_argument("--patience", type=int, help="early stopping after this many epochs without improvement")
    g.add_argument("--seed", type=int, help="random seed (0)")
    g.add_argument("--seeds", type=_seed_list, help="train one run per seed, in OUT/seed-S")
    g.add_argument("--device", choices=DEVICES, help="auto picks cuda when available")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast for training (CUDA, or a CPU with native bf16)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="run directory (default runs/<data>-<time>)")
    g.add_argument("--config", type=Path, help="start from this config.json; flags override it")
    g.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in RUN from its newest checkpoint")
    g.add_argument("--force", action="store_true", help="replace an existing run directory")
    g.add_argument("--checkpoint-every", type=float, default=10.0, metavar="SECONDS",
                   help="write a resumable checkpoint at the end of an epoch once this many seconds have passed "
                        "since the last one (0: every epoch); SIGINT/SIGTERM always save one")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--report", action="store_true", help="write RUN/report.html (figures in RUN/figures) at the end")
    p.set_defaults(func=cmd_train)


_FLAG_TO_FIELD = {
    "model": ("latent_dim", "hidden", "activation", "arch", "likelihood", "gaussian_scale", "fixed_scale",
              "sigma_floor"),
    "train": ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "lr_gamma", "grad_clip",
              "objective", "iw_samples", "dreg", "beta", "warmup_epochs", "free_bits", "patience", "seed", "device", "bf16"),
    "data": ("binarize", "standardize", "val_fraction", "limit"),
}


def _train_config(args):
    from .config import RunConfig
    from .errors import ConfigError

    if args.config is not None:
        if not args.config.exists():
            raise ConfigError(f"{args.config}: no such config file")
        cfg = RunConfig.from_json(args.config.read_text(), source=str(args.config))
        # the model's size comes from the data again, so the config can be reused on other data
        cfg = cfg.replace(model={"input_dim": None, "image_shape": None})
    else:
        cfg = RunConfig()
    data = _data_config(args, base=cfg.data if args.config is not None else None)
    given = {sec: {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
             for sec, fields in _FLAG_TO_FIELD.items()}
    if args.config is None:
        for k, v in _DATA_DEFAULTS.get(data.name, {}).items():
            sec = "data" if k == "binarize" else "train"
            given[sec].setdefault(k, v)
    if given["data"].get("binarize") == "dynamic" and given["model"].get("likelihood") == "gaussian" \
            and args.binarize is None:
        given["data"]["binarize"] = "none"
    if given["train"].get("iw_samples", 1) > 1 and "objective" not in given["train"]:
        given["train"]["objective"] = "iwae"
    data = _dc_replace(data, **given["data"])
    cfg = cfg.replace(data=data, model=given["model"], train=given["train"])
    try:
        cfg.data.validate(), cfg.train.validate()
    except ConfigError:
        raise
    return cfg


def _default_out(cfg) -> Path:
    name = Path(cfg.data.path).stem if cfg.data.name == "file" else cfg.data.name
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        out = Path(f"{base}-{i}")
        i += 1
    return out


def cmd_train(args) -> int:
    import warnings

    from . import checkpoint as ck
    from . import data as data_mod
    from . import dist
    from .errors import VaelensError
    from .train import fit, prepare

    info = dist.env_info()
    say = print if info.is_main else (lambda *a, **k: None)
    if args.resume is not None:
        run_dir = args.resume
        cfg = ck.load_config(run_dir)
        if args.epochs is not None:
            cfg = cfg.replace(train={"epochs": args.epochs})
        ds = data_mod.load(cfg.data, "train")
        # the run's transform and sizes are kept, so resumed data is prepared exactly as before
        cfg, X, X_val = prepare(cfg, ds)
        if info.is_main:
            ck.save_config(run_dir, cfg)
        runs = [(run_dir, cfg)]
        prepared = {0: (cfg, X, X_val)}
        resume = True
    else:
        cfg = _train_config(args)
        seeds = args.seeds or (cfg.train.seed,)
        out = args.out if args.out is not None else _default_out(cfg)
        if out.exists() and not out.is_dir():
            raise VaelensError(f"{out}: exists and is a file, not a run directory; choose another --out")
        runs = [(out / f"seed-{s}" if args.seeds else out, cfg.replace(train={"seed": s})) for s in seeds]
        ds = data_mod.load(cfg.data, "train")
        # bad data fails here, before an existing run directory is replaced with --force
        prepared = {0: prepare(runs[0][1], ds)}
        if info.is_main and out.exists() and any(out.iterdir()):
            if not args.force:
                raise VaelensError(f"{out}: run directory already exists and is not empty; pass --force to replace "
                                   f"it, --resume {out} to continue it, or choose another --out")
            if (out / ck.CONFIG).exists() or not any(out.iterdir()):
                shutil.rmtree(out)
            else:
                raise VaelensError(f"{out}: exists and is not a vaelens run directory; refusing to delete it even "
                                   f"with --force")
        resume = False
    if not resume:
        say(f"data: {ds.name} ({ds.n} samples, {ds.p} features"
            f"{', images ' + 'x'.join(map(str, ds.image_shape)) if ds.image_shape else ''})")
    results = []
    for i, (run_dir, rcfg) in enumerate(runs):
        rcfg, X, X_val = prepared.pop(i) if i in prepared else prepare(rcfg, ds)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # e.g. "skipped damaged checkpoint(s)" on --resume: one readable line, not a source location
            warnings.showwarning = lambda message, *a, **k: print(f"vaelens train: warning: {message}",
                                                                  file=sys.stderr)
            result = fit(rcfg, X, X_val, run_dir=run_dir, resume=resume,
                         progress=None if not args.no_progress else False, handle_signals=True,
                         checkpoint_interval_s=args.checkpoint_every)
        dt = time.perf_counter() - t0
        results.append(result)
        if result.interrupted:
            say(f"stopped by {result.interrupted} at epoch {result.epochs_run + 1}; checkpoint saved. "
                f"Continue with: vaelens train --resume {run_dir}")
            return 130 if result.interrupted == "SIGINT" else 143
        last = result.history[-1] if result.history else {}
        say(f"run: {run_dir}")
        line = (f"  epochs {result.epochs_run}{' (early stop)' if result.stopped_early else ''}, "
                f"{dt:.1f} s; best epoch {result.best_epoch}")
        say(line)
        if last:
            say(f"  train -ELBO {last['train_loss']:.3f} (rec {-last['train_rec']:.3f}, KL {last['train_kl']:.3f})"
                + (f"; validation -ELBO {last['val_loss']:.3f}" if "val_loss" in last else ""))
            say(f"  best {'validation' if 'val_loss' in last else 'training'} -ELBO {result.best_val_loss:.3f} nats")
        if getattr(args, "report", False) and info.is_main:
            _after_train_report(run_dir, args)
    return 0


def _after_train_report(run_dir, args) -> None:
    """`train --report`: the report of the finished run, on the run's own data."""
    from .report import build_report

    rep = build_report(run_dir)
    print(f"  report {rep.path} ({len(rep.figures)} figures in {Path(run_dir) / 'figures'}, {rep.seconds:.1f} s)")


# --- report -----------------------------------------------------------------------------------

def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report with every figure of a run",
                       formatter_class=_Formatter,
                       description="One HTML file (figures embedded, no network) showing the run, reconstructions,\n"
                                   "the latent map with per-sample ellipses, point clouds, the aggregate posterior\n"
                                   "against the prior and, with --compare, the agreement across seeds. The figures\n"
                                   "are also saved as PNG in RUN/figures/.",
                       epilog="examples:\n  vaelens report runs/digits-...\n"
                              "  vaelens report runs/seeds/seed-0 --compare runs/seeds/seed-1 runs/seeds/seed-2\n"
                              "  vaelens report RUN --data test.csv --out test-report.html --json report.json\n")
    _add_run_args(p)
    p.add_argument("--out", type=Path, help="HTML file (default RUN/report.html)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RUN", help="other runs (seeds) on the same data")
    p.add_argument("--dims", type=_dim_pair, help="the two latent dimensions of the latent map, e.g. 0,3 "
                                                  "(default: the two most active)")
    p.add_argument("--max-points", type=int, default=2000, help="larger data sets are subsampled (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed for the subsample and every draw")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation metrics (the slowest part)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the computed figures as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=cmd_report)


def _dim_pair(text: str):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated latent dimensions, got {text!r}") from None
    if len(dims) != 2 or min(dims) < 0:
        raise argparse.ArgumentTypeError(f"expected two latent dimensions >= 0 such as 0,1; got {text!r}")
    return dims


def cmd_report(args) -> int:
    from .errors import VaelensError
    from .report import build_report

    if args.max_points < 10:
        raise VaelensError(f"--max-points must be >= 10, got {args.max_points}")
    out = _out_path(args.out if args.out is not None else args.run / "report.html", args.force, "report")
    json_out = _out_path(args.json, args.force) if args.json is not None else None
    vae, ds = _load_run_and_data(args)
    del vae  # build_report loads the run itself; this checked the run and loaded the data
    rep = build_report(args.run, ds, out, compare_runs=args.compare, seed=args.seed, max_points=args.max_points,
                       dims=args.dims, evaluate=not args.no_eval)
    num = rep.numbers
    print(f"wrote {rep.path} ({rep.path.stat().st_size / 1e6:.1f} MB, {rep.seconds:.1f} s); "
          f"figures in {args.run / 'figures'}")
    for note in rep.notes:
        print(f"  note: {note}")
    print(f"  {'section':<16} status")
    for sid, why in rep.sections.items():
        print(f"  {sid:<16} {'skipped: ' + why if why else 'ok'}")
    print(f"  active units {num['active_units']} of {num['latent_dim']} (Var mu > 0.01)")
    if "point_cloud" in num:
        pc = num["point_cloud"]
        print(f"  point-cloud check {'passed' if pc['passed'] else 'FAILED'} (p = {pc['p_value']:.3g}, "
              f"{len(pc['indices'])} samples x {pc['n_samples']} draws)")
    if "aggregate" in num:
        print(f"  {'dim':<5} {'between':>9} {'within':>9} {'total':>9}  (aggregate posterior; prior total 1)")
        agg = num["aggregate"]
        for j in range(num["latent_dim"]):
            print(f"  z{j:<4} {agg['between'][j]:9.4f} {agg['within'][j]:9.4f} {agg['total'][j]:9.4f}")
    if "compare" in num:
        print(f"  MCC with {num['compare']['runs'][0]}: "
              + ", ".join(f"{r}: {c:.3f}" for r, c in zip(num["compare"]["runs"][1:], num["compare"]["mcc"][0][1:])))
    if json_out is not None:
        from . import checkpoint as ck

        ck.atomic_write_text(json_out, json.dumps(rep.to_dict(), indent=2) + "\n")
        print(f"wrote {json_out}")
    return 0


# --- encode -----------------------------------------------------------------------------------

def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="write every sample's mu and sigma (and reparameterized z) to a file",
                       formatter_class=_Formatter,
                       epilog="examples:\n  vaelens encode runs/digits-... --out posterior.npz\n"
                              "  vaelens encode RUN --data test.csv --out post.csv --samples 10\n")
    _add_run_args(p)
    p.add_argument("--out", type=Path, required=True, help="output .npz, .csv or .parquet")
    p.add_argument("--samples", type=int, default=0, help="also write K reparameterized z per sample")
    p.add_argument("--seed", type=int, default=0, help="seed for the z samples")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_encode)


def _load_run_and_data(args, device: str = "cpu"):
    from . import data as data_mod
    from .api import VAE

    vae = VAE.load(args.run, device=device)
    dcfg = _data_config(args, base=vae.config_.data)
    ds = data_mod.load(dcfg, getattr(args, "split", "train"))
    return vae, ds


def cmd_encode(args) -> int:
    import numpy as np

    from .errors import VaelensError

    suffix = args.out.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise VaelensError(f"{args.out}: output must end in .npz, .csv or .parquet")
    if args.samples < 0:
        raise VaelensError(f"--samples must be >= 0, got {args.samples}")
    out = _out_path(args.out, args.force)
    vae, ds = _load_run_and_data(args)
    post = vae.encode(ds.X)
    cols = {"index": np.arange(ds.n)}
    if ds.y is not None:
        cols["label"] = ds.y
    z = vae.sample_latent(ds.X, args.samples, seed=args.seed) if args.samples else None  # (K, n, d)
    d = post.mu.shape[1]
    if suffix == ".npz":
        arrays = dict(cols, mu=post.mu, sigma=post.sigma)
        if z is not None:
            arrays["z"] = np.transpose(z, (1, 0, 2))  # (n, K, d)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    else:
        table = dict(cols)
        table.update({f"mu_{j}": post.mu[:, j] for j in range(d)})
        table.update({f"sigma_{j}": post.sigma[:, j] for j in range(d)})
        if z is not None:
            for k in range(z.shape[0]):
                table.update({f"z{k}_{j}": z[k, :, j] for j in range(d)})
        _write_table(out, table)
    print(f"wrote {out}: mu and sigma of {ds.n} samples x {d} dimensions"
          + (f", {args.samples} z samples each" if z is not None else ""))
    return 0


def _write_table(out: Path, table: dict) -> None:
    import numpy as np

    from .errors import DataError

    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("writing .parquet needs pyarrow: pip install 'vaelens[parquet]'") from None
        pq.write_table(pa.table({k: np.asarray(v) for k, v in table.items()}), tmp)
    else:
        names = list(table)
        cols = [np.asarray(table[k]) for k in names]
        with open(tmp, "w") as f:
            f.write(",".join(names) + "\n")
            for i in range(len(cols[0])):
                f.write(",".join(repr(c[i].item()) if c.dtype.kind == "f" else str(c[i]) for c in cols) + "\n")
    os.replace(tmp, out)


# --- sample -----------------------------------------------------------------------------------

def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="decode draws from the prior: a PNG grid for images, CSV for tables",
                       formatter_class=_Formatter, epilog="example:\n  vaelens sample runs/digits-... -n 64 --out samples.png\n")
    p.add_argument("run", type=Path)
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help=".png (image runs), .csv or .npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import numpy as np

    from .api import VAE
    from .errors import VaelensError

    if args.n < 1:
        raise VaelensError(f"-n must be >= 1, got {args.n}")
    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".csv", ".npy"):
        raise VaelensError(f"{args.out}: output must end in .png, .csv or .npy")
    vae = VAE.load(args.run)
    shape = vae.config_.model.image_shape
    if suffix == ".png" and shape is None:
        raise VaelensError(f"{args.run}: a table model has no images; write --out samples.csv instead")
    out = _out_path(args.out, args.force)
    x = vae.generate(args.n, seed=args.seed)
    if suffix == ".png":
        from .plots import save_image_grid

        save_image_grid(out, x, shape)
    elif suffix == ".npy":
        np.save(out, x)
    else:
        _write_table(out, {f"x_{j}": x[:, j] for j in range(x.shape[1])})
    print(f"wrote {out}: {args.n} samples decoded from z ~ N(0, I)")
    return 0


# --- info -------------------------------------------------------------------------------------

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a run's configuration and results", formatter_class=_Formatter,
                       epilog="example:\n  vaelens info runs/digits-...\n")
    p.add_argument("run", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from . import checkpoint as ck

    cfg, _ = ck.load_model(args.run)  # reads every file the run needs, so a damaged one is reported here
    summary = ck.read_summary(args.run)
    metrics = ck.read_metrics(args.run)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "summary": summary, "epochs_logged": len(metrics)}, indent=2))
        return 0
    m, t, d = cfg.model, cfg.train, cfg.data
    print(f"run {args.run}")
    print(f"  data     {d.path if d.name == 'file' else d.name}  binarize={d.binarize} standardize={d.standardize}")
    print(f"  model    {m.arch} {m.input_dim}-{'-'.join(map(str, m.hidden)) or '(linear)'}-{m.latent_dim}  "
          f"likelihood={m.likelihood}{'/' + m.gaussian_scale if m.likelihood == 'gaussian' else ''}  "
          f"activation={m.activation}")
    print(f"  training {t.objective}{'(K=%d)' % t.iw_samples if t.objective == 'iwae' else ''}"
          f"{' DReG' if t.dreg else ''} {t.optimizer} "
          f"lr={t.lr:g} batch={t.batch_size} epochs={t.epochs} beta={t.beta:g} seed={t.seed}")
    if metrics:
        last = metrics[-1]
        print(f"  logged   {len(metrics)} epochs; last train -ELBO {last['train_loss']:.3f}"
              + (f", validation -ELBO {last['val_loss']:.3f}" if "val_loss" in last else ""))
    if summary:
        key = "best_val_loss" if "best_val_loss" in summary else "best_train_loss"
        if key in summary:
            print(f"  best     epoch {summary.get('best_epoch')}: {summary[key]:.3f} nats")
    return 0


# --- evaluate ---------------------------------------------------------------------------------

def _add_evaluate(sub) -> None:
    from .config import DEVICES

    p = sub.add_parser(
        "evaluate", formatter_class=_Formatter,
        help="ELBO, IWAE log-likelihood, active units, mutual information and aggregate KL of a run",
        description="Evaluate a run on its own test split (or --data): per-sample ELBO terms averaged, the "
                    "importance-weighted estimate of log p(x) (Burda et al. 2016) in nats and bits per "
                    "dimension, active units, I(x; z) and KL(q(z) || p(z)). Binarized runs are evaluated on "
                    "one seeded binarization of the data.",
        epilog="examples:\n  vaelens evaluate runs/digits-...\n"
               "  vaelens evaluate runs/mnist-... --data-dir ~/data/mnist --iw-samples 5000 --json eval.json\n"
               "  vaelens evaluate RUN --split train --limit 1000 --iw-samples 100\n"
               "  torchrun --nproc_per_node=2 -m vaelens evaluate RUN   # log p(x) rows shared between 2 processes\n")
    _add_run_args(p, split="test")
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
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    import math

    import torch

    from . import data as data_mod
    from . import dist
    from .errors import VaelensError
    from .train import resolve_device

    if args.iw_samples < 0:
        raise VaelensError(f"--iw-samples must be >= 0, got {args.iw_samples}")
    if args.limit is not None and args.limit < 1:
        raise VaelensError(f"--limit must be >= 1, got {args.limit}")
    # under torchrun every rank computes a share of the log-likelihood rows; rank 0 alone reports
    info = dist.env_info()
    out = _out_path(args.json, args.force) if args.json is not None and info.is_main else None
    device = resolve_device(args.device)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    dist.setup(device)
    vae, ds = _load_run_and_data(args, device=str(device))
    X = ds.X if args.limit is None else ds.X[:args.limit]
    binarized = vae.config_.data.binarize != "none"
    if binarized:
        # the model was trained on binary images; log p(x) of grey levels is not a probability
        X = data_mod.binarize_static(X, args.seed)
    ev = vae.evaluate(X, iw_samples=args.iw_samples, seed=args.seed, distributed=True,
                      progress=not args.no_progress and sys.stderr.isatty(), batch_size=args.batch_size)
    if not info.is_main:
        return 0
    r = ev.to_dict(per_sample=args.per_sample)
    r.update(run=str(args.run), data=ds.name, split=args.split, binarized=binarized, seed=args.seed,
             processes=info.world_size)
    d = r["latent_dim"]
    print(f"evaluate {args.run} on {ds.name} {args.split} ({r['n']} samples, {r['features']} features"
          f"{', binarized once with seed %d' % args.seed if binarized else ''})")
    rows = [("ELBO", r["elbo"], r["elbo_se"], "nats"),
            ("  reconstruction E_q[log p(x|z)]", r["rec"], None, "nats"),
            ("  KL(q(z|x) || p(z))", r["kl"], None, "nats")]
    if r["log_likelihood"] is not None:
        rows += [(f"log p(x), IWAE k={args.iw_samples}", r["log_likelihood"], r["log_likelihood_se"], "nats"),
                 ("-log p(x) per dimension", r["bits_per_dim"], None, "bits/dim")]
    rows += [("I(x; z)", r["mutual_information"], r["mutual_information_se"],
              f"nats (at most log n = {r['mutual_information_max']:.2f})"),
             ("KL(q(z) || p(z)), aggregate", r["aggregate_kl"], r["aggregate_kl_se"], "nats")]
    print(f"  {'metric':34s} {'mean':>12s} {'± s.e.':>8s}")
    for name, v, se, unit in rows:
        print(f"  {name:34s} {v:12.4f} {'' if se is None or math.isnan(se) else f'{se:8.4f}':>8s}  {unit}")
    print(f"  {'active units':34s} {r['active_units']:>12d} {'':8s}  of {d} (Cov_x E_q[z_u] > "
          f"{r['active_threshold']:g})")
    print(f"  {'dim':>5s} {'KL':>10s} {'activity':>10s}")
    for j, (kl, act) in enumerate(zip(r["kl_per_dim"], r["activity"])):
        print(f"  {j:5d} {kl:10.4f} {act:10.4f}{'  active' if act > r['active_threshold'] else ''}")
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(r, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


# --- serve ------------------------------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="explore a model's latent space in a local web page",
                       formatter_class=_Formatter,
                       description="Serve a local web page: the latent map, one sample's posterior and draws "
                                   "of z, the decoder's output under the pointer, the aggregate posterior.",
                       epilog="examples:\n  vaelens serve runs/digits-...\n"
                              "  vaelens serve runs/mnist-... --data mnist --data-dir ~/data/mnist --port 8080\n")
    _add_run_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the page to your network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--max-points", type=int, default=5000, help="larger data sets are mapped as a seeded subsample")
    p.add_argument("--seed", type=int, default=0, help="seed of that subsample")
    p.set_defaults(func=cmd_serve)


def _listen(host: str, port: int):
    """A listening socket bound before the server starts, so the printed address is the real one."""
    import socket

    from .errors import VaelensError

    if not 0 <= port <= 65535:
        raise VaelensError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise VaelensError(f"cannot listen on {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise VaelensError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    from . import serve

    serve.require_deps()
    import uvicorn

    if args.max_points < 1:
        from .errors import VaelensError

        raise VaelensError(f"--max-points must be >= 1, got {args.max_points}")
    # Bound first: a busy port is reported before the model and data are loaded.
    sock = _listen(args.host, args.port)
    try:
        vae, ds = _load_run_and_data(args)
        # On loopback only loopback Host headers are answered: a web page elsewhere cannot reach
        # the API through DNS rebinding.
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if args.host in _LOOPBACK else None
        app = serve.create_app(vae, ds, max_points=args.max_points, seed=args.seed, allowed_hosts=hosts)
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"vaelens serve: {ds.name}, {ds.n} samples, latent dimension {vae.config_.model.latent_dim}")
        if hosts is None:
            print(f"listening on {args.host}, not loopback: anyone who can reach this machine can open the page")
        print(f"open http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled once it has shut down
    finally:
        sock.close()
    print("stopped")
    return 0


# --- check, posterior, symmetry, compare: what mu(x) and sigma(x) are ---------------------------

def _model_data(args, vae, ds):
    """The run's data as the model sees it: the first --limit rows, binarized once for binarized runs."""
    from . import data as data_mod
    from .errors import VaelensError

    limit = getattr(args, "limit", None)
    if limit is not None and limit < 2:
        raise VaelensError(f"--limit must be >= 2, got {limit}")
    X = ds.X if limit is None else ds.X[:limit]
    if vae.config_.data.binarize != "none":
        X = data_mod.binarize_static(X, getattr(args, "seed", 0))
    return X


def _write_json_file(out, obj) -> None:
    from . import checkpoint as ck

    ck.atomic_write_text(out, json.dumps(obj, indent=2) + "\n")
    print(f"wrote {out}")


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check", formatter_class=_Formatter,
        help="point-cloud check: are mu(x) and sigma(x) the mean and std of the model's own draws?",
        description="For chosen samples, draw S reparameterized z through the encoder's sampling path and test "
                    "the cloud against N(mu(x), sigma(x)^2): standardized mean errors, std ratios, a KS test of "
                    "the pooled (z - mu)/sigma against N(0, 1) and chi-square tests of the means and variances, "
                    "Bonferroni-combined at --level.",
        epilog="examples:\n  vaelens check runs/digits-...\n  vaelens check RUN --indices 0,5,9 --samples 5000\n"
               "  vaelens check RUN --data table.csv --n 20 --json check.json\n")
    _add_run_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--indices", type=lambda t: tuple(int(v) for v in t.split(",") if v.strip()),
                   help="comma-separated rows to check")
    g.add_argument("--n", type=int, default=10, help="check this many random rows")
    p.add_argument("--samples", type=int, default=2000, help="draws S per sample")
    p.add_argument("--level", type=float, default=0.01, help="overall significance level of the verdict")
    p.add_argument("--seed", type=int, default=0, help="seed for the rows chosen and the draws")
    _add_json_args(p)
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    import numpy as np

    out = _out_path(args.json, args.force) if args.json is not None else None
    vae, ds = _load_run_and_data(args)
    X = _model_data(args, vae, ds)
    c = vae.check(X, indices=args.indices, n=args.n, n_samples=args.samples, level=args.level, seed=args.seed)
    k, d = c.mu.shape
    S = c.n_samples
    print(f"check {args.run} on {ds.name} {args.split}: {k} samples x {S} draws of z (d = {d})")
    print(f"  {'index':>6} {'max|mean err|':>15} {'std ratio min..max':>18}   mu (first 4){'':16}sigma (first 4)")
    for r in range(k):
        print(f"  {c.indices[r]:6d} {np.abs(c.mean_z[r]).max():10.2f} s.e. "
              f"{c.std_ratio[r].min():7.4f}..{c.std_ratio[r].max():.4f}   "
              + " ".join(f"{v:6.2f}" for v in c.mu[r, :4]) + "   " + " ".join(f"{v:5.3f}" for v in c.sigma[r, :4]))
    band = 3 / np.sqrt(2 * S)
    print(f"  (a true claim gives mean errors ~ N(0, 1) s.e. and std ratios within about 1 +- {band:.3f})")
    print(f"  KS, pooled (z - mu)/sigma vs N(0, 1): D = {c.ks_stat:.4f}, p = {c.ks_p:.3g}")
    print(f"  chi-square of the mean errors:        {c.mean_chi2:.1f} on {k * d} dof, p = {c.mean_p:.3g}")
    print(f"  chi-square of the variances:          {c.var_chi2:.0f} on {k * d * (S - 1)} dof, p = {c.var_p:.3g}")
    verdict = "PASS" if c.passed else "FAIL"
    print(f"verdict: {verdict}: combined p = {c.p_value:.3g} (Bonferroni over 3 tests) "
          f"{'>=' if c.passed else '<'} level {args.level:g}; "
          + ("the draws are N(mu(x), sigma(x)^2): mu is their mean and sigma their std"
             if c.passed else "the draws do not follow N(mu(x), sigma(x)^2)"))
    if out is not None:
        r = c.to_dict()
        r.update(run=str(args.run), data=ds.name, split=args.split, verdict=verdict)
        _write_json_file(out, r)
    return 0 if c.passed else 1


def _add_posterior(sub) -> None:
    p = sub.add_parser(
        "posterior", formatter_class=_Formatter,
        help="the data set's aggregate posterior: variance between samples vs within a sample",
        description="q(z) = mean over x of q(z|x). Its mean is E[mu(x)], its covariance E[diag sigma(x)^2] + "
                    "Cov(mu(x)) (law of total variance). Per latent: Var(mu) between samples, E[sigma^2] within "
                    "a sample, each checked against a Monte Carlo sample of the mixture; and q(z)'s distance "
                    "from the prior N(0, I).",
        epilog="examples:\n  vaelens posterior runs/digits-...\n  vaelens posterior RUN --draws 100000 --json agg.json\n")
    _add_run_args(p)
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--draws", type=int, default=50000, help="Monte Carlo draws from the mixture")
    p.add_argument("--seed", type=int, default=0)
    _add_json_args(p)
    p.set_defaults(func=cmd_posterior)


def cmd_posterior(args) -> int:
    from .errors import VaelensError
    from .posterior import aggregate_monte_carlo, aggregate_posterior

    if args.draws < 100:
        raise VaelensError(f"--draws must be >= 100, got {args.draws}")
    out = _out_path(args.json, args.force) if args.json is not None else None
    vae, ds = _load_run_and_data(args)
    post = vae.encode(_model_data(args, vae, ds))
    agg = aggregate_posterior(post.mu, post.sigma)
    mc = aggregate_monte_carlo(post.mu, post.sigma, n_draws=args.draws, seed=args.seed)
    print(f"aggregate posterior q(z) of {args.run} on {ds.name} {args.split} ({agg.n} samples)")
    print(f"  {'dim':<4} {'E[mu]':>8} {'Var(mu)':>9} {'E[sig^2]':>9} {'total':>8} {'between':>8} "
          f"{'MC total':>9} {'± s.e.':>7} {'z':>6}")
    for j in range(len(agg.mean)):
        print(f"  z{j:<3} {agg.mean[j]:8.3f} {agg.between[j]:9.4f} {agg.within[j]:9.4f} {agg.total[j]:8.4f} "
              f"{100 * agg.share_between[j]:7.1f}% {mc.cov[j, j]:9.4f} {mc.var_se[j]:7.4f} {mc.var_err_z[j]:6.2f}"
              f"{'' if agg.active[j] else '  inactive'}")
    print("  between = Var(mu) / total: the share of a latent's variance that tells samples apart")
    print(f"  KL(N(mean, cov) || N(0, I)), moment-matched: {agg.kl_moment_matched:.4f} nats (a lower bound)")
    print(f"  KL(q(z) || N(0, I)), Monte Carlo:          {mc.kl_mixture:.4f} ± {mc.kl_mixture_se:.4f} nats")
    print(f"  mean KL(q(z|x) || p(z)) (the ELBO's term): {agg.mean_kl:.4f} nats; I(x; z) = {mc.mutual_info:.4f}")
    verdict = "PASS" if mc.passed else "FAIL"
    print(f"verdict: {verdict}: law of total variance vs {mc.n_draws} draws of the mixture, largest |z| = "
          f"{mc.max_abs_z:.2f} over {2 * len(agg.mean)} means and variances")
    if out is not None:
        _write_json_file(out, {"run": str(args.run), "data": ds.name, "split": args.split,
                               "aggregate": agg.to_dict(), "monte_carlo": mc.to_dict(), "verdict": verdict})
    return 0


def _add_symmetry(sub) -> None:
    p = sub.add_parser(
        "symmetry", formatter_class=_Formatter,
        help="signed permutations leave the ELBO unchanged, rotations lower it",
        description="Apply a random signed permutation of the latent axes to the trained model (encoder heads "
                    "and the decoder's first layer): mu and sigma change, the per-sample ELBO does not. Apply "
                    "random rotations: the prior is unchanged, but a diagonal posterior cannot follow, so the "
                    "ELBO drops. Computed in float64 with the same noise mapped through each symmetry.",
        epilog="examples:\n  vaelens symmetry runs/digits-...\n  vaelens symmetry RUN --rotations 5 --json sym.json\n")
    _add_run_args(p)
    p.add_argument("--limit", type=int, default=2000, help="use the first N samples")
    p.add_argument("--rotations", type=int, default=3, help="random rotations to try")
    p.add_argument("--samples", type=int, default=16, help="draws of z per sample for the ELBO")
    p.add_argument("--seed", type=int, default=0)
    _add_json_args(p)
    p.set_defaults(func=cmd_symmetry)


def cmd_symmetry(args) -> int:
    from .errors import VaelensError
    from .uniqueness import PERMUTATION_RTOL

    if args.rotations < 0 or args.samples < 1:
        raise VaelensError("--rotations must be >= 0 and --samples >= 1")
    out = _out_path(args.json, args.force) if args.json is not None else None
    vae, ds = _load_run_and_data(args)
    r = vae.symmetry(_model_data(args, vae, ds), seed=args.seed, n_rotations=args.rotations, n_samples=args.samples)
    n = len(r.elbo)
    print(f"symmetry {args.run} on {ds.name} {args.split} ({n} samples, {args.samples} draws each, float64)")
    print(f"  signed permutation: z'_j = sign_j * z_perm(j), perm {r.perm.tolist()}, "
          f"signs {[int(s) for s in r.signs]}")
    print(f"    mu changes by up to {r.mu_max_change:.4f}; mu' - sign * mu[perm] is at most {r.mu_map_error:.2e}")
    print(f"    mean ELBO {r.elbo.mean():.6f} -> {r.elbo_perm.mean():.6f} nats; largest per-sample relative "
          f"change {r.perm_max_rel_diff:.2e} (tolerance {PERMUTATION_RTOL:g})")
    if len(r.rotation_drop):
        print(f"  {'45° rotation of':>15} {'ELBO drop':>10} {'± s.e.':>8} {'drop, moment-matched sigma':>27}  "
              f"(nats/sample)")
        for (i, j), dr, se, mm in zip(r.rotation_planes, r.rotation_drop, r.rotation_drop_se, r.rotation_drop_matched):
            print(f"  {f'z{i}, z{j}':>15} {dr:10.4f} {se:8.4f} {mm:27.4f}")
    unchanged = "unchanged" if r.perm_invariant else "CHANGED"
    flat = [f"z{i}, z{j}" for (i, j), dr, se in zip(r.rotation_planes, r.rotation_drop, r.rotation_drop_se)
            if not dr > 3 * se]
    rot = ("every rotation tried lowers it (> 3 s.e.): unique at best up to signed permutation"
           if r.rotation_significant else
           f"rotating {'; '.join(flat)} costs no measurable ELBO: within that plane the latents are "
           f"identifiable only up to rotation" if len(r.rotation_drop) else "no rotations tried")
    print(f"verdict: ELBO {unchanged} under signed permutation; {rot}")
    if out is not None:
        d = r.to_dict()
        d.update(run=str(args.run), data=ds.name, split=args.split)
        _write_json_file(out, d)
    return 0 if r.perm_invariant else 1


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="do retrainings (e.g. train --seeds) learn the same latents? MCC, CKA, linear R^2",
        description="Encode the same data with every run and compare each pair: mean correlation coefficient "
                    "(|Pearson| and |Spearman| of latent means matched by the Hungarian method on one half of "
                    "the samples, scored on the other), linear CKA, held-out R^2 of the best linear map both "
                    "ways, and a per-latent table that also compares sigma. Inactive latents (Var mu <= 0.01) "
                    "are listed apart.",
        epilog="examples:\n  vaelens train --seeds 0,1,2 --out runs/seeds\n"
               "  vaelens compare runs/seeds/seed-0 runs/seeds/seed-1 runs/seeds/seed-2\n"
               "  vaelens compare A B --data test.csv --json cmp.json\n")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="two or more run directories")
    _add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default="train", help="the data set's own split")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="seed for the matching/scoring split")
    _add_json_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from .errors import VaelensError

    if len(args.runs) < 2:
        raise VaelensError("compare needs at least two run directories")
    from .api import VAE
    from .uniqueness import compare

    out = _out_path(args.json, args.force) if args.json is not None else None
    args.run = args.runs[0]
    vae0, ds = _load_run_and_data(args)
    X = _model_data(args, vae0, ds)
    posts = [vae0.encode(X)]
    for run in args.runs[1:]:
        v = VAE.load(run)
        if v.n_features_in_ != vae0.n_features_in_:
            raise VaelensError(f"{run}: expects {v.n_features_in_} features, {args.runs[0]} {vae0.n_features_in_}; "
                               f"compare runs trained on the same kind of data")
        posts.append(v.encode(X))
    print(f"compare {len(args.runs)} runs on {ds.name} {args.split} ({len(X)} samples; matching fitted on one half, "
          f"scored on the other)")
    print(f"  {'A':<5} {'B':<5} {'active':<7} {'MCC P':>6} {'MCC S':>6} {'CKA':>6} {'R2 A>B':>7} {'R2 B>A':>7}")
    results, worst = [], None
    for a in range(len(posts)):
        for b in range(a + 1, len(posts)):
            c = compare(posts[a].mu, posts[b].mu, posts[a].sigma, posts[b].sigma, seed=args.seed)
            results.append((a, b, c))
            print(f"  {a:<5} {b:<5} {f'{int(c.active_a.sum())}/{int(c.active_b.sum())}':<7} {c.mcc_pearson:6.3f} "
                  f"{c.mcc_spearman:6.3f} {c.cka:6.3f} {c.r2_ab:7.3f} {c.r2_ba:7.3f}")
            if worst is None or c.mcc_pearson < worst[2].mcc_pearson:
                worst = (a, b, c)
    for i, run in enumerate(args.runs):
        print(f"  run {i}: {run}")
    a, b, c = worst
    print(f"  matched latents, runs {a} and {b} (the pair with the lowest MCC):")
    print(f"  {'z_A':>4} {'z_B':>4} {'corr':>7} {'spearman':>8} {'mean sig A':>10} {'mean sig B':>10} "
          f"{'corr log sig':>12}")
    for (i, j), r, rho, sa, sb, sc in zip(c.pairs, c.corr, c.spearman, c.sigma_a, c.sigma_b, c.sigma_corr):
        print(f"  {i:4d} {j:4d} {r:7.3f} {rho:8.3f} {sa:10.4f} {sb:10.4f} {sc:12.3f}")
    print(f"  inactive latents: run {a} {c.inactive_a.tolist()}, run {b} {c.inactive_b.tolist()}"
          + (f"; active but unmatched: run {a} {c.unmatched_a.tolist()}, run {b} {c.unmatched_b.tolist()}"
             if len(c.unmatched_a) or len(c.unmatched_b) else ""))
    print(f"verdict: {c.verdict()}" + (" (worst pair)" if len(results) > 1 else ""))
    if out is not None:
        _write_json_file(out, {"runs": [str(r) for r in args.runs], "data": ds.name, "split": args.split,
                               "pairs": [dict(a=a, b=b, **c.to_dict()) for a, b, c in results]})
    return 0


# --- main -------------------------------------------------------------------------------------

COMMANDS = [_add_train, _add_encode, _add_sample, _add_info, _add_report, _add_evaluate, _add_serve, _add_check,
            _add_posterior, _add_symmetry, _add_compare]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaelens", formatter_class=_Formatter,
                     description="Train variational autoencoders and inspect every sample's posterior.",
                     epilog="examples:\n  vaelens train\n  vaelens encode runs/digits-... --out post.npz\n"
                            "  vaelens <command> --help")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version="vaelens 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


# Commands that share their work between torchrun's ranks; the others run on rank 0 alone.
DISTRIBUTED_COMMANDS = ("train", "evaluate")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import dist
    from .errors import VaelensError

    if args.command not in DISTRIBUTED_COMMANDS and not dist.env_info().is_main:
        # started by torchrun: rank 0 does the work and writes the output once
        return 0
    try:
        rc = int(args.func(args) or 0)
        # Under torchrun, ranks finish at different times (rank 0 alone writes and prints); one that
        # destroys the gloo group while another is still working can abort at exit (seen: SIGABRT,
        # "terminate called without an active exception"), so all meet here first.
        dist.barrier()
        return rc
    except VaelensError as e:
        if args.debug:
            raise
        print(f"vaelens {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("vaelens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        dist.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
