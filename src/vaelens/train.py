"""The training loop.

The whole training set lives in one tensor on the training device; each epoch draws a
seeded permutation and slices batches from it, so there is no DataLoader or per-sample
Python work. Randomness is a function of (seed, epoch, rank): resuming from a checkpoint,
or running under torchrun, reproduces the same shuffles and binarizations.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ck
from . import data as data_mod
from . import dist
from .config import RunConfig
from .data import Dataset
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .model import VAEModule, seeded

_VAL_SEED_OFFSET = 7_919  # validation noise is seeded apart from the training stream


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device 'cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def bf16_autocast(device: torch.device):
    """bf16 autocast for the training step on `device` (CUDA, or a CPU).

    On a CPU without native bf16 arithmetic (AVX-512 BF16 or AMX) bf16 is emulated and slower than
    float32; it still trains correctly, so this warns instead of refusing.
    """
    if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported():
        import warnings

        warnings.warn("train.bf16: this CPU has no native bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 "
                      "autocast is emulated and slower than float32; drop --bf16 on this machine")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare(cfg: RunConfig, train: Dataset, val: Optional[Dataset] = None):
    """Fill the config from the data (input size, image shape, standardization) and split.

    Returns (cfg, X_train, X_val) with arrays already transformed and, for static
    binarization, binarized. Validates the data against the likelihood.
    """
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
        model = _replace(model, input_dim=int(X.shape[1]), image_shape=train.image_shape)
    cfg = cfg.replace(model=model, transform=transform).validate()
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


def _replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63 - 1)


def binarize_dynamic(X: torch.Tensor, seed: int, parts: int = 0, out: Optional[torch.Tensor] = None,
                     chunk_rows: int = 2048) -> torch.Tensor:
    """x ~ Bernoulli(X) elementwise, drawn in `parts` row blocks on as many threads.

    torch's CPU generator fills a tensor on one thread (about 2-8 ns a number: 0.1-0.4 s for MNIST);
    seeded blocks drawn in parallel keep the result a function of `seed`. Each block draws its
    uniforms `chunk_rows` rows at a time into one small buffer and compares them straight into
    `out` (given: reused, e.g. every epoch): a fresh 188 MB result and its 188 MB of uniforms cost
    more in page faults than the draw itself. A block's numbers are the same however it is chunked.
    """
    out = torch.empty_like(X) if out is None else out
    if X.device.type != "cpu":
        g = torch.Generator(device=X.device).manual_seed(seed)
        return torch.lt(torch.rand(X.shape, generator=g, device=X.device), X, out=out)
    parts = parts or max(1, min(torch.get_num_threads(), len(X) // 4096, 8))
    blocks = [(i * len(X) // parts, (i + 1) * len(X) // parts) for i in range(parts)]

    def draw_into(b):
        lo, hi = blocks[b]
        g = torch.Generator().manual_seed(seed * 16 + b)
        u = torch.empty((min(chunk_rows, hi - lo), *X.shape[1:]))
        for a in range(lo, hi, chunk_rows):
            n = min(chunk_rows, hi - a)
            torch.rand((n, *X.shape[1:]), generator=g, out=u[:n])
            torch.lt(u[:n], X[a:a + n], out=out[a:a + n])

    if parts == 1:
        draw_into(0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(draw_into, range(parts)))
    return out


def build_optimizer(cfg: RunConfig, params, device: torch.device):
    t = cfg.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    kw = dict(lr=t.lr, weight_decay=t.weight_decay)
    try:
        # The fused kernel updates all parameters in one pass: several times faster per step.
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)


def build_scheduler(cfg: RunConfig, opt):
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t.lr_gamma)
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=t.lr_gamma if t.lr_gamma < 1 else 0.5,
                                                          patience=max(1, (t.patience or 10) // 3))
    return None


class _SignalStop:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps, so it can save first."""

    def __init__(self):
        self.name: Optional[str] = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None:  # a second signal: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stop_signal(stopper: "_SignalStop", device: torch.device) -> Optional[str]:
    """The name of the signal that asks the run to stop, the same on every rank; None to go on.

    Under torchrun each rank sees its signal between different steps (or only one rank gets it); a
    rank that stopped alone would leave the others waiting in the next gradient all-reduce. So the
    ranks agree, at every check, on the highest signal number any of them has seen.
    """
    num = 0 if stopper.name is None else int(signal.Signals[stopper.name])
    num = dist.all_reduce_max_int(num, device)
    return None if num == 0 else signal.Signals(num).name


