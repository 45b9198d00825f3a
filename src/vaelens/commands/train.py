"""`vaelens train`: train a VAE (or one per seed) and write run directories.

The model, training and preprocessing flags are generated from the config dataclasses
(`vaelens.config.options`): each field's help, choices and default are declared once, there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from .. import config
from .. import data as data_mod
from .. import safeio
from ..config import RunConfig
from ..errors import ConfigError, TrainingDiverged, VaelensError
from ..io import check_writable
from . import _common as common
from . import _resume
from .render import Result

if TYPE_CHECKING:
    from ..report import Report
    from ..train import TrainResult

NAME = "train"
DISTRIBUTED = True  # every torchrun rank trains its share of each batch

_EPILOG = """examples:
  vaelens train                                  # digits, the built-in default
  vaelens train --data mnist --data-dir ~/data/mnist --binarize dynamic --epochs 50
  vaelens train --data table.csv --likelihood gaussian --standardize --label-column class
  vaelens train --seeds 0,1,2 --out runs/seeds    # one run per seed, for `vaelens compare`
  vaelens train --resume runs/digits-...         # continue a stopped run
  vaelens train --resume runs/t-... --epochs 400 # train a finished run longer (recorded in RUN/resumes.json)
"""


def add_parser(subparsers):
    p = common.add_parser(subparsers, NAME, help="train a VAE and write a run directory", epilog=_EPILOG,
                          description="Train a VAE. With no arguments: the built-in digits set.")
    common.add_data_args(p)
    groups = {name: p.add_argument_group(name) for name in ("preprocessing", "model", "training")}
    common.add_options(p, groups=groups)
    groups["training"].add_argument("--seeds", type=common.seed_list, help="train one run per seed, in OUT/seed-S")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="run directory (default runs/<data>-<time>)")
    g.add_argument("--config", type=Path, help="start from this config.json; flags override it")
    g.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the run in RUN from its newest checkpoint; only --epochs (more), --patience and "
                        "--device may change, and each change is recorded in RUN/resumes.json")
    g.add_argument("--force", action="store_true", help="replace an existing run directory")
    g.add_argument("--checkpoint-every", type=float, default=10.0, metavar="SECONDS",
                   help="write a resumable checkpoint at the end of an epoch once this many seconds have passed "
                        "since the last one (0: every epoch); SIGINT/SIGTERM always save one")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--report", action="store_true", help="write RUN/report.html (figures in RUN/figures) at the end")
    g.add_argument("--tensorboard", action="store_true",
                   help="log every epoch's figures (and images of image runs) to RUN/tensorboard for TensorBoard; "
                        "a resumed run continues the same curves (needs: pip install 'vaelens[tensorboard]')")
    return p


# --- configuration ------------------------------------------------------------------------------

def train_config(args) -> RunConfig:
    """The run's config: --config (or the defaults, then the data set's own), then the flags."""
    if args.config is not None:
        if not args.config.exists():
            raise ConfigError(f"{args.config}: no such config file")
        # the user's file may be anything (a FIFO, a link to /dev/zero): read it as a run's config is read
        text = safeio.read_bytes(args.config, safeio.CONFIG_LIMIT, ConfigError).decode("utf-8", errors="replace")
        cfg = RunConfig.from_json(text, source=str(args.config))
        # the model's size comes from the data again, so the config can be reused on other data
        cfg = cfg.replace(model={"input_dim": None, "image_shape": None},
                          data={"feature_columns": None, "labels": None, "label_kind": None})
        data = common.data_config(args, base=cfg.data)
    else:
        cfg = RunConfig()
        data = common.data_config(args)
    given = common.given_options(args)
    if args.config is None:
        for sec, values in config.dataset_defaults(data.name).items():
            for k, v in values.items():
                given[sec].setdefault(k, v)
    if given["data"].get("binarize") == "dynamic" and given["model"].get("likelihood") == "gaussian" \
            and args.binarize is None:
        given["data"]["binarize"] = "none"  # mnist's default binarization does not apply to a gaussian model
    if given["train"].get("iw_samples", 1) > 1 and "objective" not in given["train"]:
        given["train"]["objective"] = "iwae"
    cfg = cfg.replace(data=dataclasses.replace(data, **given["data"]), model=given["model"], train=given["train"])
    cfg.data.validate()
    cfg.train.validate()
    return cfg


def default_out(cfg: RunConfig) -> Path:
    name = Path(cfg.data.path).stem if cfg.data.name == "file" else cfg.data.name
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        out = Path(f"{base}-{i}")
        i += 1
    return out


def check_run_dir(out: Path, force: bool) -> None:
    """Refuse an --out that cannot become a run directory, before the data is loaded."""
    from .. import checkpoint as ck

    check_writable(out, force=force, what="run directory", folder=True)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise VaelensError(f"{out}: run directory already exists and is not empty; pass --force to replace "
                               f"it, --resume {out} to continue it, or choose another --out")
        if not (out / ck.CONFIG).exists():
            raise VaelensError(f"{out}: exists and is not a vaelens run directory; refusing to delete it even "
                               f"with --force")


# --- the result ---------------------------------------------------------------------------------

@dataclass
class TrainedRun:
    run_dir: Path
    result: TrainResult
    seconds: float
    report: Optional[Report] = None
    resumed: Optional[dict] = None  # this invocation's entry of RUN/resumes.json
    advice: List[str] = field(default_factory=list)  # warnings about the finished run (vaelens.advice)

    def to_dict(self) -> dict:
        r = self.result
        return {"run": str(self.run_dir), "epochs_run": r.epochs_run, "stopped_early": r.stopped_early,
                "best_epoch": r.best_epoch, "best_val_loss": r.best_val_loss, "interrupted": r.interrupted,
                "seconds": round(self.seconds, 3), "last_epoch": r.history[-1] if r.history else None,
                "report": None if self.report is None else str(self.report.path),
                "resumed": self.resumed, "warnings": self.advice}

    def lines(self) -> List[str]:
        r = self.result
        if r.interrupted:
            return [f"stopped by {r.interrupted} at epoch {r.epochs_run + 1}; checkpoint saved. "
                    f"Continue with: vaelens train --resume {self.run_dir}"]
        last = r.history[-1] if r.history else {}
        out = [f"run: {self.run_dir}"] + ([f"  {_resume.describe(self.resumed)}"] if self.resumed else []) + [
               f"  epochs {r.epochs_run}{' (early stop)' if r.stopped_early else ''}, "
               f"{self.seconds:.1f} s; best epoch {r.best_epoch}"]
        if last:
            out.append(f"  train -ELBO {last['train_loss']:.3f} (rec {-last['train_rec']:.3f}, "
                       f"KL {last['train_kl']:.3f})"
                       + (f"; validation -ELBO {last['val_loss']:.3f}" if "val_loss" in last else ""))
            out.append(f"  best {'validation' if 'val_loss' in last else 'training'} -ELBO "
                       f"{r.best_val_loss:.3f} nats")
        if self.report is not None:
            rep = self.report
            out.append(f"  report {rep.path} ({len(rep.figures)} figures in {self.run_dir / 'figures'}, "
                       f"{rep.seconds:.1f} s)")
        return out


@dataclass
class TrainOutcome(Result):
    runs: List[TrainedRun] = field(default_factory=list)

    @property
    def interrupted(self) -> Optional[str]:
        return self.runs[-1].result.interrupted if self.runs else None

    @property
    def exit_code(self) -> int:
        return {None: 0, "SIGINT": 130}.get(self.interrupted, 143)

    def to_dict(self) -> dict:
        return {"runs": [r.to_dict() for r in self.runs], "interrupted": self.interrupted}

    def lines(self) -> List[str]:
        return [line for r in self.runs for line in r.lines()]


# --- running ------------------------------------------------------------------------------------

@dataclass
class _Plan:
    runs: list  # [(run_dir, cfg)]
    ds: object  # the training data set
    prepared: dict  # {0: prepared data of the first run}
    resumed: Optional[dict] = None  # --resume: this invocation's record (RUN/resumes.json); {} on other ranks
    made: bool = False  # whether this invocation creates the run directory (so may remove it again)


def load_data(cfg: RunConfig):
    """The training data `cfg` names: a Dataset in memory, or a `shards.ShardSet` to stream (`stream.choose`)."""
    from .. import stream

    src = stream.choose(cfg)
    if src is None:
        return data_mod.load(cfg.data, "train")
    return src if stream.streams(cfg, src) else src.to_dataset()


def restart_count() -> int:
    """How often torchrun has restarted this worker group (--max-restarts); 0 outside torchrun."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _plan_resume(args, info, run_dir: Optional[Path] = None) -> _Plan:
    """--resume RUN; or, with `run_dir`, an elastic restart of the run the first attempt started there: its
    saved config as it is (the flags were for the new run, and made it), recorded as a restart."""
    from .. import checkpoint as ck
    from ..train import prepare

    restart = run_dir is not None
    run_dir = args.resume if run_dir is None else run_dir
    cfg = ck.load_config(run_dir)
    check_writable(run_dir, folder=True)
    cfg, changes = (cfg, {}) if restart else _resume.resumed_config(args, run_dir, cfg)
    ds = load_data(cfg)
    # the run's transform and sizes are kept, so resumed data is prepared exactly as before
    cfg, X, X_val = prepare(cfg, ds)
    entry = {}
    if info.is_main:
        if changes:
            ck.save_config(run_dir, cfg)  # explicitly, and recorded beside it in RUN/resumes.json
        entry = _resume.record(run_dir, changes, restart=restart_count() if restart else None)
    return _Plan([(run_dir, cfg)], ds, {0: (cfg, X, X_val)}, resumed=entry)


