"""`vaelens train --tensorboard`: event files with one value per epoch, continued without duplicates on resume."""

import json
import sys

import pytest

from _helpers import cli as run

SCALARS = ["loss/train", "reconstruction/train", "kl/train", "loss/validation", "reconstruction/validation",
           "kl/validation", "train/learning_rate", "train/beta", "kl_per_dim/0", "kl_per_dim/1", "active_units"]


def _events(folder):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_event_files_hold_the_scalars_once_per_epoch_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "r"
    run("train", "--epochs", "3", "--latent-dim", "2", "--hidden", "16", "--out", out, "--no-progress",
        "--tensorboard", check_rc=0)
    ea = _events(out / "tensorboard")
    for tag in SCALARS:
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3], tag
    assert [e.step for e in ea.Images("reconstructions")] == [1, 3]  # the first, every 10th and the last
    assert [e.step for e in ea.Images("prior_samples")] == [1, 3]
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in ea.Scalars("loss/train")] == pytest.approx(losses, rel=1e-6)
    assert "tensorboard" not in (out / "config.json").read_text()  # a command option, not the model's config
    # an invocation that logged epochs 4 and 5 and died before its checkpoint: the resume trains them again
    with SummaryWriter(str(out / "tensorboard")) as w:
        for step in (4, 5):
            w.add_scalar("loss/train", 999.0, step)
    run("train", "--resume", out, "--epochs", "5", "--no-progress", "--tensorboard", check_rc=0)
    ea = _events(out / "tensorboard")
    for tag in SCALARS:
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3, 4, 5], tag
    assert 999.0 not in [e.value for e in ea.Scalars("loss/train")]
    assert [e.step for e in ea.Images("reconstructions")] == [1, 3, 5]
    hp = _events(out / "tensorboard" / "hparams")
    assert "hparam/train_loss" in hp.Tags()["scalars"]


def test_missing_tensorboard_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    p = run("train", "--epochs", "1", "--out", tmp_path / "r", "--tensorboard")
    assert p.returncode == 2 and "pip install 'vaelens[tensorboard]'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