def fit(cfg: RunConfig, X: np.ndarray, X_val: Optional[np.ndarray] = None, *, run_dir: Optional[Path] = None,
        resume: bool = False, progress: Optional[bool] = None,
        on_epoch: Optional[Callable[[dict], None]] = None, handle_signals: bool = False,
        checkpoint_interval_s: float = 10.0) -> TrainResult:
    """Train a VAE on prepared arrays (see `prepare`).

    Parameters
    ----------
    cfg : RunConfig
        With model.input_dim set.
    X : ndarray of shape (n, p)
    X_val : ndarray of shape (m, p), optional
        For early stopping and best-checkpoint selection; without it the training loss is used.
    run_dir : Path, optional
        Where to write config, checkpoints and metrics (rank 0 only). None keeps everything in memory.
    resume : bool
        Continue from the newest readable checkpoint in `run_dir`.
    progress : bool, optional
        Show a progress bar; default: when stderr is a terminal.
    on_epoch : callable, optional
        Called with each epoch's metrics record.
    handle_signals : bool
        Save a checkpoint and return on SIGINT/SIGTERM instead of dying.
    checkpoint_interval_s : float
        Write a checkpoint at the end of an epoch once this many seconds have passed since the
        last one (0: every epoch), and always after the last epoch. Fsyncs are not free on small data.
    """
    t = cfg.train
    device = resolve_device(t.device)
    info = dist.setup(device)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    writes = run_dir is not None and info.is_main
    if run_dir is not None:
        run_dir = Path(run_dir)

    torch.manual_seed(t.seed)  # the initial weights depend on the seed alone
    module = VAEModule(cfg.model).to(device)
    params = list(module.parameters())
    opt = build_optimizer(cfg, params, device)
    sched = build_scheduler(cfg, opt)

    # each rank trains on its own shard; shards are equal so every rank runs the same number of steps
    n_all = len(X)
    n_shard = n_all // info.world_size
    if n_shard < 1:
        raise ConfigError(f"{n_all} training samples cannot be shared among {info.world_size} processes")
    shard = np.arange(info.rank, n_shard * info.world_size, info.world_size)
    X_t = torch.as_tensor(np.ascontiguousarray(X[shard]), dtype=torch.float32, device=device)
    Xv_t = None if X_val is None else torch.as_tensor(X_val, dtype=torch.float32, device=device)
    local_bs = max(1, t.batch_size // info.world_size)
    steps_per_epoch = max(1, math.ceil(n_shard / local_bs))

    state = dict(epoch=0, step=0, best_val=math.inf, best_epoch=0, bad_epochs=0, sums=None, kl_dim_sum=None)
    history: list = []
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs a run directory")
        state, tensors, best = _restore(run_dir, module, opt, sched, device, quarantine=writes)
        # each rank its own generators, where the checkpoint has them (mid-epoch ones do)
        torch.set_rng_state(tensors.get(f"rng.torch.rank{info.rank}", tensors["rng.torch"]))
        if device.type == "cuda" and f"rng.cuda.rank{info.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{info.rank}"], device)
        if not info.is_main:  # a mid-epoch checkpoint's partial sums are every rank's: rank 0 carries them
            state.update(sums=None, kl_dim_sum=None)
        history = ck.read_metrics(run_dir)
        if writes:
            # metric lines are numbered by completed epochs; later ones were written after this checkpoint
            ck.truncate_metrics(run_dir, state["epoch"])
        history = [r for r in history if r.get("epoch", 0) <= state["epoch"]]
        best_state = {k: v.clone() for k, v in module.state_dict().items()}
        if best is not None:
            best_state = {k: v.to(device) for k, v in best.items()}
        elif (run_dir / ck.WEIGHTS).exists():  # checkpoints written before best.safetensors existed
            try:
                best_state = ck.load_tensors(run_dir / ck.WEIGHTS)
            except CheckpointError:
                pass
    elif writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        ck.save_config(run_dir, cfg)

    ddp_module = module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    use_bar = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if use_bar and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.epochs, initial=state["epoch"], desc="train", unit="epoch", dynamic_ncols=True)

    autocast = bf16_autocast(device) if t.bf16 else _nullcontext()
    stopped_early = False
    interrupted = None
    stopper = _SignalStop() if handle_signals else _nullcontext()
    epoch = state["epoch"]
    X_epoch = None  # the dynamic binarization is drawn into the same buffer every epoch
    last_save = time.monotonic()
    ck_dir = run_dir if writes else None
    # Without clipping the gradient is not checked every step (a norm over all of it costs a few percent
    # of a step on a CPU): a non-finite gradient makes the weights non-finite, so the next step's loss,
    # the end of the epoch and every save check for that and name the step that did it.
    last = None  # (epoch, step, terms) of the last completed step
    with stopper, _FlushDenormals():
        while epoch < t.epochs:
            t0 = time.perf_counter()  # the epoch's time includes drawing its permutation and binarization
            module.train()
            beta = t.beta * min(1.0, (epoch + 1) / t.warmup_epochs) if t.warmup_epochs else t.beta
            g = torch.Generator(device="cpu").manual_seed(_epoch_seed(t.seed, epoch, info.rank))
            perm = torch.randperm(n_shard, generator=g).to(device)
            if cfg.data.binarize == "dynamic":
                # a fresh Bernoulli draw of every pixel each epoch (the standard MNIST protocol)
                X_epoch = binarize_dynamic(X_t, _epoch_seed(t.seed, epoch, info.rank) + 2, out=X_epoch)
            else:
                X_epoch = X_t
            start_step = state["step"]
            if start_step == 0:
                torch.manual_seed(_epoch_seed(t.seed, epoch, info.rank) + 1)
            sums = state["sums"] if start_step else None
            sums = torch.zeros(4, dtype=torch.float64, device=device) if sums is None else sums.to(device)
            kl_dim_sum = state["kl_dim_sum"] if start_step else None
            kl_dim_sum = (torch.zeros(cfg.model.latent_dim, dtype=torch.float64, device=device) if kl_dim_sum is None
                          else kl_dim_sum.to(device))
            for step in range(start_step, steps_per_epoch):
                idx = perm[step * local_bs:(step + 1) * local_bs]
                xb = X_epoch[idx]
                with autocast:
                    loss, terms = ddp_module(xb, objective=t.objective, iw_samples=t.iw_samples, beta=beta,
                                             free_bits=t.free_bits, dreg=t.dreg)
                if not torch.isfinite(loss):
                    # a non-finite gradient shows here one step late, as weights the optimizer made non-finite
                    _check_weights(params, last, ck_dir)
                    raise TrainingDiverged(_diverged_message(epoch, step, terms, "loss", ck_dir))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    # one norm serves the finiteness check and the clipping (no second pass over the gradients)
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    if not torch.isfinite(gnorm):
                        raise TrainingDiverged(_diverged_message(epoch, step, terms, "gradient", ck_dir))
                    torch.nn.utils.clip_grads_with_norm_(params, t.grad_clip, gnorm)
                opt.step()
                last = (epoch, step, terms)
                with torch.no_grad():
                    sums[:3] += torch.stack([loss.detach() * xb.shape[0], terms.rec.detach().sum(),
                                             terms.kl.detach().sum()])
                    sums[3] += xb.shape[0]
                    kl_dim_sum += terms.kl_dim.detach().sum(0)
                if handle_signals and step + 1 < steps_per_epoch and (stop := _stop_signal(stopper, device)):
                    interrupted = stop
                    _check_weights(params, last, ck_dir)
                    rngs = _rng_tensors(device)  # on every rank: it is a collective
                    # the epoch's partial sums over every rank, as rank 0 alone saves them
                    dist.all_reduce_sum(sums)
                    dist.all_reduce_sum(kl_dim_sum)
                    if writes:
                        state.update(epoch=epoch, step=step + 1, sums=sums.cpu(), kl_dim_sum=kl_dim_sum.cpu())
                        _save(run_dir, module, opt, sched, state, best_state, rngs)
                    break
            if interrupted:
                break
            _check_weights(params, last, ck_dir)  # the epoch's last step, before anything is kept or saved
            state.update(step=0, sums=None, kl_dim_sum=None)
            dist.all_reduce_sum(sums)
            dist.all_reduce_sum(kl_dim_sum)
            n_seen = float(sums[3])
            record = {
                "epoch": epoch + 1,
                "train_loss": float(sums[0] / n_seen),
                "train_rec": float(sums[1] / n_seen),
                "train_kl": float(sums[2] / n_seen),
                "kl_per_dim": [float(v) for v in (kl_dim_sum / n_seen)],
                "beta": beta,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
                "samples_per_s": n_seen / max(time.perf_counter() - t0, 1e-9),
            }
            if Xv_t is not None:
                vt = validation_terms(module, Xv_t, seed=t.seed + _VAL_SEED_OFFSET, batch_size=max(t.batch_size, 1024))
                record.update(val_loss=-vt["elbo"], val_rec=vt["rec"], val_kl=vt["kl"])
            monitor = record.get("val_loss", record["train_loss"])
            history.append(record)
            if sched is not None:
                sched.step(monitor) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
            improved = monitor < state["best_val"] - 1e-6 * abs(state["best_val"] if math.isfinite(state["best_val"]) else 0)
            if improved:
                state.update(best_val=monitor, best_epoch=epoch + 1, bad_epochs=0)
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                state["bad_epochs"] += 1
            epoch += 1
            state["epoch"] = epoch
            finishing = (epoch >= t.epochs or (t.patience is not None and state["bad_epochs"] >= t.patience)
                         or (handle_signals and _stop_signal(stopper, device) is not None))
            saved = False
            if writes:
                ck.append_metrics(run_dir, record)
                if finishing or time.monotonic() - last_save >= checkpoint_interval_s:
                    _save(run_dir, module, opt, sched, state, best_state)
                    last_save, saved = time.monotonic(), True
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", rec=f"{-record['train_rec']:.3f}",
                                kl=f"{record['train_kl']:.3f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            if on_epoch is not None and info.is_main:
                on_epoch(record)
            if t.patience is not None and state["bad_epochs"] >= t.patience:
                stopped_early = True
                break
            if handle_signals and (stop := _stop_signal(stopper, device)):
                interrupted = stop
                if writes and not saved:  # the signal came after this epoch's save decision
                    _save(run_dir, module, opt, sched, state, best_state)
                break
    if bar is not None:
        bar.close()

    module.load_state_dict(best_state)
    module.eval()
    last = history[-1] if history else {}
    summary = {
        "epochs_run": epoch,
        "best_epoch": state["best_epoch"],
        "best_val_loss" if X_val is not None else "best_train_loss": state["best_val"],
        "final": {k: v for k, v in last.items() if k != "kl_per_dim"},
        "stopped_early": stopped_early,
        "interrupted": interrupted,
        "world_size": info.world_size,
        "device": str(device),
    }
    if writes and interrupted is None:
        if not (run_dir / ck.WEIGHTS).exists():
            ck.save_run_weights(run_dir, best_state)
        ck.write_summary(run_dir, summary)
    dist.barrier()
    return TrainResult(module=module, config=cfg, history=history, best_epoch=state["best_epoch"],
                       best_val_loss=state["best_val"], epochs_run=epoch, stopped_early=stopped_early,
                       interrupted=interrupted, run_dir=run_dir, summary=summary)


