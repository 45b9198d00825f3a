"""Training data that does not fit in memory: read in blocks, shuffled in two levels, each rank its own blocks.

The table (a `shards.ShardSet`) is cut into blocks of `block_rows` consecutive rows. Validation holds out
whole blocks, chosen with the seed. Each epoch:

1. the training blocks are permuted with (seed, epoch), the same on every rank;
2. rank r of w takes permuted blocks r, r + w, r + 2w, ... (k = blocks // w each; the w - 1 or fewer left
   over are skipped this epoch, other ones the next), so a rank reads only its own blocks;
3. a rank's blocks are grouped in windows of `shuffle_window` blocks, and the rows of each window are
   permuted with (seed, epoch, rank, window);
4. batches are consecutive slices of that row order; every rank stops at the same row count (the smallest
   of the ranks', which differ only when the table's short last block is among them) so all take the
   same number of steps.

Everything is a pure function of (seed, epoch, rank, world size, block_rows, shuffle_window), so a run
interrupted mid-epoch resumes exactly: step s starts at row s * batch of the order, found by arithmetic
(which window, where in it) without reading the batches before it. One process sees every training row
exactly once per epoch. The order is not the in-memory path's (one permutation of all rows): streaming
and in-memory runs of the same data train on the same rows and statistics but in another order, so their
weights differ (docs/streaming.md).

Memory: two windows (the one being trained on and the next, read by a helper thread while the steps run),
`2 * block_rows * shuffle_window * features * 4` bytes, plus a validation pass's step.
"""

from __future__ import annotations

import glob
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from . import data as data_mod
from . import shards
from .config import RunConfig, Transform
from .errors import ConfigError, DataError
from .train_parts import VAL_SEED_OFFSET as _VAL_SEED_OFFSET

# --stream auto streams a table whose float32 copy is larger than this, and loads a smaller one: a fixed
# size, not a share of this machine's memory, so the same command trains the same model on every machine.
AUTO_STREAM_BYTES = 512 << 20
# Held-out blocks up to this size (float32) are read once and kept, as the in-memory path keeps its
# validation rows; larger ones are read again at every validation pass.
VAL_IN_MEMORY_BYTES = 64 << 20


def _rng(*ints: int) -> np.random.Generator:
    return np.random.default_rng([int(v) % (2 ** 63) for v in ints])


def choose(cfg: RunConfig) -> Optional[shards.ShardSet]:
    """The shard set `vaelens train` reads for `cfg`, or None to load the data as before (`data.load`).

    A folder or glob of shards is always a shard set (`prepare` loads it in memory when it is not
    streamed); one .npy/.parquet file is one when it is streamed: --stream on, or auto and its float32
    size exceeds AUTO_STREAM_BYTES. Reads headers and footers only.
    """
    d = cfg.data
    if d.name != "file" or not shards.is_shard_spec(d.path):
        return None
    several = Path(d.path).is_dir() or glob.has_magic(d.path)
    if cfg.train.stream == "off" and not several:
        return None
    src = shards.open_shards(d.path, columns=d.columns or d.feature_columns, label_column=d.label_column,
                             keep_id_columns=d.keep_id_columns)
    if d.limit is not None:
        src = src.limit(d.limit)
    return src if several or streams(cfg, src) else None


def streams(cfg: RunConfig, src: shards.ShardSet) -> bool:
    """Whether `src` is trained on by streaming (else it is loaded in memory)."""
    return cfg.train.stream == "on" or (cfg.train.stream == "auto" and src.nbytes > AUTO_STREAM_BYTES)


