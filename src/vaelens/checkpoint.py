"""The run directory: configuration, weights, trainer state, metrics; atomic, checksummed writes.

Layout::

    RUN/config.json            RunConfig, versioned
    RUN/model.safetensors      best weights (lowest validation loss)
    RUN/metrics.jsonl          one JSON line per epoch
    RUN/summary.json           final figures
    RUN/checksums.json         SHA-256 of the files above
    RUN/checkpoints/ckpt-EEEEEE-SSSSSS/{model,trainer}.safetensors, trainer.json, checksums.json
    RUN/checkpoints/LATEST     name of the newest complete checkpoint

Weights and tensors go through safetensors, everything else through JSON, so loading a run
never unpickles anything. Every file is written to a temporary name, fsynced and renamed,
and a checkpoint folder becomes LATEST only once complete, so a crash at any moment leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import RunConfig
from .errors import CheckpointError, ConfigError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKSUMS = "checksums.json"
CKPT_DIR = "checkpoints"
LATEST = "LATEST"
KEEP_CHECKPOINTS = 2  # the newest and one before it, to fall back on if the newest is damaged


# --- atomic writes ----------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write ({e.strerror or e}); the previous file is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, names) -> None:
    sums = {n: sha256(folder / n) for n in sorted(names) if (folder / n).exists()}
    atomic_write_text(folder / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True) + "\n")


def verify_checksums(folder: Path, names) -> None:
    """Raise `CheckpointError` naming the first listed file that is missing or altered."""
    folder = Path(folder)
    cpath = folder / CHECKSUMS
    if not cpath.exists():
        return  # runs written without checksums (or by hand) are still readable
    try:
        sums = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cpath}: unreadable ({e})") from None
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


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return st_load(path.read_bytes())
    except Exception as e:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated or altered") from None


def load_state_into(module: torch.nn.Module, path: Path) -> None:
    """Load weights from a safetensors file, naming missing and unexpected keys on mismatch."""
    state = load_tensors(path)
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
    atomic_write_text(Path(run_dir) / CONFIG, cfg.to_json())


def load_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG
    if not path.exists():
        raise CheckpointError(f"{path}: missing; is {run_dir} a vaelens run directory?")
    try:
        return RunConfig.from_json(path.read_text(), source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


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


def save_checkpoint(run_dir: Path, module: torch.nn.Module, optimizer, scheduler, trainer: dict,
                    rng_state: torch.Tensor) -> Path:
    """Write a complete checkpoint folder, then point LATEST at it; prune older ones."""
    ck_root = Path(run_dir) / CKPT_DIR
    ck_root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{trainer['epoch']:06d}-{trainer['step']:06d}"
    folder = ck_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    save_tensors(folder / WEIGHTS, module.state_dict())
    opt_tensors, opt_plain = _optimizer_to_flat(optimizer.state_dict())
    save_tensors(folder / "trainer.safetensors", {**opt_tensors, "rng.torch": rng_state})
    meta = dict(trainer, optimizer=opt_plain, scheduler=scheduler.state_dict() if scheduler is not None else None)
    atomic_write_text(folder / "trainer.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    write_checksums(folder, [WEIGHTS, "trainer.safetensors", "trainer.json"])
    atomic_write_text(ck_root / LATEST, name + "\n")
    for old in sorted(p for p in ck_root.glob("ckpt-*") if p.is_dir() and p.name != name)[:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoint_candidates(run_dir: Path):
    """Checkpoint folders, newest (LATEST) first."""
    ck_root = Path(run_dir) / CKPT_DIR
    if not ck_root.exists():
        return []
    folders = sorted((p for p in ck_root.glob("ckpt-*") if p.is_dir()), reverse=True)
    latest = ck_root / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        folders.sort(key=lambda p: p.name != name)
    return folders


def load_checkpoint(folder: Path):
    """Read a checkpoint folder: (weights, optimizer state dict, trainer dict, rng state)."""
    folder = Path(folder)
    verify_checksums(folder, [WEIGHTS, "trainer.safetensors", "trainer.json"])
    weights = load_tensors(folder / WEIGHTS)
    tensors = load_tensors(folder / "trainer.safetensors")
    try:
        meta = json.loads((folder / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'trainer.json'}: unreadable ({e})") from None
    opt = _optimizer_from_flat(tensors, meta.pop("optimizer"))
    return weights, opt, meta, tensors["rng.torch"]


# --- metrics ----------------------------------------------------------------------------------

def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: line {i + 1} is not valid JSON") from None
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


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_model(run_dir: Path, map_location: str = "cpu"):
    """Rebuild the `VAEModule` of a run from config.json and model.safetensors (eval mode)."""
    from .model import VAEModule

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    verify_checksums(run_dir, [CONFIG, WEIGHTS])
    module = VAEModule(cfg.model)
    load_state_into(module, run_dir / WEIGHTS)
    return cfg, module.to(map_location).eval()
