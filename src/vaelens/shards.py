"""Tables read in pieces: one .npy file, a folder or glob of .npy / .parquet shards, or an array already in
memory, behind one interface: `ShardSet.read(lo, hi)` returns rows [lo, hi) of the whole table as float32.

A .npy shard is opened by its header alone; its rows are copied out with explicit reads (`os.preadv`) into
buffers this process owns and frees. Memory-mapping the file instead would be simpler, but every page of a
mapping the process touches counts toward its resident memory until the kernel evicts it, so one epoch over
a mapped 20 GB file can show 20 GB of peak RSS; read pages live in the page cache, which is not RSS.
A Parquet shard is read one row group at a time (pyarrow); keep row groups to ~100k rows for bounded memory.

`scan` is the one validation pass over a set: NaN/inf, the likelihood's support and, in the same pass, the
float64 mean and standard deviation of the training rows (Chan et al.'s pairwise update), each error naming
the shard file and its row.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import data as data_mod
from .errors import DataError

SUFFIXES = (".npy", ".parquet", ".pq")
SCAN_BYTES = 16 << 20  # rows read per step of the validation pass (float32 bytes)


class NpyShard:
    """A .npy file: header read once, rows copied out with pread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            shape, fortran, self.dtype, self.offset = _npy_header(self.path)
        except Exception as e:  # numpy raises ValueError, OSError, EOFError ... for damaged files
            raise DataError(f"{self.path}: {data_mod._load_problem(e, '.npy')}") from None
        if self.dtype.hasobject:  # never unpickled: refused as data.load_file refuses it
            raise DataError(f"{self.path}: {data_mod._load_problem(ValueError('pickle'), '.npy')}")
        fortran = fortran and len(shape) > 1
        if self.dtype.kind not in "biuf":
            raise DataError(f"{self.path}: expected numbers, got dtype {self.dtype}")
        if fortran:
            raise DataError(f"{self.path}: stored in Fortran (column) order, which cannot be read row by row; "
                            f"save it with np.save(path, np.ascontiguousarray(X))")
        self.n, self.p, self.image_shape = _row_shape(shape, self.path)
        self.row_bytes = self.p * self.dtype.itemsize
        size = self.path.stat().st_size
        if self.offset + self.n * self.row_bytes > size:
            raise DataError(f"{self.path}: {size} bytes, its header describes {self.offset + self.n * self.row_bytes} "
                            f"(truncated?)")
        # uint8 images are grey levels 0..255, scaled to [0, 1] as `data.from_array` does
        self.scale = 1 / 255.0 if self.dtype == np.uint8 else None
        self.feature_names = None

    def read(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of this shard into `out` (hi - lo, p) float32."""
        direct = self.dtype == np.float32 and self.dtype.isnative
        raw = out if direct else np.empty((hi - lo, self.p), self.dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            start, got = self.offset + lo * self.row_bytes, 0
            while got < len(view):
                k = os.preadv(fd, [view[got:]], start + got)
                if k == 0:
                    raise DataError(f"{self.path}: ends before row {lo + got // self.row_bytes} (truncated?)")
                got += k
        finally:
            os.close(fd)
        if not direct:
            out[...] = raw if self.scale is None else raw * np.float32(self.scale)


class ParquetShard:
    """A .parquet file: its numeric columns (or `columns`), read a row group at a time; the last group read
    is kept, as a block is usually a small part of one."""

    def __init__(self, path: Path, columns=None, label_column=None, keep_id_columns=False):
        from .commands._common import require_pyarrow

        pa, pq = require_pyarrow()
        self.path = Path(path)
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as e:
            raise DataError(f"{self.path}: not a readable .parquet file ({' '.join(str(e).split())})") from None
        schema = self.file.schema_arrow
        if columns:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise DataError(f"{self.path}: no column(s) {', '.join(missing)}; it has {', '.join(schema.names)}")
            names = list(columns)
        else:
            from .tables import ID_NAMES

            names = [f.name for f in schema if f.name != label_column
                     and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
            # named like row identifiers: left out, as a table read whole leaves them out (by name only here:
            # the whole-table reader also spots consecutive integers, which needs every value)
            ids = [] if keep_id_columns else [c for c in names if c.lower() in ID_NAMES or c.lower().endswith("_id")]
            names = [c for c in names if c not in ids]
            self.notes = [f"{self.path}: left out column(s) {', '.join(ids)}, named like row identifiers; "
                          f"--keep-id-columns uses them"] if ids else []
        if not names:
            raise DataError(f"{self.path}: no numeric columns")
        self.feature_names = names
        md = self.file.metadata
        self.n, self.p, self.image_shape = md.num_rows, len(names), None
        self.group_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._cached = (None, None)

    def _group(self, g: int) -> np.ndarray:
        if self._cached[0] != g:
            t = self.file.read_row_group(g, columns=self.feature_names)
            # nulls become NaN, which the validation pass reports by row
            cols = [c.to_numpy(zero_copy_only=False).astype(np.float32) for c in t.columns]
            self._cached = (g, np.stack(cols, axis=1) if cols else np.empty((t.num_rows, 0), np.float32))
        return self._cached[1]

    def read(self, lo: int, hi: int, out: np.ndarray) -> None:
        g = int(np.searchsorted(self.group_starts, lo, side="right") - 1)
        at = lo
        while at < hi:
            g0, g1 = self.group_starts[g], self.group_starts[g + 1]
            take = min(hi, g1) - at
            out[at - lo:at - lo + take] = self._group(g)[at - g0:at - g0 + take]
            at += take
            g += 1


class ArrayShard:
    """An array already in memory (built-in sets, tables, the API's X) read through the same interface."""

    def __init__(self, X: np.ndarray, name: str, image_shape=None, feature_names=None):
        self.path, self.X = name, X
        self.n, self.p, self.image_shape, self.feature_names = len(X), X.shape[1], image_shape, feature_names

    def read(self, lo: int, hi: int, out: np.ndarray) -> None:
        out[...] = self.X[lo:hi]


def _npy_header(path: Path):
    """(shape, fortran_order, dtype, data offset) from a .npy header, without reading or mapping the data."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, fortran, dtype = read(f) if read else fmt._read_array_header(f, version)
        return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()


def _row_shape(shape: tuple, path) -> tuple:
    """(rows, features per row, image shape or None) of an array's shape, as `data.from_array` reads it."""
    if len(shape) == 4 and shape[1] == 1:
        shape = (shape[0], *shape[2:])
    if len(shape) == 3:
        return int(shape[0]), int(shape[1] * shape[2]), (int(shape[1]), int(shape[2]))
    if len(shape) != 2:
        raise DataError(f"{path}: expected a 2-D array (samples, features) or images (n, h, w); got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(f"{path}: no data (shape {shape})")
    return int(shape[0]), int(shape[1]), None


@dataclass
class ShardSet:
    """Shards read as one table: rows numbered across shards in the order listed (file names sorted)."""

    shards: list
    name: str
    notes: list = field(default_factory=list)

    def __post_init__(self):
        first = self.shards[0]
        for s in self.shards[1:]:
            if s.p != first.p or s.image_shape != first.image_shape:
                raise DataError(f"{s.path}: has {s.p} features{_img(s.image_shape)}, the first shard {first.path} "
                                f"has {first.p}{_img(first.image_shape)}; every shard needs the same")
        self.starts = np.cumsum([0] + [s.n for s in self.shards])
        self.p, self.image_shape, self.feature_names = first.p, first.image_shape, first.feature_names

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """The table's size as float32, the form training holds it in."""
        return 4 * self.n * self.p

    def limit(self, rows: int) -> "ShardSet":
        """The first `rows` rows (--limit)."""
        if rows >= self.n:
            return self
        keep, left = [], rows
        for s in self.shards:
            if left <= 0:
                break
            if s.n > left:
                s = _Head(s, left)
            keep.append(s)
            left -= s.n
        return ShardSet(keep, self.name, list(self.notes))

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a new float32 array, read shard by shard."""
        out = np.empty((hi - lo, self.p), np.float32)
        i = int(np.searchsorted(self.starts, lo, side="right") - 1)
        at = lo
        while at < hi:
            s0, s1 = int(self.starts[i]), int(self.starts[i + 1])
            take = min(hi, s1) - at
            self.shards[i].read(at - s0, at - s0 + take, out[at - lo:at - lo + take])
            at += take
            i += 1
        return out

    def to_dataset(self) -> data_mod.Dataset:
        """Every row in memory (--stream off, or a set that fits), checked shard by shard."""
        X = np.empty((self.n, self.p), np.float32)
        for i, s in enumerate(self.shards):
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            s.read(0, s.n, X[lo:hi])
            data_mod.check_finite(X[lo:hi], str(s.path), row_word="row")
        return data_mod.Dataset(X=X, image_shape=self.image_shape, name=self.name, notes=list(self.notes),
                                feature_names=self.feature_names,
                                feature_columns=None if self.feature_names is None else list(self.feature_names))


class _Head:
    """The first `n` rows of a shard."""

    def __init__(self, shard, n: int):
        self.shard, self.n = shard, n
        self.path, self.p, self.image_shape, self.feature_names = shard.path, shard.p, shard.image_shape, shard.feature_names

    def read(self, lo, hi, out):
        self.shard.read(lo, hi, out)


def _img(shape) -> str:
    return f" (images {shape[0]}x{shape[1]})" if shape else ""


def is_shard_spec(path: str) -> bool:
    """Whether a --data path names what `open_shards` reads: a folder, a glob, or one .npy/.parquet file."""
    p = Path(path)
    return p.is_dir() or glob.has_magic(path) or p.suffix.lower() in SUFFIXES


def open_shards(spec: str, columns=None, label_column=None, keep_id_columns: bool = False) -> ShardSet:
    """The shards a --data path names: a folder (its .npy/.parquet files, names sorted), a glob pattern
    (matches sorted), or one file. Reads headers and Parquet footers only."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{p}: a folder without .npy or .parquet shards")
    elif glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec)) if Path(f).suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{spec}: matches no .npy or .parquet file")
    elif not p.exists():
        raise DataError(f"{p}: no such file")
    else:
        files = [p]
    shards = [NpyShard(f) if f.suffix.lower() == ".npy" else ParquetShard(f, columns, label_column, keep_id_columns)
              for f in files]
    return ShardSet(shards, name=spec, notes=list(getattr(shards[0], "notes", [])))


