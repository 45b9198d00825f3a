"""Every file vaelens writes goes through here: one atomic writer, one JSON form, one pre-flight check.

A file is written to a temporary name in its own folder, flushed, fsynced and renamed over the
target, then the folder is fsynced: a reader (or a crash) sees the old file or the new one, never a
part. The file gets the permissions an ordinary `open()` would give it under the process's umask
(0644 under umask 022), not the 0600 of a temporary file.

Standard library and numpy only, so that config and data code can use it before torch is imported.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

from .errors import OutputError

Content = Union[bytes, str, Callable[[BinaryIO], None]]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], content: Content) -> Path:
    """Write `content` to `path` atomically; return the path.

    `content` is bytes, text (written as UTF-8), or a function that writes into the binary file
    object it is given (``lambda f: np.savez(f, **arrays)``, ``lambda f: fig.savefig(f, format="png")``).
    Raises `OutputError` naming the path when the folder cannot be written; the previous file, if
    any, is then unchanged.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write ({e.strerror or e}); the previous file is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse directory fsync)."""
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


def jsonable(obj: Any) -> Any:
    """`obj` with numpy arrays and scalars, tuples and paths turned into plain JSON values.

    Non-finite floats become None: JSON has no NaN or Infinity, and other readers reject them.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any) -> str:
    """The one JSON form of every file vaelens writes: sanitized, indented, newline-terminated."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: Union[str, Path], obj: Any) -> Path:
    return atomic_write(path, to_json(obj))


def check_writable(path: Union[str, Path], *, force: bool = False, what: str = "output file",
                   folder: bool = False) -> Path:
    """Refuse, before any expensive work, an output that could not be written or would be overwritten.

    Checks that `path` does not exist (unless `force`), is not a folder where a file is wanted (or a
    file where a folder is wanted with `folder=True`), and that the nearest existing ancestor is a
    folder in which a file can actually be created (a probe file is created and removed, so
    read-only file systems and missing permissions are found whoever runs the command). Nothing is
    created. Returns the path.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise OutputError(f"{path}: exists and is a file, not a folder; choose another --out")
        if not folder and path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name for the {what}")
        if not folder and not force:
            raise OutputError(f"{path}: {what} already exists; pass --force to overwrite it or choose another --out")
    probe_in = path if folder and path.is_dir() else path.parent
    while not probe_in.exists():
        if probe_in.is_symlink():  # a dangling link: nothing can be created through it
            raise OutputError(f"{path}: {probe_in} is a broken symbolic link")
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"{path}: {probe_in} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe_in, prefix=".vaelens-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{path}: cannot write in {probe_in} ({e.strerror or e})") from None
    return path


def prepare_output(path: Union[str, Path], *, force: bool = False, what: str = "output file") -> Path:
    """`check_writable`, then create the file's folder: for outputs written once the work is done."""
    path = check_writable(path, force=force, what=what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create its folder ({e.strerror or e})") from None
    return path
