"""`vaelens train --resume RUN`: which flags may change a run that has already trained, and the record
of what did.

A run's config describes the weights in it: a flag that would change the model, its data or how the
steps so far were taken (the objective, the batch size, the seed ...) cannot apply to a run half
trained with other values, so it is refused, all such flags in one line, before anything is loaded.
What can change (`RESUMABLE`) is applied explicitly: config.json gets the new value and
RUN/resumes.json a record of the change (when, from which epoch, old and new values), so the saved
config never changes silently.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .. import config
from ..config import RunConfig
from ..errors import CheckpointError, VaelensError
from . import _common as common

RESUMES = "resumes.json"
# more epochs (or more patience) continue the same optimisation; the device only decides where it runs
RESUMABLE = ("train.epochs", "train.patience", "train.device")
# flags of `vaelens train` that only make sense for a new run
_NEW_RUN_FLAGS = (("config", "--config"), ("out", "--out"), ("seeds", "--seeds"), ("force", "--force"))
# how the data file is read (delimiter, missing values, id columns ...): the run's weights were fitted to
# what those settings made of the file; the data set itself (name, path) is compared on its own
_SOURCE_FIELDS = tuple(o.name for o in config.options("data", role="source") if o.name not in ("name", "path"))


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _data_shown(d: config.DataConfig) -> str:
    return d.path if d.name == "file" else d.name


def _where(path: Optional[str]) -> Optional[Path]:
    # the same file however it is spelt (./t.csv, t.csv, its absolute path)
    return None if path is None else Path(path).expanduser().resolve()


def refusals(args, cfg: RunConfig) -> List[str]:
    """'field (X given, run has Y)' for every flag the user gave that would change what cannot change."""
    out = [f"{flag[2:]} ({flag} is for a new run)" for dest, flag in _NEW_RUN_FLAGS
           if getattr(args, dest, None) not in (None, False)]
    data = common.data_config(args, base=cfg.data)
    if data.name != cfg.data.name or _where(data.path) != _where(cfg.data.path):
        out.append(f"data ({_data_shown(data)} given, run used {_data_shown(cfg.data)})")
    for name in _SOURCE_FIELDS:
        new, old = getattr(data, name), getattr(cfg.data, name)
        if new != old:
            out.append(f"{name} ({_shown(new)} given, run used {_shown(old)})")
    for sec, values in common.given_options(args).items():
        for name, value in values.items():
            old = getattr(getattr(cfg, sec), name)
            if f"{sec}.{name}" not in RESUMABLE and value != old:
                out.append(f"{name} ({_shown(value)} given, run has {_shown(old)})")
    return out


def _checkpoint_place(run_dir: Path) -> Optional[Tuple[int, int, int]]:
    """(completed epochs, steps into the next, epochs without improvement) of the newest checkpoint, or None
    when there is none or it cannot be read (resuming then says why, naming the file)."""
    from .. import checkpoint as ck

    found = ck.checkpoint_candidates(run_dir)
    if not found:
        return None
    try:
        meta = json.loads((found[0] / ck.TRAINER_META).read_text())
        return int(meta["epoch"]), int(meta["step"]), int(meta["bad_epochs"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def resumed_config(args, run_dir: Path, cfg: RunConfig) -> Tuple[RunConfig, dict]:
    """The run's config with the changes a resume may make, and {key: [old, new]} of them; a `VaelensError`
    (one line) for a flag that cannot change the run, or a resume with nothing left to do."""
    bad = refusals(args, cfg)
    if bad:
        raise VaelensError(f"--resume {run_dir}: cannot change {', '.join(bad)}; only --epochs (more than were "
                           f"run), --patience and --device apply to a run that has trained; start a new run "
                           f"(without --resume) to change the others")
    given = common.given_options(args)
    changes = {}
    for key in RESUMABLE:
        sec, name = key.split(".")
        old = getattr(getattr(cfg, sec), name)
        if name in given[sec] and given[sec][name] != old:
            changes[key] = [old, given[sec][name]]
    new = cfg.replace(train={k.split(".")[1]: v for k, (_, v) in changes.items()})
    new.train.validate()
    _check_work_left(run_dir, cfg, new, "train.epochs" in changes or args.epochs is not None)
    return new, changes


def _check_work_left(run_dir: Path, old: RunConfig, new: RunConfig, epochs_given: bool) -> None:
    place = _checkpoint_place(run_dir)
    if place is None:
        return
    done, step, bad_epochs = place
    if epochs_given and new.train.epochs <= done:
        raise VaelensError(f"--resume {run_dir}: the run has already trained {done} epochs, so --epochs "
                           f"{new.train.epochs} adds none; pass --epochs above {done} to train more")
    if not epochs_given and done >= old.train.epochs:
        raise VaelensError(f"--resume {run_dir}: the run finished its {old.train.epochs} epochs; nothing to "
                           f"resume. Pass --epochs above {done} to train more")
    p_old, p_new = old.train.patience, new.train.patience
    if step == 0 and p_old is not None and bad_epochs >= p_old and (p_new is not None and p_new <= bad_epochs):
        raise VaelensError(f"--resume {run_dir}: the run stopped early at epoch {done} (no improvement for "
                           f"{bad_epochs} epochs, patience {p_old}); pass --patience above {bad_epochs} (and "
                           f"--epochs) to train more")


def record(run_dir: Path, changes: dict, restart: Optional[int] = None) -> dict:
    """Apply-and-record: append {at, from_epoch, from_step, changed} to RUN/resumes.json; returns the entry.
    `restart`: torchrun's restart count, for a resume vaelens made itself after workers were restarted."""
    from .. import checkpoint as ck

    place = _checkpoint_place(run_dir) or (0, 0, 0)
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_epoch": place[0],
             "from_step": place[1], "changed": changes}
    if restart is not None:
        entry["elastic_restart"] = restart
    ck.atomic_write_text(Path(run_dir) / RESUMES, json.dumps(read(run_dir) + [entry], indent=1) + "\n")
    return entry


def read(run_dir: Path) -> list:
    """The run's resume records (RUN/resumes.json), [] for a run never resumed."""
    path = Path(run_dir) / RESUMES
    if not path.exists():
        return []
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(found, list):
        raise CheckpointError(f"{path}: expected a JSON list of resume records")
    return found


def add_to_summary(run_dir: Path) -> None:
    """Copy the resume records into summary.json (rewritten by every finished run) so it tells the whole story."""
    from .. import checkpoint as ck

    resumes = read(run_dir)
    summary = ck.read_summary(run_dir)
    if resumes and summary:
        summary["resumes"] = resumes
        ck.write_summary(run_dir, summary)


def describe(entry: dict) -> str:
    changed = ", ".join(f"{k.split('.')[1]} {_shown(a)} -> {_shown(b)}" for k, (a, b) in entry["changed"].items())
    return (f"resumed at epoch {entry['from_epoch']}" + (f", step {entry['from_step']}" if entry["from_step"] else "")
            + (f"; changed {changed} (recorded in {RESUMES})" if changed else "")
            + (f" after torchrun restart {entry['elastic_restart']}" if entry.get("elastic_restart") else ""))
