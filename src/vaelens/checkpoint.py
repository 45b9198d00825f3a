"""The run directory: configuration, weights, trainer state, metrics; atomic, checksummed writes.

Layout::

    RUN/config.json            RunConfig, versioned
    RUN/model.safetensors      best weights (lowest validation loss)
    RUN/metrics.jsonl          one JSON line per epoch
    RUN/summary.json           final figures
    RUN/checksums.json         SHA-256 of the files above
    RUN/checkpoints/ckpt-EEEEEE-SSSSSS/{model,best,trainer}.safetensors, trainer.json, checksums.json
    RUN/checkpoints/LATEST     name of the newest complete checkpoint

EEEEEE counts completed epochs and SSSSSS the steps done in the next one (0 at an epoch end).
A checkpoint holds a `TrainState` (trainer.json and, for its tensors, best.safetensors and
trainer.safetensors) beside the weights, the optimizer and scheduler state and the generators.

Weights and tensors go through safetensors, everything else through JSON, so loading a run
never unpickles anything. Every file is written to a temporary name, fsynced and renamed,
and a checkpoint folder becomes LATEST only once complete, so a crash at any moment leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import RunConfig
from .errors import CheckpointError, ConfigError, OutputError
from .io import atomic_write
from .safeio import (CONFIG_LIMIT, METRICS_LIMIT, SMALL_LIMIT, SUMMARY_LIMIT, open_regular, parse_json,
                     not_safetensors, read_bytes, read_json, safetensors_header)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKSUMS = "checksums.json"
CKPT_DIR = "checkpoints"
LATEST = "LATEST"
# A model of more parameters than this is refused before anything is built: 4 GB of float32 weights,
# far beyond a VAE on one machine's data, and the size a hostile config.json would claim.
MAX_PARAMETERS = 10 ** 9
# Any tensor file (optimizer state holds two tensors per weight, at most 8 bytes per value).
TENSORS_LIMIT = 3 * 8 * MAX_PARAMETERS
KEEP_CHECKPOINTS = 2  # the newest and one before it, to fall back on if the newest is damaged
BEST = "best.safetensors"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_META = "trainer.json"
CKPT_FILES = (WEIGHTS, BEST, TRAINER_TENSORS, TRAINER_META)


# --- atomic writes ----------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`io.atomic_write` for run files: a failed write is a `CheckpointError` (training stops and says
    which checkpoint is still usable)."""
    try:
        atomic_write(path, data)
    except OutputError as e:
        raise CheckpointError(str(e)) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    fd, _ = open_regular(path, TENSORS_LIMIT)  # a FIFO or /dev/zero listed in checksums.json is refused
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, names) -> None:
    sums = {n: sha256(folder / n) for n in sorted(names) if (folder / n).exists()}
    atomic_write_text(folder / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True) + "\n")


def _read_sums(folder: Path) -> Optional[dict]:
    cpath = Path(folder) / CHECKSUMS
    if not cpath.exists() and not cpath.is_symlink():
        return None
    sums = read_json(cpath, SMALL_LIMIT)
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"{cpath}: expected a JSON object of file name -> SHA-256")
    return sums


def write_tracked(folder: Path, name: str, write) -> None:
    """Rewrite a file listed in the folder's checksums.json, keeping the list true at every moment.

    The entry is dropped before `write()` and added back after it, so a crash in between leaves
    an unlisted (unverified) file rather than one that fails its checksum.
    """
    folder = Path(folder)
    sums = _read_sums(folder)
    if sums is None or name not in sums:
        write()
        if sums is not None:
            atomic_write_text(folder / CHECKSUMS, json.dumps(dict(sums, **{name: sha256(folder / name)}),
                                                             indent=1, sort_keys=True) + "\n")
        return
    rest = {k: v for k, v in sums.items() if k != name}
    atomic_write_text(folder / CHECKSUMS, json.dumps(rest, indent=1, sort_keys=True) + "\n")
    write()
    rest[name] = sha256(folder / name)
    atomic_write_text(folder / CHECKSUMS, json.dumps(rest, indent=1, sort_keys=True) + "\n")


