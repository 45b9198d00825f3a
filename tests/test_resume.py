"""Issue 17 items 3 and 4: an honest --resume (refusals, recorded changes, nothing left to do), finite
options, and a diverged run that leaves nothing blocking a retry."""

import json
import typing

import pytest

from vaelens import checkpoint as ck
from vaelens import config
from vaelens.cli import main

TINY = ["--latent-dim", "2", "--hidden", "16", "--limit", "200", "--batch-size", "100", "--no-progress",
        "--checkpoint-every", "0"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("vaelens train: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-epoch digits run, trained once; tests that change it copy it first."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def _other_value(opt: config.Option, current):
    """A command-line value for the flag of `opt` that differs from `current`, or None for a store_true flag."""
    typ = opt.type
    if typing.get_origin(typ) is typing.Union:
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is bool:
        assert current is False
        return None
    if opt.choices:
        return next(c for c in opt.choices if c != current)
    if typing.get_origin(typ) is tuple:
        return "a,b" if typing.get_args(typ)[0] is str else "7"
    if typ is int:
        return str((current or 1) + 3)
    if typ is float:
        return str((current or 0.25) / 2)
    return "something-else"


_NON_RESUMABLE = [o for o in config.options(role=None) if o.flag is not None
                  and o.key not in ("train.epochs", "train.patience", "train.device")]


@pytest.mark.parametrize("opt", _NON_RESUMABLE, ids=lambda o: o.flag)
def test_every_non_resumable_flag_is_refused(tiny_run, opt, capsys):
    cfg = ck.load_config(tiny_run)
    before = (tiny_run / ck.CONFIG).read_bytes()
    value = _other_value(opt, getattr(getattr(cfg, opt.section), opt.name))
    argv = ["train", "--resume", str(tiny_run), opt.flag] + ([] if value is None else [value])
    assert main(argv) == 2
    err = _error(capsys)
    assert f"--resume {tiny_run}: cannot change {opt.name} (" in err
    assert (tiny_run / ck.CONFIG).read_bytes() == before
    assert not (tiny_run / "resumes.json").exists()


def test_all_refusals_in_one_line(tiny_run, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n3,4\n")
    assert main(["train", "--resume", str(tiny_run), "--latent-dim", "4", "--data", str(other), "--seed", "5",
                 "--out", str(tmp_path / "x")]) == 2
    err = _error(capsys)
    assert "latent_dim (4 given, run has 2)" in err
    assert f"data ({other} given, run used digits)" in err
    assert "seed (5 given, run has 0)" in err and "out (--out is for a new run)" in err


def test_same_values_are_not_refusals(run_copy, capsys):
    # repeating the run's own settings changes nothing, so it is no reason to refuse
    assert main(["train", "--resume", str(run_copy), "--latent-dim", "2", "--hidden", "16", "--data", "digits",
                 "--epochs", "3", "--no-progress"]) == 0


def test_more_epochs_are_applied_and_recorded(run_copy, capsys):
    before = json.loads((run_copy / ck.CONFIG).read_text())
    assert main(["train", "--resume", str(run_copy), "--epochs", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed at epoch 2; changed epochs 2 -> 4 (recorded in resumes.json)" in out
    assert "epochs 4" in out
    after = json.loads((run_copy / ck.CONFIG).read_text())
    assert after["train"]["epochs"] == 4
    after["train"]["epochs"] = 2
    assert after == before  # nothing else in config.json changed
    resumes = json.loads((run_copy / "resumes.json").read_text())
    assert len(resumes) == 1 and resumes[0]["from_epoch"] == 2
    assert resumes[0]["changed"] == {"train.epochs": [2, 4]} and resumes[0]["at"].endswith("Z")
    summary = ck.read_summary(run_copy)
    assert summary["epochs_run"] == 4 and summary["resumes"] == resumes
    ck.verify_checksums(run_copy, [ck.CONFIG, ck.WEIGHTS, ck.SUMMARY])


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_epochs_at_or_below_what_was_run(run_copy, epochs, capsys):
    before = (run_copy / ck.CONFIG).read_bytes()
    assert main(["train", "--resume", str(run_copy), "--epochs", epochs]) == 2
    assert (f"the run has already trained 2 epochs, so --epochs {epochs} adds none; pass --epochs above 2"
            in _error(capsys))
    assert (run_copy / ck.CONFIG).read_bytes() == before


def test_plain_resume_of_a_finished_run_says_nothing_to_do(run_copy, capsys):
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "the run finished its 2 epochs; nothing to resume. Pass --epochs above 2" in _error(capsys)


def test_stopped_early_run_needs_more_patience(tmp_path, capsys):
    out = tmp_path / "run"
    # lr so small that nothing improves: early stopping after 1 bad epoch
    assert main(["train", "--epochs", "20", "--patience", "1", "--lr", "1e-9", "--out", str(out), *TINY]) == 0
    done = ck.read_summary(out)["epochs_run"]
    assert ck.read_summary(out)["stopped_early"] and done < 20
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "30"]) == 2
    assert f"the run stopped early at epoch {done}" in _error(capsys)
    assert main(["train", "--resume", str(out), "--epochs", str(done + 1), "--patience", "5", "--no-progress"]) == 0
    changed = json.loads((out / "resumes.json").read_text())[0]["changed"]
    assert changed == {"train.epochs": [20, done + 1], "train.patience": [1, 5]}


# --- item 4: finite options, divergence ------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--beta", "nan"), ("--free-bits", "inf"),
                                        ("--grad-clip", "nan"), ("--weight-decay", "inf"),
                                        ("--lr-gamma", "nan")])
def test_non_finite_options_are_refused(tmp_path, flag, value, capsys):
    out = tmp_path / "run"
    assert main(["train", flag, value, "--out", str(out), *TINY]) == 2
    name = flag[2:].replace("-", "_")
    assert f"train.{name} ({flag}) must be a finite number, got {value}" in _error(capsys)
    assert not out.exists()


def test_diverged_run_leaves_nothing_that_blocks_a_retry(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--lr", "1e30", "--epochs", "3", "--out", str(out), *TINY]) == 2
    err = _error(capsys)
    assert "training diverged" in err and "No checkpoint had been written yet" in err
    assert f"{out} held no checkpoint and was removed, so the same command can run again: retry it with " \
           f"--lr 1e+29 and/or --grad-clip 1.0." in err
    assert not out.exists()
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 0


def test_diverged_run_in_the_users_empty_folder_keeps_the_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    assert main(["train", "--lr", "1e30", "--epochs", "3", "--out", str(out), *TINY]) == 2
    assert "was removed" in _error(capsys)
    assert out.is_dir() and not any(out.iterdir())