def _rng_tensors(device: torch.device) -> dict:
    """Every rank's generator states (CPU, and CUDA on a GPU) as checkpoint tensors, gathered from all ranks.

    A step's noise comes from the device's generator and differs between ranks, so a mid-epoch
    checkpoint keeps each rank's: the resumed ranks then draw what the uninterrupted ones would have.
    Rank 0's CPU state is the checkpoint's ``rng.torch``; the others are ``rng.<kind>.rank<r>``.
    """
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, t in mine.items():
        for r, state in enumerate(dist.all_gather_tensor(t, device)):
            if (r, kind) != (0, "torch"):
                out[f"rng.{kind}.rank{r}"] = state
    return out


def _save(run_dir, module, opt, sched, state, best_state, rngs: Optional[dict] = None):
    """Write a checkpoint (then the run's best weights); on a failed write, say what is still usable."""
    trainer = {k: v for k, v in state.items() if k not in ("sums", "kl_dim_sum")}
    # float64 sums round-trip exactly through JSON (repr), so a resumed epoch logs the same figures
    trainer["sums"] = None if state.get("sums") is None else [float(v) for v in state["sums"]]
    extra = dict(rngs or {})
    if state.get("kl_dim_sum") is not None:
        extra["sums.kl_dim"] = state["kl_dim_sum"]
    try:
        ck.save_checkpoint(run_dir, module, opt, sched, trainer, torch.get_rng_state(), best=best_state,
                           extra_tensors=extra)
        ck.save_run_weights(run_dir, best_state)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Training stopped; {_last_checkpoint(run_dir)}") from None


