"""Issue 20 item 1: training data read in blocks (vaelens.shards, vaelens.stream).

The streamed order is not the in-memory path's (docs/streaming.md), so streaming and in-memory runs are
compared by their statistics: every row once per epoch, the same per-epoch sums, the same standardization;
and the streamed path is checked for its own promises: a pure function of (seed, epoch, rank, world size),
each rank reading only its own blocks, a mid-epoch resume that reads nothing before its step and ends with
the uninterrupted run's weights bit for bit, and errors that name the shard file and row.
"""

import os
import signal

import numpy as np
import pytest
import torch
from _helpers import cli
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vaelens import checkpoint as ck
from vaelens import data, shards, stream, train
from vaelens.config import RunConfig


def _ids(n=1000, p=3):
    """Row i holds (i, i, ...): a batch's rows say which rows it holds."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], p, axis=1)


def _stream_of(X, block_rows=16, window=4, val_fraction=0.0, seed=3, **cfg_kw):
    cfg = RunConfig().replace(model={"likelihood": "gaussian", "latent_dim": 2, "hidden": (8,)},
                              data={"val_fraction": val_fraction, **cfg_kw.pop("data", {})},
                              train={"stream": "on", "block_rows": block_rows, "shuffle_window": window, "seed": seed,
                                     "device": "cpu", **cfg_kw})
    return train.prepare(cfg, data.from_array(X, "ids"))


def _epoch_rows(sd, epoch, rank=0, world=1, bs=50, start=0):
    return torch.cat(list(sd.batches(epoch, rank, world, bs, start)))[:, 0].numpy().astype(int)


def test_every_training_row_once_per_epoch_in_a_seeded_order():
    _, sd, Xv = _stream_of(_ids(1000), val_fraction=0.1)
    held = set(Xv[:, 0].astype(int))
    assert len(held) == len(Xv) == sd.n_val and len(held) % 16 == 0  # whole blocks (1000 = 62 * 16 + 8)
    train_rows = sorted(set(range(1000)) - held)
    e0, e1 = _epoch_rows(sd, 0), _epoch_rows(sd, 1)
    # a permutation of exactly the training rows, so every per-epoch sum equals the in-memory path's
    assert sorted(e0) == sorted(e1) == train_rows
    assert not np.array_equal(e0, e1)  # each epoch its own order
    np.testing.assert_array_equal(_epoch_rows(sd, 0), e0)  # a function of (seed, epoch)
    assert not np.array_equal(_epoch_rows(_stream_of(_ids(1000), val_fraction=0.1, seed=4)[1], 0), e0)
    # two-level: a window of 4 blocks spans at most 64 rows' worth of distinct blocks per 64 consecutive rows
    assert len(set(e0[:64] // 16)) <= 4
    assert sd.steps(0, 0, 1, 50) == -(-len(train_rows) // 50)


def test_each_rank_reads_only_its_own_blocks_and_all_take_the_same_steps():
    _, sd, _ = _stream_of(_ids(1000))  # 63 blocks, the last one 8 rows
    shard = sd.source.shards[0]
    seen = {}
    for rank in range(3):
        reads = []
        real = shard.read
        shard.read = lambda lo, hi, out, reads=reads: (reads.append((lo, hi)), real(lo, hi, out))[1]
        try:
            seen[rank] = _epoch_rows(sd, 2, rank, 3, bs=7)
        finally:
            shard.read = real
        windows, _ = sd.epoch_windows(2, rank, 3)
        mine = {b for w in windows for b in w}
        assert {lo // 16 for lo, _ in reads} == mine  # it read its own blocks and no others
    assert len({len(v) for v in seen.values()}) == 1  # the same rows per rank, so the same steps
    rows = [set(v) for v in seen.values()]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])  # no row on two ranks
    assert len(set.union(*rows)) >= 1000 - 16 - 8  # at most one block left over this epoch (63 = 3 * 21)


@pytest.mark.parametrize("start", [1, 5, 13])
def test_resuming_at_a_step_reads_from_its_window_on(start):
    _, sd, _ = _stream_of(_ids(1000))
    whole = list(sd.batches(1, 0, 1, 24))
    reads = []
    shard = sd.source.shards[0]
    real = shard.read
    shard.read = lambda lo, hi, out: (reads.append(lo), real(lo, hi, out))[1]
    try:
        tail = list(sd.batches(1, 0, 1, 24, start_step=start))
    finally:
        shard.read = real
    assert len(tail) == len(whole) - start
    assert all(torch.equal(a, b) for a, b in zip(tail, whole[start:]))
    # the skipped steps were counted, not read: only the windows from the one holding row start * 24 on
    windows, _ = sd.epoch_windows(1, 0, 1)
    ends = np.cumsum([sd.sizes(w).sum() for w in windows])  # 64 rows a window, 56 for the one with the short block
    first = int(np.searchsorted(ends, start * 24, side="right"))
    assert first == {1: 0, 5: 1, 13: 4}[start] or start == 13 and first == 5
    assert {lo // 16 for lo in reads} == {b for w in windows[first:] for b in w}


def test_standardization_from_the_streaming_pass_equals_the_in_memory_one():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(3000, 5)) * [1, 10, 1e3, 1e-3, 5] + [0, -4, 1e4, 7, 0]).astype(np.float32)
    X[:, 4] = 2.5  # a constant feature keeps std 1 in both
    cfg_s, sd, _ = _stream_of(X, block_rows=100, data={"standardize": True})
    cfg_m, Xm, _ = train.prepare(cfg_s.replace(train={"stream": "off"}, transform=None), data.from_array(X, "x"))
    # float64 Chan updates against numpy's float64 pairwise sums: equal to rounding (measured 1e-16 relative)
    np.testing.assert_allclose(cfg_s.transform.mean, cfg_m.transform.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cfg_s.transform.std, cfg_m.transform.std, rtol=1e-12)
    # and the rows the stream trains on are the in-memory model input, row for row
    rows = torch.cat(list(sd.batches(0, 0, 1, 128))).numpy()
    order = np.lexsort(rows.T[::-1])
    np.testing.assert_array_equal(rows[order], Xm[np.lexsort(Xm.T[::-1])])


def _digits_stream(tmp_path, **train_kw):
    X = data.load_digits().X[:480]
    np.save(tmp_path / "d.npy", X)
    cfg = RunConfig().replace(data={"name": "file", "path": str(tmp_path / "d.npy"), "binarize": "dynamic"},
                              model={"latent_dim": 2, "hidden": (16,), "prior": "vamp", "prior_components": 8},
                              train={"epochs": 2, "batch_size": 16, "seed": 11, "device": "cpu", "stream": "on",
                                     "block_rows": 32, "shuffle_window": 3, **train_kw})
    src = stream.choose(cfg)
    assert isinstance(src, shards.ShardSet) and isinstance(src.shards[0], shards.NpyShard)
    return train.prepare(cfg, src)


def _fit(run, prepared, sigint_at_step=None, resume=False):
    cfg, X, Xv = prepared
    count = [0]

    def hook(opt, args, kwargs):
        count[0] += 1
        if count[0] == sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, as tests/test_reliability.py sends

    h = register_optimizer_step_pre_hook(hook)
    try:
        return train.fit(cfg, X, Xv, run_dir=run, resume=resume, handle_signals=True, checkpoint_interval_s=3600,
                         progress=False)
    finally:
        h.remove()


def test_streamed_run_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path):
    # dynamic binarization (a generator per block) and the VampPrior (pseudo-inputs from the seeded order)
    # both ride on the stream, so both must come back the same after the cut
    prepared = _digits_stream(tmp_path)
    ref = _fit(tmp_path / "ref", prepared)
    assert ref.interrupted is None and ref.history[-1]["val_loss"] < ref.history[0]["val_loss"] + 5
    # 480 rows: 15 blocks, 2 held out (~10%), 13 * 32 = 416 training rows, 26 steps an epoch
    cut = _fit(tmp_path / "cut", prepared, sigint_at_step=26 + 9)
    assert cut.interrupted == "SIGINT"
    assert (tmp_path / "cut" / ck.CKPT_DIR / ck.LATEST).read_text().strip() == "ckpt-000001-000009"
    done = _fit(tmp_path / "cut", prepared, resume=True)
    a, b = ref.module.state_dict(), done.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in done.history]


def test_bad_row_in_the_third_shard_is_named_by_file_and_row(tmp_path):
    X = data.load_digits().X[:400]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(4):
        part = X[i * 100:(i + 1) * 100].copy()
        if i == 2:
            part[37, 5] = np.inf
        np.save(folder / f"part-{i}.npy", part)
    p = cli("train", "--data", folder, "--stream", "on", "--block-rows", "32", "--out", tmp_path / "run", check_rc=2)
    lines = p.stderr.strip().splitlines()
    assert lines == [f"vaelens train: error: {folder / 'part-2.npy'}: NaN or infinite values at row 37, column '5'"]
    assert not (tmp_path / "run").exists()  # found before anything was written
    # a value outside the bernoulli likelihood's support, and a shard of another width, named the same way
    bad = X[200:300].copy()
    bad[4, 1] = 1.5
    np.save(folder / "part-2.npy", bad)
    p = cli("train", "--data", folder / "part-*.npy", "--stream", "on", "--block-rows", "32", "--out", tmp_path / "run",
            check_rc=2)
    assert f"{folder / 'part-2.npy'}: the bernoulli likelihood needs values in [0, 1], found 1.5 at row 4, " \
           f"column 1" in p.stderr
    np.save(folder / "part-2.npy", X[200:300, :60])
    p = cli("train", "--data", folder, "--out", tmp_path / "run", check_rc=2)
    assert f"{folder / 'part-2.npy'}: has 60 features, the first shard {folder / 'part-0.npy'} has 64" in p.stderr


def test_auto_streams_only_above_the_size_threshold(tmp_path, monkeypatch):
    np.save(tmp_path / "d.npy", data.load_digits().X[:300])
    cfg = RunConfig().replace(data={"name": "file", "path": str(tmp_path / "d.npy")})
    assert stream.choose(cfg) is None  # 77 kB: loaded as before, by data.load
    assert stream.choose(cfg.replace(train={"stream": "off"})) is None
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1000)
    assert stream.choose(cfg) is not None and stream.choose(cfg.replace(train={"stream": "off"})) is None


def test_parquet_shards_read_by_row_group_give_the_npy_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    X = data.load_digits().X[:300]
    for i in range(2):
        part = X[i * 150:(i + 1) * 150]
        t = pa.table({f"f{j}": part[:, j] for j in range(X.shape[1])} | {"label": np.arange(150), "id": np.arange(150)})
        pq.write_table(t, tmp_path / f"p{i}.parquet", row_group_size=40)
    src = shards.open_shards(str(tmp_path / "p*.parquet"), label_column="label")
    assert (src.n, src.p) == (300, 64) and src.feature_names[:2] == ["f0", "f1"]  # without label and id
    assert src.notes == [f"{tmp_path / 'p0.parquet'}: left out column(s) id, named like row identifiers; "
                         f"--keep-id-columns uses them"]
    np.testing.assert_array_equal(src.read(0, 300), X)  # across row groups and files
    np.testing.assert_array_equal(src.read(139, 161), X[139:161])
    # trained on through the CLI: the feature columns are saved with the run, as for a table read whole
    run = tmp_path / "run"
    args = ["train", "--data", tmp_path / "p*.parquet", "--label-column", "label", "--stream", "on", "--block-rows",
            "32", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress"]
    assert "streamed in blocks of 32 rows" in cli(*args, "--out", run, check_rc=0).stdout
    assert ck.load_config(run).data.feature_columns == tuple(f"f{j}" for j in range(64))
    p = cli(*args, "--report", "--out", tmp_path / "run2", check_rc=2)
    assert "--report needs the training data in memory, and this run streams it" in p.stderr


def test_streamed_encode_writes_chunks_that_equal_the_in_memory_output(tmp_path, monkeypatch):
    # issue 20 item 2: a table that streams is encoded STREAM_CHUNK rows at a time through chunked.RowWriter.
    # mu and sigma do not depend on the chunking (aligned with VAE.encode's batches), so they are equal exactly;
    # z is drawn per chunk with the seed (--seed, chunk), so it differs from the in-memory draw, but not with
    # the number of ranks (checked by assembling two ranks' parts, as under torchrun)
    from vaelens import chunked
    from vaelens.commands import encode

    run = tmp_path / "run"
    cli("train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--out", run, "--no-progress", check_rc=0)
    X = np.tile(data.load_digits().X, (6, 1))  # 9000 rows: 2 chunks of 8192 rows, the second short
    np.save(tmp_path / "x.npy", X)
    for mode, limit in (("mem", 10 ** 12), ("stream", 1000)):
        monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", limit)
        for ext in (".npz", ".parquet"):
            cli("encode", run, "--data", tmp_path / "x.npy", "--samples", "2", "--out", tmp_path / f"{mode}{ext}",
                check_rc=0)
    a, b = np.load(tmp_path / "mem.npz"), np.load(tmp_path / "stream.npz")
    assert sorted(a.keys()) == sorted(b.keys()) == ["index", "mu", "sigma", "z"]
    for k in ("index", "mu", "sigma"):
        np.testing.assert_array_equal(a[k], b[k])
    assert b["z"].shape == (9000, 2, 2) and not np.array_equal(a["z"], b["z"])
    pq = pytest.importorskip("pyarrow.parquet")
    ta, tb = pq.read_table(tmp_path / "mem.parquet"), pq.read_table(tmp_path / "stream.parquet")
    assert ta.schema == tb.schema and ta.column("mu_1").equals(tb.column("mu_1"))
    # two ranks' parts, assembled by rank 0 in rank order, give the one-process file
    out = tmp_path / "two.npz"
    writers = [chunked.RowWriter(out, r, 2) for r in range(2)]
    for r, w in enumerate(writers):
        for c in chunked.chunk_range(len(b["mu"]), 3000, r, 2):
            w.write({k: b[k][c * 3000:(c + 1) * 3000] for k in b.keys()})
    assert writers[1].finish() == 6000 and writers[0].finish() == 9000  # chunks [0, 1) and [1, 3)
    two = np.load(out)
    assert all(np.array_equal(two[k], b[k]) for k in b.keys())
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]  # the parts are gone
    assert encode.STREAM_CHUNK % 4096 == 0


def test_streamed_evaluate_gives_the_in_memory_rows_and_figures(tmp_path, monkeypatch):
    # issue 20 item 2: chunks are whole multiples of the in-memory batches, the ELBO's generator runs through
    # every chunk and each row's IWAE generator is seeded by its global row number (row_offset), so the per-row
    # values are the in-memory ones bit for bit; the summaries are float64 running moments (Chan et al.), equal
    # to numpy's two-pass figures to rounding (measured 1e-15 relative; rtol 1e-9 leaves room for other BLAS)
    import json

    from vaelens import evaluate_stream
    from vaelens.api import VAE

    run = tmp_path / "run"
    cli("train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--out", run, "--no-progress", check_rc=0)
    vae = VAE.load(run)
    X = np.tile(data.load_digits().X, (8, 1))  # 12000 rows: 2 chunks of 8192 rows, the second short
    mem = vae.evaluate(X, iw_samples=64, seed=3)
    Xm, rows = vae.model_input(X, 3), {}
    s = evaluate_stream.evaluate_stream(vae.module_, lambda lo, hi, c: Xm[lo:hi], len(X), X.shape[1], 64, seed=3,
                                        aggregate_rows=len(X), on_chunk=rows.__setitem__)
    assert sorted(rows) == [0, 8192] and s["streamed"] == {"chunk_rows": 8192, "aggregate_rows": 12000}
    for k in ("elbo", "rec", "kl", "log_likelihood"):
        np.testing.assert_array_equal(np.concatenate([rows[lo][k] for lo in (0, 8192)]), getattr(mem, k))
    d = mem.to_dict()
    for k in ("elbo", "elbo_se", "kl", "log_likelihood", "log_likelihood_se", "kl_per_dim", "activity"):
        np.testing.assert_allclose(s[k], d[k], rtol=1e-9)
    # every row's q(z|x) kept (aggregate_rows >= n): I(x; z) and the aggregate KL are the in-memory ones
    assert (s["mutual_information"], s["aggregate_kl"]) == (d["mutual_information"], d["aggregate_kl"])
    # through the CLI: a .npy over the (lowered) size threshold streams; the rest as above
    np.save(tmp_path / "x.npy", X)
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1000)
    args = ["evaluate", run, "--data", tmp_path / "x.npy", "--iw-samples", "64", "--seed", "3", "--no-progress"]
    p = cli(*args, "--json", tmp_path / "s.json", check_rc=0)
    assert "a subsample of 10000 rows (seeded by --seed)" in p.stdout
    j = json.loads((tmp_path / "s.json").read_text())
    assert j["streamed"] == {"chunk_rows": 8192, "aggregate_rows": 10000} and j["n"] == 12000
    np.testing.assert_allclose([j["log_likelihood"], j["elbo"]], [d["log_likelihood"], d["elbo"]], rtol=1e-9)
    p = cli(*args, "--per-sample", "--json", tmp_path / "p.json", check_rc=2)
    assert "--per-sample would hold every row's values" in p.stderr and not (tmp_path / "p.json").exists()