def from_dataset(ds: data_mod.Dataset) -> ShardSet:
    return ShardSet([ArrayShard(ds.X, ds.name or "data", ds.image_shape, ds.feature_names)], ds.name or "data",
                    list(ds.notes))


# --- the validation pass -----------------------------------------------------------------------------

@dataclass
class Moments:
    """Running float64 count, mean and sum of squared deviations per feature (Chan et al. 1979)."""

    n: int = 0
    mean: Optional[np.ndarray] = None
    m2: Optional[np.ndarray] = None

    def add(self, X: np.ndarray) -> None:
        if not len(X):
            return
        X = X.astype(np.float64)
        nb, mb = len(X), X.mean(axis=0)
        m2b = ((X - mb) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta ** 2 * (self.n * nb / n)
        self.n = n

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


def scan(shards: ShardSet, likelihood: str, train_rows: Optional[Callable[[int, int], np.ndarray]] = None,
         moments: bool = False) -> Optional[Moments]:
    """One pass over every row: finite values and the likelihood's support, errors naming shard and row;
    with `moments`, the mean and std of the rows `train_rows(lo, hi)` (a boolean mask of rows lo..hi-1,
    numbered across shards) selects. Memory: one step of `SCAN_BYTES`."""
    step = max(1, SCAN_BYTES // (4 * shards.p))
    acc = Moments() if moments else None
    for i, s in enumerate(shards.shards):
        base = int(shards.starts[i])
        for lo in range(0, s.n, step):
            hi = min(s.n, lo + step)
            X = np.empty((hi - lo, shards.p), np.float32)
            s.read(lo, hi, X)
            data_mod.check_finite(X, str(s.path), feature_names=s.feature_names, row_offset=lo, row_word="row")
            if likelihood in ("bernoulli", "cbernoulli"):
                bad = (X < 0) | (X > 1)
                if bad.any():
                    r, c = (int(v[0]) for v in np.nonzero(bad))
                    raise DataError(f"{s.path}: the {likelihood} likelihood needs values in [0, 1], found "
                                    f"{X[r, c]:g} at row {lo + r}, column {c}; use --likelihood gaussian "
                                    f"--standardize for continuous data, or rescale it")
            if acc is not None:
                acc.add(X if train_rows is None else X[train_rows(base + lo, base + hi)])
    return acc


def std_floor(std: np.ndarray) -> np.ndarray:
    """Constant features keep std 1, as `data.fit_transform` does."""
    std = std.copy()
    std[~(std >= 1e-8)] = 1.0
    return std
