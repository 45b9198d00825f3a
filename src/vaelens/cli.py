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
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
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
    g.add_argument("--beta", type=float, help="KL weight (1.0)")
    g.add_argument("--warmup-epochs", type=int, help="linear KL warm-up from 0 to beta over this many epochs")
    g.add_argument("--free-bits", type=float, help="free bits per latent dimension, in nats")
    g.add_argument("--patience", type=int, help="early stopping after this many epochs without improvement")
    g.add_argument("--seed", type=int, help="random seed (0)")
    g.add_argument("--seeds", type=_int_list, help="train one run per seed, in OUT/seed-S")
    g.add_argument("--device", choices=DEVICES, help="auto picks cuda when available")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast on CUDA")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="run directory (default runs/<data>-<time>)")
    g.add_argument("--config", type=Path, help="start from this config.json; flags override it")
    g.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in RUN from its newest checkpoint")
    g.add_argument("--force", action="store_true", help="replace an existing run directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


_FLAG_TO_FIELD = {
    "model": ("latent_dim", "hidden", "activation", "arch", "likelihood", "gaussian_scale", "fixed_scale",
              "sigma_floor"),
    "train": ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "lr_gamma", "grad_clip",
              "objective", "iw_samples", "beta", "warmup_epochs", "free_bits", "patience", "seed", "device", "bf16"),
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
        resume = True
    else:
        cfg = _train_config(args)
        seeds = args.seeds or (cfg.train.seed,)
        out = args.out if args.out is not None else _default_out(cfg)
        if info.is_main and out.exists() and any(out.iterdir()):
            if not args.force:
                raise VaelensError(f"{out}: run directory already exists and is not empty; pass --force to replace "
                                   f"it, --resume {out} to continue it, or choose another --out")
            if (out / ck.CONFIG).exists() or not any(out.iterdir()):
                shutil.rmtree(out)
            else:
                raise VaelensError(f"{out}: exists and is not a vaelens run directory; refusing to delete it even "
                                   f"with --force")
        runs = [(out / f"seed-{s}" if args.seeds else out, cfg.replace(train={"seed": s})) for s in seeds]
        ds = data_mod.load(cfg.data, "train")
        resume = False
    if not resume:
        say(f"data: {ds.name} ({ds.n} samples, {ds.p} features"
            f"{', images ' + 'x'.join(map(str, ds.image_shape)) if ds.image_shape else ''})")
    results = []
    for run_dir, rcfg in runs:
        if not resume:
            rcfg, X, X_val = prepare(rcfg, ds)
        t0 = time.perf_counter()
        result = fit(rcfg, X, X_val, run_dir=run_dir, resume=resume,
                     progress=None if not args.no_progress else False, handle_signals=True)
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
    """Hook for `train --report` (filled in by the report command)."""


# --- encode -----------------------------------------------------------------------------------

def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="write every sample's mu and sigma (and reparameterized z) to a file",
                       formatter_class=_Formatter,
                       epilog="examples:\n  vaelens encode runs/digits-... --out posterior.npz\n"
                              "  vaelens encode RUN --data test.csv --out post.csv --samples 10\n")
    p.add_argument("run", type=Path, help="run directory")
    _add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default="train", help="the data set's own split")
    p.add_argument("--out", type=Path, required=True, help="output .npz, .csv or .parquet")
    p.add_argument("--samples", type=int, default=0, help="also write K reparameterized z per sample")
    p.add_argument("--seed", type=int, default=0, help="seed for the z samples")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_encode)


def _load_run_and_data(args):
    from . import data as data_mod
    from .api import VAE

    vae = VAE.load(args.run)
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

    cfg = ck.load_config(args.run)
    ck.verify_checksums(args.run, [ck.CONFIG, ck.WEIGHTS])
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
    print(f"  training {t.objective}{'(K=%d)' % t.iw_samples if t.objective == 'iwae' else ''} {t.optimizer} "
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


# --- main -------------------------------------------------------------------------------------

COMMANDS = [_add_train, _add_encode, _add_sample, _add_info]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import VaelensError

    try:
        return int(args.func(args) or 0)
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
        from . import dist

        dist.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
