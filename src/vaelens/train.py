"""The training loop.

A training set that fits lives in one tensor on the training device; each epoch draws a
seeded permutation and slices batches from it, so there is no DataLoader or per-sample
Python work. One that does not is read in blocks (`vaelens.stream`), and the loop takes its
batches in the same place. Randomness is a function of (seed, epoch, rank): resuming from a
checkpoint, or running under torchrun, reproduces the same shuffles and binarizations.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ck
from . import data as data_mod
from . import dist, shards, stream
from .checkpoint import TrainState
from .config import RunConfig
from .data import Dataset
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .model import VAEModule, flush_denormals
# re-exported: callers and tests reach them as vaelens.train.*
from .train_parts import (SignalStop, bf16_autocast, binarize_dynamic, build_optimizer, build_scheduler,  # noqa: F401
                          check_weights, diverged_message, last_checkpoint, resolve_device,
                          validation_terms, validation_terms_of)
from .train_parts import VAL_SEED_OFFSET as _VAL_SEED_OFFSET
from .train_parts import epoch_seed as _epoch_seed

VAL_ROWS = 1024  # validation rows scored per epoch, a small set's repeated (`_val_draws`)


@dataclass
class TrainResult:
    """What a training run produced. `module` holds the best weights, in eval mode."""

    module: VAEModule
    config: RunConfig
    history: list
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool = False
    interrupted: Optional[str] = None  # "SIGINT" / "SIGTERM" when stopped by a signal
    run_dir: Optional[Path] = None
    summary: dict = field(default_factory=dict)


def prepare(cfg: RunConfig, train, val: Optional[Dataset] = None):
    """Fill the config from the data (input size, image shape, standardization) and split.

    Returns (cfg, X_train, X_val) with arrays already transformed and, for static
    binarization, binarized. Validates the data against the likelihood. `train` is a Dataset, or a
    `shards.ShardSet` (`stream.choose`): streamed, X_train is a `stream.StreamData` (so it is for a
    Dataset with --stream on), and a set that is not streamed is loaded here.
    """
    if isinstance(train, shards.ShardSet):
        if stream.streams(cfg, train):
            return stream.prepare_stream(cfg, train, val)
        train = train.to_dataset()
    elif cfg.train.stream == "on":
        return stream.prepare_stream(cfg, shards.from_dataset(train), val)
    X = train.X
    if cfg.data.binarize != "none" and cfg.model.likelihood == "gaussian":
        raise ConfigError("data.binarize needs a bernoulli likelihood, not gaussian")
    if val is None and cfg.data.val_fraction > 0:
        tr_idx, va_idx = data_mod.train_val_split(len(X), cfg.data.val_fraction, cfg.train.seed)
        X, X_val = X[tr_idx], X[va_idx]
    else:
        X_val = None if val is None else val.X
    transform = cfg.transform
    if cfg.data.standardize:
        if cfg.model.likelihood != "gaussian":
            raise ConfigError("data.standardize makes values leave [0, 1]; use it with --likelihood gaussian")
        transform = transform or data_mod.fit_transform(X)
        X = data_mod.apply_transform(X, transform)
        X_val = None if X_val is None else data_mod.apply_transform(X_val, transform)
    model = cfg.model
    if model.input_dim is None:
        model = replace(model, input_dim=int(X.shape[1]), image_shape=train.image_shape)
    cfg = cfg.replace(data=data_mod.with_saved_columns(cfg.data, train), model=model, transform=transform).validate()
    data_mod.validate(X, cfg.model.likelihood, f"{train.name or 'training data'}", cfg.model.input_dim)
    if X_val is not None and len(X_val):
        data_mod.validate(X_val, cfg.model.likelihood, "validation data", cfg.model.input_dim)
    else:
        X_val = None
    if cfg.data.binarize == "static":
        X = data_mod.binarize_static(X, cfg.train.seed)
    if cfg.data.binarize != "none" and X_val is not None:
        # Validation uses one fixed binarization so that epochs are comparable.
        X_val = data_mod.binarize_static(X_val, cfg.train.seed + _VAL_SEED_OFFSET)
    return cfg, X, X_val


@dataclass
class _Run:
    """What `fit` sets up once and every phase of the loop reads (the state that changes is a TrainState)."""

    cfg: RunConfig
    device: torch.device
    info: dist.DistInfo
    module: VAEModule
    model: torch.nn.Module  # what a step calls: the module, or its DDP wrapper under torchrun
    params: list
    opt: torch.optim.Optimizer
    sched: Optional[object]
    X: Optional[torch.Tensor]  # this rank's shard of the training set, on the device (None: streamed)
    X_val: Optional[torch.Tensor]
    stream: Optional[stream.StreamData]  # the training set read in blocks, or None
    batch_size: int  # per rank
    steps_per_epoch: int  # of the data in memory; streamed, each epoch's (`_epoch_batches`)
    out: Optional[Path]  # the run directory this process writes (rank 0 only); None: nothing is written
    stopper: Optional["SignalStop"]  # None when signals are left alone
    autocast: object  # bf16 autocast, or a no-op context


def fit(cfg: RunConfig, X, X_val: Optional[np.ndarray] = None, *, run_dir: Optional[Path] = None,
        resume: bool = False, progress: Optional[bool] = None,
        on_epoch: Optional[Callable[..., None]] = None, handle_signals: bool = False,
        checkpoint_interval_s: float = 10.0, on_epoch_model: bool = False) -> TrainResult:
    """Train a VAE on prepared arrays (see `prepare`).

    Parameters
    ----------
    cfg : RunConfig, with model.input_dim set (`prepare`)
    X : ndarray of shape (n, p), or a `stream.StreamData` (data read in blocks; see `prepare`)
    X_val : ndarray of shape (m, p), optional
        For early stopping and best-checkpoint selection; without it the training loss is used.
    run_dir : Path, optional
        Where to write config, checkpoints and metrics (rank 0 only). None keeps everything in memory.
    resume : bool
        Continue from the newest readable checkpoint in `run_dir`.
    progress : bool, optional
        Show a progress bar; default: when stderr is a terminal.
    on_epoch : callable, optional
        Called with each epoch's metrics record (rank 0 only); with ``on_epoch_model`` also with the
        model module, for loggers that draw reconstructions (`vaelens.tracking`).
    handle_signals : bool
        Save a checkpoint and return on SIGINT/SIGTERM instead of dying.
    checkpoint_interval_s : float
        Write a checkpoint at the end of an epoch once this many seconds have passed since the
        last one (0: every epoch), and always after the last epoch. Fsyncs are not free on small data.
    """
    t = cfg.train
    run = _set_up(cfg, X, X_val, run_dir, handle_signals)
    state, history = _start(run, run_dir, resume)
    run.model = _distributed(run)  # after restoring, as DDP starts every rank from rank 0's weights
    bar = _progress_bar(progress, run, state)
    stopped_early, interrupted, last_save = False, None, time.monotonic()
    X_epoch = None  # the dynamic binarization is drawn into the same buffer every epoch
    last = None  # (epoch, step, terms) of the last completed step, to name the step that made weights non-finite
    with run.stopper or contextlib.nullcontext(), flush_denormals():
        while state.epoch < t.epochs:
            epoch, t0 = state.epoch, time.perf_counter()  # the epoch's time includes its shuffle and binarization
            # shuffle and binarize (and seed the epoch's noise, unless resuming within it)
            batches, n_steps, X_epoch = _epoch_batches(run, epoch, state.step, X_epoch)
            # steps, from where an interrupted epoch stopped
            run.module.train()
            beta = t.beta * min(1.0, (epoch + 1) / t.warmup_epochs) if t.warmup_epochs else t.beta
            sums, kl_dim_sum = _epoch_sums(run, state)
            with contextlib.closing(batches):  # a streamed epoch's reader thread ends here, however the steps end
                interrupted, step, last = _train_steps(run, state, batches, n_steps, beta, sums, kl_dim_sum, last)
            if interrupted:  # a signal mid-epoch
                _save_mid_epoch(run, state, step, sums, kl_dim_sum, last)
                break
            # reduce over ranks: the epoch's record
            record = _end_epoch(run, state, epoch, sums, kl_dim_sum, beta, t0, last)
            # validate
            record.update(_validate(run))
            monitor = record.get("val_loss", record["train_loss"])
            history.append(record)
            # schedule
            _schedule(run.sched, monitor)
            # keep best
            _keep_best(run, state, monitor)
            state.epoch += 1
            # log and save: always at the end, else once checkpoint_interval_s has passed
            stopped_early = t.patience is not None and state.bad_epochs >= t.patience
            finishing = state.epoch >= t.epochs or stopped_early or _signalled(run) is not None
            if run.out is not None:
                ck.append_metrics(run.out, record)
            saved = run.out is not None and (finishing or time.monotonic() - last_save >= checkpoint_interval_s)
            if saved:
                _save(run, state)
                last_save = time.monotonic()
            _show(bar, record)
            if on_epoch is not None and run.info.is_main:
                on_epoch(record, run.module) if on_epoch_model else on_epoch(record)
            # stop?
            if stopped_early or (interrupted := _signalled(run)):
                if interrupted and not saved and run.out is not None:  # the signal came after the save decision
                    _save(run, state)
                break
    if bar is not None:
        bar.close()
    return _finish(run, state, history, stopped_early, interrupted, run_dir)


def _set_up(cfg: RunConfig, X, X_val: Optional[np.ndarray], run_dir: Optional[Path],
            handle_signals: bool) -> _Run:
    """Device and ranks, the model (its initial weights a function of the seed alone), optimizer,
    schedule, and this rank's shard of the data on the device."""
    t = cfg.train
    device = resolve_device(t.device)
    info = dist.setup(device)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    torch.manual_seed(t.seed)
    module = VAEModule(cfg.model)
    # the VampPrior's pseudo-inputs at training rows (streamed: among the first K of the seeded order); a resume
    # loads them
    streamed = isinstance(X, stream.StreamData)
    module.init_prior(X.head(cfg.model.components) if streamed and cfg.model.prior == "vamp" else X, t.seed)
    module = module.to(device)
    params = list(module.parameters())
    opt = build_optimizer(cfg, params, device)
    # each rank trains on its own shard; shards are equal so every rank runs the same number of steps
    n_rows = X.n_train if streamed else len(X)
    n_shard = n_rows // info.world_size
    if n_shard < 1:
        raise ConfigError(f"{n_rows} training samples cannot be shared among {info.world_size} processes")
    if streamed:
        X.epoch_windows(0, info.rank, info.world_size)  # enough blocks for every process, or say so now
    local_bs = max(1, t.batch_size // info.world_size)
    return _Run(cfg=cfg, device=device, info=info, module=module, model=module, params=params, opt=opt,
                sched=build_scheduler(cfg, opt), stream=X if streamed else None,
                X=None if streamed else torch.as_tensor(np.ascontiguousarray(
                    X[np.arange(info.rank, n_shard * info.world_size, info.world_size)]), dtype=torch.float32,
                    device=device),
                X_val=None if X_val is None else torch.as_tensor(_val_draws(X_val), dtype=torch.float32, device=device),
                batch_size=local_bs, steps_per_epoch=max(1, math.ceil(n_shard / local_bs)),
                out=Path(run_dir) if run_dir is not None and info.is_main else None,
                stopper=SignalStop() if handle_signals else None,
                autocast=bf16_autocast(device) if t.bf16 else contextlib.nullcontext())


def _val_draws(X_val: np.ndarray) -> np.ndarray:
    """A small validation set's rows repeated up to VAL_ROWS, so each is scored with several draws of z: on a table of
    a hundred rows one draw's noise exceeds the epochs' differences and picks the best epoch (benchmarks/tables.py)."""
    return np.repeat(X_val, max(1, -(-VAL_ROWS // len(X_val))), axis=0) if len(X_val) else X_val


def _start(run: _Run, run_dir: Optional[Path], resume: bool):
    """A fresh TrainState (and run directory), or the one the newest usable checkpoint restores, with the
    metric records up to it: (state, history)."""
    if not resume:
        if run.out is not None:
            run.out.mkdir(parents=True, exist_ok=True)
            ck.save_config(run.out, run.cfg)
        return TrainState(best=_copy_weights(run.module)), []
    if run_dir is None:
        raise ConfigError("resume needs a run directory")
    state, rng = ck.load_train_state(run_dir, run.module, run.opt, run.sched, rank=run.info.rank,
                                     quarantine_damaged=run.out is not None)
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    state.best = {k: v.to(run.device) for k, v in state.best.items()}
    history = [r for r in ck.read_metrics(run_dir) if r.get("epoch", 0) <= state.epoch]
    if run.out is not None:
        # metric lines are numbered by completed epochs; later ones were written after this checkpoint
        ck.truncate_metrics(run.out, state.epoch)
    return state, history


def _distributed(run: _Run) -> torch.nn.Module:
    """The module wrapped for DistributedDataParallel under torchrun, else the module itself."""
    if not run.info.distributed:
        return run.module
    return DistributedDataParallel(run.module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _copy_weights(module: VAEModule) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _epoch_batches(run: _Run, epoch: int, start: int, X_epoch: Optional[torch.Tensor]):
    """(the epoch's batches from step `start` on, its number of steps, the binarization buffer to reuse).

    The batches follow the epoch's permutation of the shard (in memory) or its block order (streamed), and
    its samples, functions of (seed, epoch, rank). Starting at step 0 also starts the epoch's noise stream
    there (a resumed mid-epoch run restores its generators instead).
    """
    seed = _epoch_seed(run.cfg.train.seed, epoch, run.info.rank)
    dynamic = run.cfg.data.binarize == "dynamic"
    if run.stream is not None:
        info, bs = run.info, run.batch_size
        n_steps = run.stream.steps(epoch, info.rank, info.world_size, bs)
        batches = run.stream.batches(epoch, info.rank, info.world_size, bs, start, run.device,
                                     dyn_seed=seed + 2 if dynamic else None)
    else:
        perm = torch.randperm(len(run.X), generator=torch.Generator(device="cpu").manual_seed(seed)).to(run.device)
        # dynamic binarization: a fresh Bernoulli draw of every pixel each epoch (the standard MNIST protocol)
        X_epoch = binarize_dynamic(run.X, seed + 2, out=X_epoch) if dynamic else run.X
        n_steps, bs = run.steps_per_epoch, run.batch_size
        batches = (X_epoch[perm[step * bs:(step + 1) * bs]] for step in range(start, n_steps))
    if start == 0:
        torch.manual_seed(seed + 1)
    return batches, n_steps, X_epoch


def _epoch_sums(run: _Run, state: TrainState):
    """The float64 sums (loss * n, rec, KL, n) and per-dimension KL sums the epoch's steps add to: zeros,
    or those of the steps an interrupted epoch had done (rank 0 carries every rank's)."""
    sums, kl_dim_sum = (state.sums, state.kl_dim_sum) if state.step else (None, None)
    sums = torch.zeros(4, dtype=torch.float64, device=run.device) if sums is None else sums.to(run.device)
    kl_dim_sum = (torch.zeros(run.cfg.model.latent_dim, dtype=torch.float64, device=run.device)
                  if kl_dim_sum is None else kl_dim_sum.to(run.device))
    return sums, kl_dim_sum


def _train_steps(run: _Run, state: TrainState, batches, n_steps: int, beta: float,
                 sums: torch.Tensor, kl_dim_sum: torch.Tensor, last):
    """Epoch `state.epoch`'s optimizer steps from step `state.step` (`batches`: one per step), adding to `sums`
    and `kl_dim_sum` in place.

    Returns (the signal that stopped the epoch or None, the step to continue from, `last`: (epoch, step,
    terms) of the last completed step). Without clipping the gradient is not checked every step (a norm
    over all of it costs a few percent of a step on a CPU): a non-finite gradient makes the weights
    non-finite, so the next step's loss, the end of the epoch and every save check for that and name the
    step that did it.
    """
    t, model, params, opt, autocast, stopper = run.cfg.train, run.model, run.params, run.opt, run.autocast, run.stopper
    epoch = state.epoch
    for step, xb in zip(range(state.step, n_steps), batches):
        with autocast:
            loss, terms = model(xb, objective=t.objective, iw_samples=t.iw_samples, beta=beta,
                                free_bits=t.free_bits, dreg=t.dreg)
        if not torch.isfinite(loss):
            # a non-finite gradient shows here one step late, as weights the optimizer made non-finite
            check_weights(params, last, run.out)
            raise TrainingDiverged(diverged_message(epoch, step, terms, "loss", run.out))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            # one norm serves the finiteness check and the clipping (no second pass over the gradients)
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not torch.isfinite(gnorm):
                raise TrainingDiverged(diverged_message(epoch, step, terms, "gradient", run.out))
            torch.nn.utils.clip_grads_with_norm_(params, t.grad_clip, gnorm)
        opt.step()
        last = (epoch, step, terms)
        with torch.no_grad():
            sums[:3] += torch.stack([loss.detach() * xb.shape[0], terms.rec.detach().sum(), terms.kl.detach().sum()])
            sums[3] += xb.shape[0]
            kl_dim_sum += terms.kl_dim.detach().sum(0)
        if stopper is not None and step + 1 < n_steps and (stop := dist.agreed_signal(stopper.name, run.device)):
            return stop, step + 1, last
    return None, n_steps, last


def _end_epoch(run: _Run, state: TrainState, epoch: int, sums: torch.Tensor, kl_dim_sum: torch.Tensor,
               beta: float, t0: float, last) -> dict:
    """The finished epoch's metrics record: its mean loss terms over every rank's samples. The state no
    longer holds an interrupted epoch's place or sums."""
    check_weights(run.params, last, run.out)  # the epoch's last step, before anything is kept or saved
    state.step, state.sums, state.kl_dim_sum = 0, None, None
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(kl_dim_sum)
    n_seen = float(sums[3])
    return {
        "epoch": epoch + 1,
        "train_loss": float(sums[0] / n_seen),
        "train_rec": float(sums[1] / n_seen),
        "train_kl": float(sums[2] / n_seen),
        "kl_per_dim": [float(v) for v in (kl_dim_sum / n_seen)],
        "beta": beta,
        "lr": run.opt.param_groups[0]["lr"],
        "seconds": time.perf_counter() - t0,
        "samples_per_s": n_seen / max(time.perf_counter() - t0, 1e-9),
    }


def _validate(run: _Run) -> dict:
    """Validation loss and terms, with noise seeded apart from the training stream ({} without validation data)."""
    t = run.cfg.train
    bs = max(t.batch_size, 1024)
    if run.stream is not None and run.stream.stream_val:  # held-out blocks too large to keep: read again
        vt = validation_terms_of(run.module, run.stream.val_batches(bs, run.device), run.device,
                                 seed=t.seed + _VAL_SEED_OFFSET)
        return dict(val_loss=-vt["elbo"], val_rec=vt["rec"], val_kl=vt["kl"])
    if run.X_val is None:
        return {}
    vt = validation_terms(run.module, run.X_val, seed=t.seed + _VAL_SEED_OFFSET, batch_size=bs)
    return dict(val_loss=-vt["elbo"], val_rec=vt["rec"], val_kl=vt["kl"])


def _has_val(run: _Run) -> bool:
    return run.X_val is not None or (run.stream is not None and run.stream.stream_val)


def _schedule(sched, monitor: float) -> None:
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(monitor)
    elif sched is not None:
        sched.step()


def _keep_best(run: _Run, state: TrainState, monitor: float) -> None:
    """Keep the weights of the epoch just finished if `monitor` improved on the best so far; count it if not."""
    best = state.best_val
    if monitor < best - 1e-6 * abs(best if math.isfinite(best) else 0):
        state.best_val, state.best_epoch, state.bad_epochs = monitor, state.epoch + 1, 0
        state.best = _copy_weights(run.module)
    else:
        state.bad_epochs += 1


def _signalled(run: _Run) -> Optional[str]:
    """The signal every rank agrees stops the run (a collective), or None; None when signals are left alone."""
    return None if run.stopper is None else dist.agreed_signal(run.stopper.name, run.device)


def _progress_bar(progress: Optional[bool], run: _Run, state: TrainState):
    """A tqdm bar over epochs on rank 0 (by default when stderr is a terminal), or None."""
    if not (progress if progress is not None else sys.stderr.isatty()) or not run.info.is_main:
        return None
    return tqdm(total=run.cfg.train.epochs, initial=state.epoch, desc="train", unit="epoch", dynamic_ncols=True)


def _show(bar, record: dict) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", rec=f"{-record['train_rec']:.3f}",
                        kl=f"{record['train_kl']:.3f}",
                        **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))


def _finish(run: _Run, state: TrainState, history: list, stopped_early: bool, interrupted: Optional[str],
            run_dir: Optional[Path]) -> TrainResult:
    """Load the best weights into the module and, unless a signal stopped the run, write the summary."""
    run.module.load_state_dict(state.best)
    run.module.eval()
    last = history[-1] if history else {}
    summary = {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_loss" if _has_val(run) else "best_train_loss": state.best_val,
        "final": {k: v for k, v in last.items() if k != "kl_per_dim"},
        "stopped_early": stopped_early,
        "interrupted": interrupted,
        "world_size": run.info.world_size,
        "device": str(run.device),
    }
    if run.out is not None and interrupted is None:
        if not (run.out / ck.WEIGHTS).exists():
            ck.save_run_weights(run.out, state.best)
        ck.write_summary(run.out, summary)
    dist.barrier()
    return TrainResult(module=run.module, config=run.cfg, history=history, best_epoch=state.best_epoch,
                       best_val_loss=state.best_val, epochs_run=state.epoch, stopped_early=stopped_early,
                       interrupted=interrupted, run_dir=None if run_dir is None else Path(run_dir),
                       summary=summary)


def _save_mid_epoch(run: _Run, state: TrainState, step: int, sums: torch.Tensor, kl_dim_sum: torch.Tensor,
                    last) -> None:
    """On a signal mid-epoch: a checkpoint of where every rank stands, `step` steps into the epoch.

    Every rank calls this (gathering the generators and summing the partial sums are collectives);
    rank 0 writes, with the sums of every rank, as it alone saves them.
    """
    check_weights(run.params, last, run.out)
    rngs = dist.gather_rng_states(run.device)
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(kl_dim_sum)
    if run.out is not None:
        state.step, state.sums, state.kl_dim_sum = step, sums.cpu(), kl_dim_sum.cpu()
        _save(run, state, rngs)


def _save(run: _Run, state: TrainState, rngs: Optional[dict] = None) -> None:
    """Write a checkpoint (then the run's best weights); on a failed write, say what is still usable."""
    try:
        ck.save_train_state(run.out, run.module, run.opt, run.sched, state, rngs)
        ck.save_run_weights(run.out, state.best)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Training stopped; {last_checkpoint(run.out)}") from None