def verify_checksums(folder: Path, names) -> None:
    """Raise `CheckpointError` naming the first listed file that is missing or altered."""
    folder = Path(folder)
    sums = _read_sums(folder)
    if sums is None:
        return  # runs written without checksums (or by hand) are still readable
    for n in names:
        p = folder / n
        if n in sums:
            if not p.exists():
                raise CheckpointError(f"{p}: missing (listed in {CHECKSUMS})")
            if sha256(p) != sums[n]:
                raise CheckpointError(f"{p}: contents do not match the checksum recorded when it was written "
                                      f"(truncated or altered)")


# --- tensors ----------------------------------------------------------------------------------

def save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(cpu, metadata=metadata))


def load_tensors(path: Path, limit: int = TENSORS_LIMIT) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: missing")
    data = read_bytes(path, limit)  # a regular file of bounded size: never a FIFO or /dev/zero
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)}); it may be truncated, "
                              f"altered or in another format (vaelens never unpickles weights)") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_state_into(module: torch.nn.Module, path: Path, limit: int = TENSORS_LIMIT) -> None:
    """Load weights from a safetensors file, naming missing and unexpected keys on mismatch."""
    state = load_tensors(path, limit)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not fit the model in config.json "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    module.load_state_dict(state)


# --- config -----------------------------------------------------------------------------------

def save_config(run_dir: Path, cfg: RunConfig) -> None:
    write_tracked(Path(run_dir), CONFIG, lambda: atomic_write_text(Path(run_dir) / CONFIG, cfg.to_json()))


def load_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a folder; a run is the folder `vaelens train` wrote")
    path = run_dir / CONFIG
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: missing; is {run_dir} a vaelens run directory?")
    d = read_json(path, CONFIG_LIMIT)  # strict: no NaN, no duplicate keys, bounded size and depth
    try:
        return RunConfig.from_dict(d, source="config")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


# --- trainer checkpoints ----------------------------------------------------------------------

def _optimizer_to_flat(opt_state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"state": {}, "param_groups": opt_state["param_groups"]}
    for pid, st in opt_state["state"].items():
        plain["state"][str(pid)] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v
            else:
                plain["state"][str(pid)][name] = v
    return tensors, plain


def _optimizer_from_flat(tensors: Dict[str, torch.Tensor], plain: dict) -> dict:
    state: Dict[int, dict] = {int(pid): dict(v) for pid, v in plain["state"].items()}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": plain["param_groups"]}


@dataclass
class TrainState:
    """Where a training run stands: what a checkpoint restores besides the weights, optimizer, schedule and
    random-number generators.

    A checkpoint is written at an epoch's end (`step` 0, no partial sums) or, on a signal, mid-epoch: then
    `step` steps of epoch `epoch` (counted from 0) are done and `sums`/`kl_dim_sum` hold their sums over
    every rank, so the resumed epoch reports the same means as an uninterrupted one. The epochs' records
    are not part of it: RUN/metrics.jsonl keeps them.
    """

    epoch: int = 0  # completed epochs
    step: int = 0  # steps done in the next epoch
    best_val: float = math.inf  # the lowest monitored loss so far (validation loss, else training loss)
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the monitored loss last improved (early stopping)
    sums: Optional[torch.Tensor] = None  # float64 (sum of loss * n, of rec, of KL, n) of the interrupted epoch
    kl_dim_sum: Optional[torch.Tensor] = None  # float64 KL summed per latent dimension, same epoch
    best: Optional[Dict[str, torch.Tensor]] = None  # the weights of best_epoch


