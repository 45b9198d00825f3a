import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vaelens import checkpoint as ck
from vaelens import data, train
from vaelens.checkpoint import TrainState
from vaelens.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelens.errors import TrainingDiverged
from vaelens.model import VAEModule

from _helpers import prepared, small_cfg


def test_same_seed_same_weights(tmp_path):
    cfg, X, Xv = prepared(small_cfg())
    a = train.fit(cfg, X, Xv, progress=False)
    b = train.fit(cfg, X, Xv, progress=False)
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    cfg2, X2, Xv2 = prepared(small_cfg(seed=2))
    c = train.fit(cfg2, X2, Xv2, progress=False)
    assert not torch.equal(a.module.encoder.mu_head.weight, c.module.encoder.mu_head.weight)


def test_run_directory_contents(tmp_path):
    cfg, X, Xv = prepared(small_cfg(epochs=4))
    r = train.fit(cfg, X, Xv, run_dir=tmp_path / "run", progress=False, checkpoint_interval_s=0)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.safetensors", "metrics.jsonl", "summary.json",
                                               "checksums.json", "checkpoints"}
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert {"train_loss", "train_rec", "train_kl", "val_loss", "kl_per_dim", "lr"} <= set(lines[0])
    assert len(lines[0]["kl_per_dim"]) == 3
    best = load_file(run / "model.safetensors")
    for k, v in r.module.state_dict().items():
        assert torch.equal(v, best[k])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == r.best_epoch and summary["epochs_run"] == 4
    cfg_back = RunConfig.from_json((run / "config.json").read_text())
    assert cfg_back.model.input_dim == 64 and cfg_back.model.image_shape == (8, 8)


def test_resume_continues_to_same_weights(tmp_path):
    cfg, X, Xv = prepared(small_cfg(epochs=4))
    full = train.fit(cfg, X, Xv, progress=False)
    half = cfg.replace(train={"epochs": 2})
    train.fit(half, X, Xv, run_dir=tmp_path / "r", progress=False, checkpoint_interval_s=0)
    resumed = train.fit(cfg, X, Xv, run_dir=tmp_path / "r", resume=True, progress=False)
    assert resumed.epochs_run == 4
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]


def test_early_stopping_and_warmup():
    cfg, X, Xv = prepared(small_cfg(epochs=60, patience=2, lr=0.05, warmup_epochs=4))
    r = train.fit(cfg, X, Xv, progress=False)
    assert r.stopped_early and r.epochs_run < 60
    assert r.history[0]["beta"] == pytest.approx(0.25) and r.history[3]["beta"] == pytest.approx(1.0)


def test_iwae_objective_trains():
    cfg, X, Xv = prepared(small_cfg(epochs=3, objective="iwae", iw_samples=5))
    r = train.fit(cfg, X, Xv, progress=False)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    cfg, X, Xv = prepared(small_cfg(epochs=3))
    X = X.copy()
    X[5, 3] = np.nan  # bypasses validation, as a corrupted tensor would
    with pytest.raises(TrainingDiverged) as e:
        train.fit(cfg, X, Xv, progress=False)
    msg = str(e.value)
    assert "epoch 1, step" in msg and "non-finite" in msg and "reconstruction" in msg and "--lr" in msg


def test_gaussian_table_data_standardized(table_data):
    cfg = RunConfig(data=DataConfig(standardize=True), model=ModelConfig(latent_dim=3, hidden=(32,),
                    likelihood="gaussian"), train=TrainConfig(epochs=3))
    cfg, X, Xv = train.prepare(cfg, data.Dataset(X=table_data, name="table"))
    assert cfg.transform is not None and len(cfg.transform.mean) == 12
    assert abs(float(X.mean())) < 0.2
    r = train.fit(cfg, X, Xv, progress=False)
    assert math.isfinite(r.best_val_loss)


def test_dynamic_binarization_is_seeded_and_unbiased():
    X = torch.full((20000, 5), 0.25)
    a = train.binarize_dynamic(X, seed=3, parts=4)
    assert torch.equal(a, train.binarize_dynamic(X, seed=3, parts=4))
    assert not torch.equal(a, train.binarize_dynamic(X, seed=4, parts=4))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    # 100000 Bernoulli(0.25) draws: the mean's standard error is 0.0014; allow five of them
    assert abs(a.mean().item() - 0.25) < 0.007
    # each block has its own stream: no two blocks repeat each other
    assert not torch.equal(a[:5000], a[5000:10000])