def _elastic(args) -> Optional[Path]:
    """After torchrun restarted the workers (a rank died; --max-restarts), the run directory to continue
    from its newest complete checkpoint, or None to start the run (again: no checkpoint was written)."""
    from .. import checkpoint as ck

    if restart_count() == 0 or args.resume is not None:
        return None
    if args.out is None or args.seeds:
        raise VaelensError("torchrun restarted the workers, but a restarted run needs the run directory named "
                           "with --out (and one run, not --seeds) to continue from its checkpoint")
    if ck.checkpoint_candidates(args.out):
        return args.out
    if args.out.is_dir() and any(args.out.iterdir()):
        if any(p.name not in _early_files() | {_resume.RESUMES} for p in args.out.iterdir()):
            raise VaelensError(f"torchrun restarted the workers; {args.out} holds no checkpoint and files vaelens "
                               f"did not write, so it is left as it is")
        args.force = True  # what the first attempt wrote before its first checkpoint: start again
    return None


def _plan(args, info) -> _Plan:
    from .. import shards
    from ..train import prepare

    if args.resume is not None:
        return _plan_resume(args, info)
    again = _elastic(args)
    if again is not None:
        return _plan_resume(args, info, again)
    cfg = train_config(args)
    out = args.out if args.out is not None else default_out(cfg)
    check_run_dir(out, args.force)
    made = not out.exists() or (args.force and any(out.iterdir()))
    seeds = args.seeds or (cfg.train.seed,)
    runs = [(out / f"seed-{s}" if args.seeds else out, cfg.replace(train={"seed": s})) for s in seeds]
    ds = load_data(cfg)
    if args.report and isinstance(ds, shards.ShardSet):
        raise ConfigError("--report needs the training data in memory, and this run streams it; write the "
                          "report afterwards on a sample: vaelens report RUN --data SAMPLE.npy")
    # bad data fails here, before an existing run directory is replaced with --force
    prepared = {0: prepare(runs[0][1], ds)}
    if info.is_main and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # check_run_dir allowed it: --force, and a vaelens run directory
    return _Plan(runs, ds, prepared, made=made or bool(args.seeds))