def save_train_state(run_dir: Path, module: torch.nn.Module, optimizer, scheduler, state: TrainState,
                     rngs: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write a complete checkpoint folder, then point LATEST at it; prune older ones.

    The best-so-far weights are kept with the checkpoint so that resuming from any checkpoint (including
    an older one after a damaged newest) restores a consistent pair. `rngs` holds other ranks' generator
    states (``rng.<kind>.rank<r>``); this process's CPU generator is saved as ``rng.torch``. On a failed
    write the half-written folder is removed and LATEST still names the previous one.
    """
    ck_root = Path(run_dir) / CKPT_DIR
    name = f"ckpt-{state.epoch:06d}-{state.step:06d}"
    folder = ck_root / name
    try:
        ck_root.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
    except OSError as e:
        raise CheckpointError(f"{folder}: could not create the checkpoint folder ({e.strerror or e})") from None
    try:
        save_tensors(folder / WEIGHTS, module.state_dict())
        if state.best is not None:
            save_tensors(folder / BEST, state.best)
        opt_tensors, opt_plain = _optimizer_to_flat(optimizer.state_dict())
        tensors = {**opt_tensors, **(rngs or {}), "rng.torch": torch.get_rng_state()}
        if state.kl_dim_sum is not None:
            tensors["sums.kl_dim"] = state.kl_dim_sum
        save_tensors(folder / TRAINER_TENSORS, tensors)
        meta = dict(epoch=state.epoch, step=state.step, best_val=state.best_val, best_epoch=state.best_epoch,
                    bad_epochs=state.bad_epochs, optimizer=opt_plain,
                    # float64 sums round-trip exactly through JSON (repr), so a resumed epoch logs the same figures
                    sums=None if state.sums is None else [float(v) for v in state.sums],
                    scheduler=scheduler.state_dict() if scheduler is not None else None)
        atomic_write_text(folder / TRAINER_META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        write_checksums(folder, CKPT_FILES)
        atomic_write_text(ck_root / LATEST, name + "\n")
    except BaseException:
        latest = ck_root / LATEST
        if not (latest.exists() and latest.read_text().strip() == name):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    complete = sorted(p for p in ck_root.glob("ckpt-*") if p.is_dir() and p.name != name and (p / CHECKSUMS).exists())
    for old in complete[:len(complete) - (KEEP_CHECKPOINTS - 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in ck_root.glob("ckpt-*"):
        if partial.is_dir() and partial.name != name and not (partial / CHECKSUMS).exists():
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
    return folder


def load_train_state(run_dir: Path, module: torch.nn.Module, optimizer, scheduler, rank: int = 0,
                     quarantine_damaged: bool = False) -> Tuple[TrainState, Dict[str, torch.Tensor]]:
    """Load the newest checkpoint that reads cleanly into module, optimizer and scheduler; fall back to
    older ones, naming what failed.

    Returns the TrainState and rank `rank`'s generator states ({"torch": ..., "cuda": ... when saved}).
    With `quarantine_damaged`, damaged newer checkpoints are renamed damaged-<name> so they can never
    shadow the ones written from here on.
    """
    problems, damaged = [], []
    # No checkpoint file of this model can be larger: 8 bytes per value, three values per parameter
    # (weights, Adam's two moments), plus generator states and headers. A hostile one is refused unread.
    limit = 3 * 8 * sum(p.numel() for p in module.state_dict().values()) + 16 * (1 << 20)
    for folder in checkpoint_candidates(run_dir):
        try:
            weights, opt_state, sched_state, state, tensors = load_checkpoint(folder, limit)
            module.load_state_dict(weights)
            optimizer.load_state_dict(opt_state)
            if scheduler is not None and sched_state is not None:
                scheduler.load_state_dict(sched_state)
        except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as e:
            problems.append(f"{folder.name}: {_one_line(e)}")
            damaged.append(folder)
            continue
        if problems:
            if quarantine_damaged:
                for bad in damaged:
                    quarantine(bad)
            warnings.warn("skipped damaged checkpoint(s): " + "; ".join(problems) + f"; resuming from {folder.name}")
        if state.best is None:  # checkpoints written before best.safetensors existed
            state.best = _run_weights_or(run_dir, weights)
        if rank != 0:  # a mid-epoch checkpoint's partial sums are every rank's: rank 0 carries them
            state.sums = state.kl_dim_sum = None
        # each rank its own generators, where the checkpoint has them (mid-epoch ones do)
        rng = {"torch": tensors.get(f"rng.torch.rank{rank}", tensors["rng.torch"])}
        if f"rng.cuda.rank{rank}" in tensors:
            rng["cuda"] = tensors[f"rng.cuda.rank{rank}"]
        return state, rng
    detail = ("; ".join(problems)) if problems else "there are none"
    raise CheckpointError(f"{run_dir}: no usable checkpoint to resume from ({detail})")


def _run_weights_or(run_dir: Path, fallback: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """RUN/model.safetensors (the best weights when the run last saved), or `fallback` if it is unreadable."""
    if (Path(run_dir) / WEIGHTS).exists():
        try:
            return load_tensors(Path(run_dir) / WEIGHTS)
        except CheckpointError:
            pass
    return fallback


def checkpoint_candidates(run_dir: Path):
    """Checkpoint folders, newest (LATEST) first."""
    ck_root = Path(run_dir) / CKPT_DIR
    if not ck_root.exists():
        return []
    folders = sorted((p for p in ck_root.glob("ckpt-*") if p.is_dir()), reverse=True)
    latest = ck_root / LATEST
    try:
        name = read_bytes(latest, SMALL_LIMIT).decode("utf-8").strip() if latest.exists() else None
    except (CheckpointError, UnicodeDecodeError):
        name = None  # a damaged pointer: the folder names still order the checkpoints
    if name:
        folders.sort(key=lambda p: p.name != name)
    return folders


def quarantine(folder: Path) -> Optional[Path]:
    """Rename a damaged checkpoint folder to damaged-<name> so it is kept for inspection but never loaded."""
    folder = Path(folder)
    target = folder.with_name("damaged-" + folder.name)
    try:
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
        return target
    except OSError:
        return None


_TRAINER_KEYS = ("epoch", "step", "best_val", "best_epoch", "bad_epochs", "optimizer")


def load_checkpoint(folder: Path, limit: int = TENSORS_LIMIT):
    """Read a checkpoint folder: (weights, optimizer state dict, scheduler state or None, TrainState,
    trainer tensors).

    The trainer tensors hold the optimizer state and the generator states (``rng.torch`` and, from a
    mid-epoch checkpoint, ``rng.<kind>.rank<r>``). `TrainState.best` is None when the checkpoint was
    written before best weights were kept with it.
    """
    folder = Path(folder)
    if not (folder / CHECKSUMS).exists():
        raise CheckpointError(f"{folder / CHECKSUMS}: missing; the checkpoint was not completely written")
    verify_checksums(folder, CKPT_FILES)
    weights = load_tensors(folder / WEIGHTS, limit)
    tensors = load_tensors(folder / TRAINER_TENSORS, limit)
    meta_path = folder / TRAINER_META
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing")
    # not strict: best_val is Infinity until the first epoch ends
    meta = read_json(meta_path, SUMMARY_LIMIT, strict=False)
    if not isinstance(meta, dict) or any(k not in meta for k in _TRAINER_KEYS):
        missing = [k for k in _TRAINER_KEYS if not isinstance(meta, dict) or k not in meta]
        raise CheckpointError(f"{meta_path}: not a vaelens trainer state (missing {', '.join(missing)})")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{folder / TRAINER_TENSORS}: has no random-number state (rng.torch)")
    try:
        opt = _optimizer_from_flat(tensors, meta["optimizer"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: malformed optimizer state ({_one_line(e)})") from None
    try:
        sums = meta.get("sums")
        state = TrainState(epoch=int(meta["epoch"]), step=int(meta["step"]), best_val=float(meta["best_val"]),
                           best_epoch=int(meta["best_epoch"]), bad_epochs=int(meta["bad_epochs"]),
                           sums=None if sums is None else torch.tensor(sums, dtype=torch.float64),
                           kl_dim_sum=tensors.get("sums.kl_dim"))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{meta_path}: malformed trainer state ({_one_line(e)})") from None
    state.best = load_tensors(folder / BEST, limit) if (folder / BEST).exists() else None
    return weights, opt, meta.get("scheduler"), state, tensors


# --- metrics ----------------------------------------------------------------------------------

def append_metrics(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"{path}: could not write ({e.strerror or e})") from None


def read_metrics(run_dir: Path) -> list:
    """Metric records, one per epoch. A last line without its newline was cut off by a crash and is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = read_bytes(path, METRICS_LIMIT).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None
    lines = text.split("\n")
    lines.pop()  # "" when the file ends with a newline, else the torn tail
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        rec = parse_json(line, f"{path}: line {i + 1}", strict=False)
        if not isinstance(rec, dict):
            raise CheckpointError(f"{path}: line {i + 1} is not a JSON object")
        out.append(rec)
    return out


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run starts from."""
    path = Path(run_dir) / METRICS
    if path.exists():
        keep = [json.dumps(r, sort_keys=True) for r in read_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_checksums(Path(run_dir), [CONFIG, WEIGHTS, SUMMARY])


def save_run_weights(run_dir: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """(Re)write RUN/model.safetensors, keeping RUN/checksums.json consistent with it."""
    write_tracked(Path(run_dir), WEIGHTS, lambda: save_tensors(Path(run_dir) / WEIGHTS, tensors))


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY
    if not path.exists() and not path.is_symlink():
        return {}
    summary = read_json(path, SUMMARY_LIMIT, strict=False)
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return summary


def load_model(run_dir: Path, map_location: str = "cpu"):
    """Rebuild the `VAEModule` of a run from config.json and model.safetensors (eval mode)."""
    from .model import VAEModule

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    size = check_weights(run_dir / WEIGHTS, cfg)  # before hashing or reading it, and before building anything
    verify_checksums(run_dir, [CONFIG, WEIGHTS])
    module = VAEModule(cfg.model)
    load_state_into(module, run_dir / WEIGHTS, limit=size)
    return cfg, module.to(map_location).eval()


# safetensors dtype names of the floating types a state dict may be saved in, and their sizes
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def expected_tensors(cfg: RunConfig, where: str = CONFIG) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of the model `cfg` describes, without allocating it.

    The model is built on the meta device (shapes only, no storage), after `ModelConfig.validate` bounded
    the number of layers, so this costs microseconds whatever sizes config.json claims; the total is then
    bounded by `MAX_PARAMETERS` before any real tensor exists.
    """
    from .model import VAEModule

    with torch.device("meta"):
        module = VAEModule(cfg.model)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: describes a model of {total:,} parameters "
                              f"({4 * total / 1e9:.1f} GB of float32); vaelens loads at most {MAX_PARAMETERS:,}")
    return shapes


