"""Per-row outputs (encodings, per-sample scores) written in chunks: memory independent of the row count.

`RowWriter(path, rank, world)` takes chunks of rows (`write`: {name: array with the rows first}) and writes
them to a part file of this rank beside `path`; `finish()` (every rank calls it) waits for all ranks, and
rank 0 assembles the parts in rank order into `path` (atomically), copying them piece by piece, then
removes them. The ranks must hold consecutive row ranges in rank order (`chunk_range`).

* .npz: each array's rows go to a raw part file; assembled into one ZIP64 archive of .npy members that
  `np.load` reads as `np.savez` would have written them (stored, not compressed).
* .parquet: a row group per chunk (pyarrow); assembled row group by row group.
* .csv: rows as `commands._common.write_table` writes them (floats as repr); assembled by copying.

In a table, an array of rows (n, d) becomes columns NAME_0 .. NAME_{d-1}, and (n, K, d) columns
NAME{k}_{j}, as `vaelens encode` names them.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np

from . import dist
from .io import atomic_write

SUFFIXES = (".npz", ".parquet", ".csv")


def chunk_range(n: int, chunk: int, rank: int, world: int) -> range:
    """This rank's chunks (numbers c: rows [c * chunk, (c + 1) * chunk)) of n rows, consecutive and in rank
    order. Chunk boundaries do not depend on the number of ranks, so neither does anything seeded by chunk."""
    n_chunks = -(-n // chunk)
    return range(n_chunks * rank // world, n_chunks * (rank + 1) // world)


def table_columns(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One column per value: (n,) as it is, (n, d) as NAME_j, (n, K, d) as NAME{k}_j."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.ndim == 1:
            out[name] = a
        elif a.ndim == 2:
            out.update({f"{name}_{j}": a[:, j] for j in range(a.shape[1])})
        else:
            out.update({f"{name}{k}_{j}": a[:, k, j] for k in range(a.shape[1]) for j in range(a.shape[2])})
    return out


class RowWriter:
    def __init__(self, path: Path, rank: int = 0, world: int = 1):
        self.path, self.rank, self.world = Path(path), rank, world
        self.kind = self.path.suffix.lower()
        if self.kind not in SUFFIXES:
            raise ValueError(f"{self.path}: RowWriter writes {', '.join(SUFFIXES)}")
        self.rows = 0
        self.meta: Dict[str, list] = {}  # npz: name -> [dtype, trailing shape]
        self._files: dict = {}
        self._pq = None  # parquet: this rank's ParquetWriter

    def _part(self, rank: int, what: str) -> Path:
        return self.path.with_name(f".{self.path.name}.part{rank}-of-{self.world}.{what}")

    def write(self, arrays: Dict[str, np.ndarray]) -> None:
        """Append a chunk of rows: every array has the same number of rows (its first axis)."""
        n = len(next(iter(arrays.values())))
        if self.kind == ".npz":
            for name, a in arrays.items():
                a = np.ascontiguousarray(a)
                self.meta.setdefault(name, [a.dtype.str, list(a.shape[1:])])
                if name not in self._files:
                    self._files[name] = open(self._part(self.rank, f"{name}.raw"), "wb")
                self._files[name].write(a.tobytes())
        elif self.kind == ".parquet":
            from .commands._common import require_pyarrow

            pa, pq = require_pyarrow()
            t = pa.table({k: np.asarray(v) for k, v in table_columns(arrays).items()})
            if self._pq is None:
                self._pq = pq.ParquetWriter(self._part(self.rank, "parquet"), t.schema)
            self._pq.write_table(t)
        else:
            from .commands._common import _write_csv

            buf = io.BytesIO()
            _write_csv(buf, table_columns(arrays))
            header, body = buf.getvalue().split(b"\n", 1)
            if "csv" not in self._files:
                self._files["csv"] = open(self._part(self.rank, "csv"), "wb")
                self.meta["header"] = header.decode()
            self._files["csv"].write(body)
        self.rows += n

    def finish(self) -> int:
        """Close this rank's part; rank 0 assembles every rank's into the output. Every rank calls it.
        Returns the number of rows written (rank 0: all ranks'; others: their own)."""
        for f in self._files.values():
            f.close()
        if self._pq is not None:
            self._pq.close()
        self._part(self.rank, "json").write_text(json.dumps({"rows": self.rows, "meta": self.meta}))
        dist.barrier()
        if self.rank != 0:
            return self.rows
        parts = [json.loads(self._part(r, "json").read_text()) for r in range(self.world)]
        total = sum(p["rows"] for p in parts)
        try:
            atomic_write(self.path, lambda f: self._assemble(f, parts, total))
        finally:
            for r in range(self.world):
                for p in self.path.parent.glob(f".{self.path.name}.part{r}-of-{self.world}.*"):
                    p.unlink(missing_ok=True)
        return total

    def _assemble(self, f, parts: list, total: int) -> None:
        if self.kind == ".npz":
            meta = next(p["meta"] for p in parts if p["meta"])
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, (dtype, trailing) in meta.items():
                    with z.open(f"{name}.npy", "w", force_zip64=True) as m:
                        np.lib.format.write_array_header_2_0(
                            m, {"descr": dtype, "fortran_order": False, "shape": (total, *trailing)})
                        for r in range(self.world):
                            src = self._part(r, f"{name}.raw")
                            if src.exists():
                                with open(src, "rb") as g:
                                    shutil.copyfileobj(g, m, 1 << 20)
        elif self.kind == ".parquet":
            from .commands._common import require_pyarrow

            _, pq = require_pyarrow()
            writer = None
            for r in range(self.world):
                src = self._part(r, "parquet")
                if not src.exists():
                    continue
                pf = pq.ParquetFile(src)
                writer = writer or pq.ParquetWriter(f, pf.schema_arrow)
                for g in range(pf.num_row_groups):
                    writer.write_table(pf.read_row_group(g))
            if writer is not None:
                writer.close()
        else:
            header = next(p["meta"]["header"] for p in parts if p["meta"])
            f.write((header + "\n").encode())
            for r in range(self.world):
                src = self._part(r, "csv")
                if src.exists():
                    with open(src, "rb") as g:
                        shutil.copyfileobj(g, f, 1 << 20)