def _warn(message, *_args, **_kw) -> None:
    # e.g. "skipped damaged checkpoint(s)" on --resume: one readable line, not a source location
    print(f"vaelens train: warning: {message}", file=sys.stderr)


def _early_files() -> set:
    """What `fit` writes into a run directory before its first checkpoint."""
    from .. import checkpoint as ck

    return {ck.CONFIG, ck.METRICS, ck.CHECKSUMS, ck.WEIGHTS, ck.SUMMARY, ck.CKPT_DIR}


def _after_divergence(run_dir: Path, made: bool, cfg: RunConfig) -> str:
    """Remove what a run that diverged before its first checkpoint wrote, so that the same command can run
    again; the sentence that says so and how to retry ("" when a checkpoint is kept: resuming is the way)."""
    from .. import checkpoint as ck

    if ck.checkpoint_candidates(run_dir) or not run_dir.is_dir():
        return ""
    entries = list(run_dir.iterdir())
    if any(p.name not in _early_files() for p in entries):
        return f" {run_dir} holds files vaelens did not write, so it is left as it is; retry with another --out."
    if made:
        shutil.rmtree(run_dir)
    else:  # the user's own (empty) folder: keep it, empty again
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    lower = cfg.train.lr / 10
    return (f" {run_dir} held no checkpoint and was removed, so the same command can run again: retry it with "
            f"--lr {lower:g}" + ("" if cfg.train.grad_clip else " and/or --grad-clip 1.0")
            + ("" if cfg.data.standardize or cfg.model.likelihood != "gaussian" else " and/or --standardize") + ".")