def check_weights(path: Path, cfg: RunConfig) -> int:
    """Compare a weights file's safetensors header with the model in `cfg`; return the file's size.

    Reads only the header: every tensor's name, dtype, shape and byte range must be what the config
    implies, and the ranges must tile the rest of the file exactly, so the file is as large as the model
    and no larger. A mismatch (a config.json claiming hidden [20000, 20000] beside small weights) is
    reported before a byte of weights is read or a parameter allocated.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        verify_checksums(path.parent, [path.name])  # "missing (listed in checksums.json)" where it is
        raise CheckpointError(f"{path}: missing")
    try:
        shapes = expected_tensors(cfg, str(path.parent / CONFIG))
    except ConfigError as e:
        raise CheckpointError(f"{path.parent / CONFIG}: {e}") from None
    header, header_len, size = safetensors_header(path)
    header.pop("__metadata__", None)
    missing, extra = sorted(set(shapes) - set(header)), sorted(set(header) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not fit the model in config.json "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    bound = 8 + header_len + 8 * sum(math.prod(v) for v in shapes.values())  # float64 at most
    if size > bound:
        raise not_safetensors(path, f"{size} bytes, more than the {bound} the model in config.json can take")
    spans = []
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _FLOAT_DTYPES and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if ok else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
            raise not_safetensors(path, f"{name[:80]}: not a floating-point tensor entry")
        if tuple(entry["shape"]) != shapes[name]:
            raise CheckpointError(f"{path}: {name} has shape {tuple(entry['shape'])}, the model in config.json "
                                  f"needs {shapes[name]}")
        spans.append((offsets[0], offsets[1], math.prod(shapes[name]) * _FLOAT_DTYPES[entry["dtype"]], name))
    end, problem = 0, None
    for begin, stop, nbytes, name in sorted(spans):
        if begin != end or stop - begin != nbytes:
            problem = f"{name}: byte range {begin}..{stop} does not fit its shape and dtype"
            break
        end = stop
    if problem is None and size != 8 + header_len + end:
        problem = f"{size} bytes, but its header describes {8 + header_len + end}"
    if problem:
        # a file vaelens wrote and something cut or changed: checksums.json says so more plainly (and
        # hashing is bounded, the size having been checked above)
        verify_checksums(path.parent, [path.name])
        raise not_safetensors(path, problem)
    return size