@dataclass
class StreamData:
    """A prepared training set read block by block; `vaelens.train.fit` takes it in place of an array."""

    source: shards.ShardSet
    block_rows: int
    window: int
    train_blocks: np.ndarray  # sorted block numbers
    val_blocks: np.ndarray
    seed: int
    binarize: str = "none"
    mean: Optional[np.ndarray] = None  # float32 standardization, as data.apply_transform applies it
    std: Optional[np.ndarray] = None
    stream_val: bool = False  # the held-out blocks are read at every validation pass (too large to keep)

    # --- blocks -------------------------------------------------------------------------------
    def sizes(self, blocks: np.ndarray) -> np.ndarray:
        return np.minimum(self.block_rows, self.source.n - np.asarray(blocks, np.int64) * self.block_rows)

    @property
    def n_train(self) -> int:
        return int(self.sizes(self.train_blocks).sum())

    @property
    def n_val(self) -> int:
        return int(self.sizes(self.val_blocks).sum())

    def read_block(self, b: int, val: bool = False) -> np.ndarray:
        """Block b's rows as model input: standardized, or binarized once with a seed of its own."""
        lo = int(b) * self.block_rows
        X = self.source.read(lo, min(self.source.n, lo + self.block_rows))
        if self.mean is not None:
            X = ((X - self.mean) / self.std).astype(np.float32)
        if self.binarize == "static":
            X = (_rng(self.seed + (_VAL_SEED_OFFSET if val else 0), b, 1).random(X.shape, dtype=np.float32)
                 < X).astype(np.float32)
        return X

    def read_blocks(self, blocks, val: bool = False) -> np.ndarray:
        return np.concatenate([self.read_block(b, val) for b in blocks]) if len(blocks) else \
            np.empty((0, self.source.p), np.float32)

    # --- the epoch's order ----------------------------------------------------------------------
    def epoch_windows(self, epoch: int, rank: int, world: int):
        """(this rank's windows: lists of block numbers, rows every rank trains on this epoch)."""
        order = _rng(self.seed, epoch, 0).permutation(self.train_blocks)
        k = len(order) // world
        if k == 0:
            raise ConfigError(f"{len(order)} training blocks of {self.block_rows} rows cannot be shared among "
                              f"{world} processes; lower --block-rows")
        per_rank = [order[r:k * world:world] for r in range(world)]
        n_epoch = min(int(self.sizes(m).sum()) for m in per_rank)
        mine = per_rank[rank]
        return [mine[i:i + self.window] for i in range(0, k, self.window)], n_epoch

    def steps(self, epoch: int, rank: int, world: int, batch_size: int) -> int:
        return max(1, math.ceil(self.epoch_windows(epoch, rank, world)[1] / batch_size))

    def _window(self, epoch: int, rank: int, wi: int, blocks, dyn_seed: Optional[int]):
        """A window's rows (as a tensor) and their permutation; with `dyn_seed`, each block's values drawn
        as Bernoulli(x) with a generator of its own, so a block's bits do not depend on where reading began."""
        X = self.read_blocks(blocks)
        if dyn_seed is not None:
            at = 0
            for b, m in zip(blocks, self.sizes(blocks)):
                x = X[at:at + m]
                x[...] = _rng(dyn_seed, b, 2).random(x.shape, dtype=np.float32) < x
                at += m
        perm = _rng(self.seed, epoch, rank, wi, 3).permutation(len(X))
        return torch.from_numpy(X), torch.from_numpy(perm)

    def batches(self, epoch: int, rank: int, world: int, batch_size: int, start_step: int = 0,
                device: torch.device = torch.device("cpu"), dyn_seed: Optional[int] = None) -> Iterator[torch.Tensor]:
        """The epoch's batches from step `start_step` on, the next window read while the steps run."""
        windows, n_epoch = self.epoch_windows(epoch, rank, world)
        sizes = [int(self.sizes(w).sum()) for w in windows]
        cum = np.concatenate([[0], np.cumsum(sizes)])
        pos = start_step * batch_size
        if pos >= n_epoch:
            return
        wi = int(np.searchsorted(cum, pos, side="right") - 1)  # the window holding row `pos` of the order
        pool = ThreadPoolExecutor(1, thread_name_prefix="vaelens-read")
        try:
            fut = pool.submit(self._window, epoch, rank, wi, windows[wi], dyn_seed)
            pending, have = [], 0
            while wi < len(windows) and pos < n_epoch:
                buf, perm = fut.result()
                if wi + 1 < len(windows) and cum[wi + 1] < n_epoch:
                    fut = pool.submit(self._window, epoch, rank, wi + 1, windows[wi + 1], dyn_seed)
                a, end = int(pos - cum[wi]), int(min(sizes[wi], n_epoch - cum[wi]))
                while a < end:
                    take = min(batch_size - have, end - a)
                    pending.append(buf[perm[a:a + take]])
                    a, have, pos = a + take, have + take, pos + take
                    if have == batch_size or pos == n_epoch:
                        xb = pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, have = [], 0
                        yield xb.to(device)
                wi += 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def head(self, k: int) -> np.ndarray:
        """The first k rows of epoch 0's order for one process (without dynamic binarization): a fixed,
        seeded sample, e.g. the VampPrior's initial pseudo-inputs."""
        windows, _ = self.epoch_windows(0, 0, 1)
        rows, got = [], 0
        for wi, blocks in enumerate(windows):
            buf, perm = self._window(0, 0, wi, blocks, None)
            rows.append(buf[perm[:k - got]])
            got += len(rows[-1])
            if got >= k:
                break
        return torch.cat(rows).numpy()

    def val_batches(self, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        """The held-out rows in block order, in batches of `batch_size` (the last may be smaller)."""
        pending, have = [], 0
        for b in self.val_blocks:
            x = torch.from_numpy(self.read_block(b, val=True))
            while len(x):
                take = min(batch_size - have, len(x))
                pending.append(x[:take])
                x, have = x[take:], have + take
                if have == batch_size:
                    yield torch.cat(pending).to(device)
                    pending, have = [], 0
        if pending:
            yield torch.cat(pending).to(device)


def held_out_blocks(n_blocks: int, val_fraction: float, seed: int, block_rows: int) -> np.ndarray:
    """A seeded choice of round(n_blocks * val_fraction) blocks (at least one when val_fraction > 0)."""
    n_val = int(round(n_blocks * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val and n_blocks - n_val < 1:
        raise DataError(f"only {n_blocks} block(s) of {block_rows} rows: too few to hold out whole blocks for "
                        f"validation; lower --block-rows, or --val-fraction 0")
    return np.sort(_rng(seed, 0, 4).permutation(n_blocks)[:n_val])


def prepare_stream(cfg: RunConfig, src: shards.ShardSet, val=None):
    """`vaelens.train.prepare` for streamed data: (cfg, StreamData, X_val or None).

    One pass over the rows checks them (naming shard and row) and, for --standardize, computes the
    training blocks' mean and std in float64. X_val is the held-out blocks' rows when they are small
    enough to keep (else they are read at each validation pass), or `val` (a Dataset) prepared in memory.
    """
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.binarize != "none" and m.likelihood == "gaussian":
        raise ConfigError("data.binarize needs a bernoulli likelihood, not gaussian")
    if d.standardize and m.likelihood != "gaussian":
        raise ConfigError("data.standardize makes values leave [0, 1]; use it with --likelihood gaussian")
    if m.input_dim is not None and src.p != m.input_dim:
        raise DataError(f"{src.name}: has {src.p} features, the model expects {m.input_dim}")
    n_blocks = -(-src.n // t.block_rows)
    val_blocks = (held_out_blocks(n_blocks, d.val_fraction, t.seed, t.block_rows) if val is None
                  else np.empty(0, np.int64))
    is_val = np.zeros(n_blocks, bool)
    is_val[val_blocks] = True
    fit_stats = d.standardize and cfg.transform is None
    acc = shards.scan(src, m.likelihood, lambda lo, hi: ~is_val[np.arange(lo, hi) // t.block_rows], fit_stats)
    transform = cfg.transform
    if fit_stats:
        transform = Transform(mean=tuple(float(v) for v in acc.mean), std=tuple(float(v) for v in shards.std_floor(acc.std())))
    if m.input_dim is None:
        m = replace(m, input_dim=src.p, image_shape=src.image_shape)
    if d.feature_columns is None and src.feature_names is not None:
        d = replace(d, feature_columns=tuple(src.feature_names))
    cfg = cfg.replace(data=d, model=m, transform=transform).validate()
    use = transform if d.standardize else None
    sd = StreamData(source=src, block_rows=t.block_rows, window=t.shuffle_window,
                    train_blocks=np.flatnonzero(~is_val), val_blocks=val_blocks, seed=t.seed, binarize=d.binarize,
                    mean=None if use is None else np.asarray(use.mean, np.float32),
                    std=None if use is None else np.asarray(use.std, np.float32))
    if val is not None:
        X_val = data_mod.apply_transform(val.X, use)
        data_mod.validate(X_val, m.likelihood, "validation data", cfg.model.input_dim)
        if d.binarize != "none":
            X_val = data_mod.binarize_static(X_val, t.seed + _VAL_SEED_OFFSET)
        return cfg, sd, X_val
    if not len(val_blocks):
        return cfg, sd, None
    if 4 * sd.n_val * src.p <= VAL_IN_MEMORY_BYTES:
        return cfg, sd, sd.read_blocks(val_blocks, val=True)
    sd.stream_val = True
    return cfg, sd, None