def _fit_one(args, plan: _Plan, run_dir: Path, rcfg: RunConfig, X, X_val, info) -> TrainResult:
    from .. import tracking
    from ..train import fit

    # fit calls on_epoch on rank 0 alone; the logger is a command option, not part of the run's config
    logger = (tracking.TensorBoardLogger(run_dir, rcfg, _rows(X) if X_val is None else X_val)
              if getattr(args, "tensorboard", False) else None)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn
            return fit(rcfg, X, X_val, run_dir=run_dir, resume=plan.resumed is not None,
                       progress=False if args.no_progress else None, handle_signals=True,
                       checkpoint_interval_s=args.checkpoint_every, on_epoch=logger,
                       on_epoch_model=logger is not None)
    except TrainingDiverged as e:
        if plan.resumed is not None or not info.is_main:
            raise
        raise TrainingDiverged(f"{e}{_after_divergence(Path(run_dir), plan.made, rcfg)}") from None
    finally:
        if logger is not None:
            logger.close()


def _rows(X, n: int = 5000):
    """Training rows for the logger's figures and the advice: X itself, or a streamed set's first n rows of its
    seeded order."""
    from .. import stream

    return X.head(n) if isinstance(X, stream.StreamData) else X


def run(args) -> TrainOutcome:
    from .. import advice, dist, stream, tracking
    from ..train import prepare

    if getattr(args, "tensorboard", False):
        tracking.require_tensorboard()  # before any data is read
    info = dist.env_info()
    plan = _plan(args, info)
    ds = plan.ds
    if plan.resumed is None and info.is_main:
        shape = f", images {'x'.join(map(str, ds.image_shape))}" if ds.image_shape else ""
        how = (f", streamed in blocks of {plan.runs[0][1].train.block_rows} rows"
               if isinstance(plan.prepared.get(0, (None, None))[1], stream.StreamData) else "")
        print(f"data: {ds.name} ({ds.n} samples, {ds.p} features{shape}{how})", flush=True)
        common.show_notes(ds)
    outcome = TrainOutcome()
    for i, (run_dir, rcfg) in enumerate(plan.runs):
        rcfg, X, X_val = plan.prepared.pop(i) if i in plan.prepared else prepare(rcfg, ds)
        t0 = time.perf_counter()
        result = _fit_one(args, plan, run_dir, rcfg, X, X_val, info)
        done = TrainedRun(run_dir, result, time.perf_counter() - t0, resumed=plan.resumed or None)
        outcome.runs.append(done)
        if result.interrupted:
            break
        if info.is_main:
            if plan.resumed:
                _resume.add_to_summary(run_dir)
            done.advice = advice.advise(rcfg, result, _rows(X), feature_names=ds.feature_names, run_dir=run_dir)
            for line in done.advice:
                _warn(line)
        if args.report and info.is_main:
            from ..report import build_report  # matplotlib and scikit-learn, only for --report

            done.report = build_report(run_dir, ds)
    return outcome
