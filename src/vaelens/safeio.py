"""Reading files that may be hostile: a run folder someone else wrote, a config file, a checksum list.

A file is read only if it is a regular file (a symbolic link counts as its target) no larger than
a bound the caller gives, and it is parsed as strict JSON: no NaN or Infinity, no duplicate keys,
no nesting or integers so large that the parser itself fails. Whatever is wrong becomes one
`VaelensError` naming the file, never a hang (a FIFO, a terminal), an unbounded read (/dev/zero,
a huge file) or a raw RecursionError / ValueError.

Standard library only, so that config code can use it before torch is imported.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, Tuple, Type, Union

from .errors import CheckpointError, VaelensError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# A vaelens file is written by vaelens: these bounds are far above any real one (config.json of a
# 100,000-feature table with its standardization is ~4 MB) and far below what hurts to read.
CONFIG_LIMIT = 16 * MiB
SMALL_LIMIT = 1 * MiB       # checksums.json, LATEST
SUMMARY_LIMIT = 16 * MiB    # summary.json, trainer.json
METRICS_LIMIT = 64 * MiB    # metrics.jsonl: one line per epoch, each with a value per latent dimension
HEADER_LIMIT = 16 * MiB     # a safetensors header (JSON naming every tensor); a VAE's is a few KB

_Err = Type[VaelensError]


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _what(path: Path) -> str:
    if path.is_symlink():
        return f"a symbolic link to {os.path.realpath(path)}, which is "
    return ""


def check_file(path: Union[str, Path], limit: int, error: _Err = CheckpointError) -> os.stat_result:
    """Stat `path` (following symbolic links) and refuse anything but a regular file of at most `limit` bytes.

    Nothing is opened: a FIFO, a device or a folder is named and refused on its mode alone.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: missing" + (" (a broken symbolic link)" if path.is_symlink() else "")) from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {_what(path)}{_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise error(f"{path}: {_size(st.st_size)}, more than the {_size(limit)} such a file can be; "
                    f"it is not a file vaelens wrote")
    return st


def open_regular(path: Union[str, Path], limit: int, error: _Err = CheckpointError) -> Tuple[int, os.stat_result]:
    """A read-only descriptor of `path` after `check_file`, checked again once open.

    O_NONBLOCK: should the path have been swapped for a FIFO between the stat and the open, the open
    returns at once instead of waiting for a writer; the fstat then sees what was really opened.
    """
    path = Path(path)
    st = check_file(path, limit, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or now.st_size > limit:
        os.close(fd)
        raise error(f"{path}: changed while being opened; refusing to read it")
    os.set_blocking(fd, True)
    return fd, now


def read_bytes(path: Union[str, Path], limit: int, error: _Err = CheckpointError) -> bytes:
    """The contents of a regular file of at most `limit` bytes; never more than limit + 1 bytes are read."""
    fd, _ = open_regular(path, limit, error)
    chunks, total = [], 0
    try:
        while True:
            block = os.read(fd, min(MiB, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:  # grew since the stat
                raise error(f"{path}: more than the {_size(limit)} such a file can be")
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k[:80]!r} appears twice in one object")
        out[k] = v
    return out


def parse_json(data: Union[bytes, str], where: str, error: _Err = CheckpointError, strict: bool = True) -> Any:
    """Parse JSON text; every failure is one `error` line naming `where`.

    `strict` also refuses NaN / Infinity (JSON has neither; a NaN compares False with every bound
    a config value is checked against) and duplicate keys (which one wins is a parser's choice).
    Deep nesting ends in RecursionError and a huge integer in ValueError inside `json`; both are
    caught here.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    kw = dict(parse_constant=_no_constant, object_pairs_hook=_no_duplicates) if strict else {}
    try:
        return json.loads(data, **kw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON here: nested too deeply") from None
    except ValueError as e:  # int digit limit, or the hooks above
        msg = " ".join(str(e).split())
        if "integer string conversion" in msg:
            msg = "holds an integer with too many digits"
        raise error(f"{where}: not valid JSON here: {msg}") from None


def read_json(path: Union[str, Path], limit: int, error: _Err = CheckpointError, strict: bool = True) -> Any:
    """`read_bytes` then `parse_json`."""
    return parse_json(read_bytes(path, limit, error), str(path), error, strict)


def not_safetensors(path, detail: str, error: _Err = CheckpointError) -> VaelensError:
    """The one message for a weights file that cannot be read as safetensors."""
    return error(f"{path}: not a readable safetensors file ({detail}); it may be truncated, altered or in "
                 f"another format (vaelens never unpickles weights)")


def safetensors_header(path: Union[str, Path], error: _Err = CheckpointError) -> Tuple[dict, int, int]:
    """The JSON header of a safetensors file, its length and the file's size, reading only the header.

    The format: 8 bytes little-endian header length N, N bytes of JSON, then the tensors' bytes.
    N is bounded (`HEADER_LIMIT`) before anything is read past those 8 bytes.
    """
    fd, st = open_regular(path, 1 << 62, error)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(8)
            if len(head) < 8:
                raise not_safetensors(path, "shorter than its 8-byte header length", error)
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or 8 + n > st.st_size:
                raise not_safetensors(path, f"header length {n} in a file of {st.st_size} bytes", error)
            text = f.read(n)
    finally:
        os.close(fd)
    try:
        header = parse_json(text, "header", error, strict=True)
    except VaelensError as e:
        raise not_safetensors(path, str(e), error) from None
    if not isinstance(header, dict):
        raise not_safetensors(path, "its header is not a JSON object", error)
    return header, n, st.st_size