def _last_checkpoint(run_dir: Path) -> str:
    """Where a stopped run can be continued from, in words."""
    found = ck.checkpoint_candidates(run_dir) if run_dir is not None else []
    if not found:
        return "no checkpoint was written yet"
    return f"the last complete checkpoint is {found[0]}; continue with: vaelens train --resume {run_dir}"


def _restore(run_dir: Path, module, opt, sched, device, quarantine: bool = False):
    """Load the newest checkpoint that reads cleanly; fall back to older ones, naming what failed.

    Returns (state, the trainer tensors (the RNG states among them), best weights or None). With
    `quarantine`, damaged newer checkpoints are renamed damaged-<name> so they can never shadow the
    ones written from here on.
    """
    problems, damaged = [], []
    for folder in ck.checkpoint_candidates(run_dir):
        try:
            weights, opt_state, meta, tensors = ck.load_checkpoint(folder)
            module.load_state_dict(weights)
            opt.load_state_dict(opt_state)
            if sched is not None and meta.get("scheduler") is not None:
                sched.load_state_dict(meta["scheduler"])
            sums = meta.get("sums")
            state = dict(epoch=int(meta["epoch"]), step=int(meta["step"]), best_val=float(meta["best_val"]),
                         best_epoch=int(meta["best_epoch"]), bad_epochs=int(meta["bad_epochs"]),
                         sums=None if sums is None else torch.tensor(sums, dtype=torch.float64),
                         kl_dim_sum=tensors.get("sums.kl_dim"))
        except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as e:
            problems.append(f"{folder.name}: {' '.join(str(e).split())}")
            damaged.append(folder)
            continue
        if problems:
            import warnings

            if quarantine:
                for bad in damaged:
                    ck.quarantine(bad)
            warnings.warn("skipped damaged checkpoint(s): " + "; ".join(problems) + f"; resuming from {folder.name}")
        return state, tensors, meta.get("best")
    detail = ("; ".join(problems)) if problems else "there are none"
    raise CheckpointError(f"{run_dir}: no usable checkpoint to resume from ({detail})")