def test_dynamic_binarization_does_not_depend_on_chunks_or_a_reused_buffer():
    # drawn chunk by chunk into a reused buffer (as fit does each epoch), the draw is the same as at once
    X = torch.rand(9000, 7)
    whole = train.binarize_dynamic(X, seed=5, parts=2, chunk_rows=10**9)
    buf = torch.full_like(X, 0.5)  # stale contents must not show through
    out = train.binarize_dynamic(X, seed=5, parts=2, out=buf, chunk_rows=333)
    assert out is buf and torch.equal(out, whole)
    assert torch.equal(train.binarize_dynamic(X, seed=5, parts=2, chunk_rows=4500), whole)
    assert out.dtype == torch.float32 and set(out.unique().tolist()) == {0.0, 1.0}


def test_bf16_autocast_on_cpu_trains_close_to_float32():
    cfg, X, Xv = prepared(small_cfg(epochs=5))
    full = train.fit(cfg, X, Xv, progress=False)
    half = train.fit(cfg.replace(train={"bf16": True}), X, Xv, progress=False)
    # autocast really ran: bf16 rounding of the Linear products changes the weights...
    assert not torch.equal(full.module.encoder.mu_head.weight, half.module.encoder.mu_head.weight)
    # ...but not the training: the losses agree within 2% (about 0.9 nats of ~44; seeded, measured at most 0.005%)
    for a, b in zip(full.history, half.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)
    # the distributions' parameters stay float32 under autocast, so log-densities sum in full precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qz = half.module.encoder(torch.as_tensor(X[:8]))
        px = half.module.decoder(qz.rsample())
    assert qz.mean.dtype == qz.stddev.dtype == px.logits.dtype == torch.float32


def test_train_state_round_trips_through_a_checkpoint(tmp_path):
    # a mid-epoch TrainState with two ranks' generators: every field comes back exactly, each rank gets its own
    # generator, and only rank 0 carries the partial sums (they are every rank's)
    cfg, _, _ = prepared(small_cfg())
    module = VAEModule(cfg.model)
    opt = train.build_optimizer(cfg, list(module.parameters()), torch.device("cpu"))
    best = {k: v + 1 for k, v in module.state_dict().items()}
    sums = torch.tensor([1 / 3, -2 / 7, 1e-300, 64.0], dtype=torch.float64)
    state = TrainState(epoch=2, step=5, best_val=41.25, best_epoch=2, bad_epochs=0, sums=sums,
                       kl_dim_sum=torch.tensor([0.1, 0.2, 1 / 3], dtype=torch.float64), best=best)
    rank1 = torch.Generator().manual_seed(9).get_state()
    rank0 = torch.get_rng_state()  # this process's generator goes in as rank 0's
    ck.save_train_state(tmp_path, module, opt, None, state, rngs={"rng.torch.rank1": rank1})
    for rank in (0, 1):
        back, rng = ck.load_train_state(tmp_path, VAEModule(cfg.model), opt, None, rank=rank)
        assert (back.epoch, back.step, back.best_val, back.best_epoch, back.bad_epochs) == (2, 5, 41.25, 2, 0)
        assert all(torch.equal(back.best[k], best[k]) for k in best)
        assert torch.equal(rng["torch"], rank1 if rank else rank0)
        if rank == 0:
            assert torch.equal(back.sums, sums) and torch.equal(back.kl_dim_sum, state.kl_dim_sum)
        else:
            assert back.sums is None and back.kl_dim_sum is None
    # a checkpoint written before best weights were kept with it: the run's model.safetensors stands in
    folder = ck.checkpoint_candidates(tmp_path)[0]
    (folder / ck.BEST).unlink()
    ck.write_checksums(folder, ck.CKPT_FILES)
    ck.save_run_weights(tmp_path, best)
    back, _ = ck.load_train_state(tmp_path, VAEModule(cfg.model), opt, None)
    assert all(torch.equal(back.best[k], best[k]) for k in best)