def _check_weights(params, last, run_dir: Optional[Path]) -> None:
    """Raise TrainingDiverged, naming the gradient of step `last`, if a weight is no longer finite."""
    # the largest magnitude, not the 2-norm: squares of huge but finite weights would overflow
    if last is not None and not torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)):
        raise TrainingDiverged(_diverged_message(*last, "gradient", run_dir))


def _diverged_message(epoch: int, step: int, terms, what: str, run_dir: Optional[Path] = None) -> str:
    bad = []
    for name, v in (("reconstruction", terms.rec), ("KL", terms.kl)):
        if not torch.isfinite(v).all():
            bad.append(name)
    term = f" ({' and '.join(bad)} term)" if bad else (" (both loss terms were finite)" if what == "gradient" else "")
    found = ck.checkpoint_candidates(run_dir) if run_dir is not None else []
    kept = (f" The last good checkpoint, {found[0]}, is kept." if found else
            " No checkpoint had been written yet." if run_dir is not None else "")
    return (f"training diverged at epoch {epoch + 1}, step {step + 1}: the {what} became non-finite"
            f"{term}.{kept} Try a lower learning rate (--lr), gradient "
            f"clipping (--grad-clip 1.0), a larger sigma floor (--sigma-floor), or standardizing the data "
            f"(--standardize).")


@torch.inference_mode()
def validation_terms(module: VAEModule, X: torch.Tensor, seed: int, batch_size: int = 1024) -> dict:
    """Mean ELBO terms on X with noise seeded apart from the training stream (eval mode)."""
    was_training = module.training
    module.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=X.device)
    with seeded(seed, X.device):
        for i in range(0, len(X), batch_size):
            tm = module.terms(X[i:i + batch_size])
            tot += torch.stack([tm.elbo.double().sum(), tm.rec.double().sum(), tm.kl.double().sum()])
    module.train(was_training)
    n = len(X)
    return {"elbo": float(tot[0] / n), "rec": float(tot[1] / n), "kl": float(tot[2] / n)}


class _FlushDenormals:
    """Flush denormals to zero while training (they slow the matmuls by 20-30% once weights get small).

    The flag is process-wide CPU state that numpy shares, so the caller's setting is restored on exit.
    """

    def __enter__(self):
        self._was = bool((torch.tensor(1e-39) * 1.0) == 0)  # 1e-39 is a float32 denormal
        torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        torch.set_flush_denormal(self._was)
        return False


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    name = None
