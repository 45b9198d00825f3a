"""Issue 17 item 6: defaults for a data file (early stopping by default), and the warnings about a
finished run: posterior collapse, raw columns of very different scales, an epoch budget cut short."""

import numpy as np
import pytest

from vaelens import checkpoint as ck
from vaelens import config
from vaelens.cli import build_parser, main
from vaelens.commands.train import train_config

TINY = ["--latent-dim", "2", "--hidden", "16", "--no-progress", "--checkpoint-every", "0"]


def _cfg(*argv):
    return train_config(build_parser().parse_args(["train", *argv]))


def test_file_defaults_come_from_the_one_table_and_stop_early():
    table = config.DATASET_DEFAULTS["file"]
    cfg = _cfg("--data", "t.csv", "--likelihood", "gaussian")
    for key, value in table.items():
        sec, name = key.split(".")
        assert getattr(getattr(cfg, sec), name) == value, key
    # early stopping on validation by default, with a generous budget and patience
    assert cfg.train.patience is not None and cfg.train.patience >= 20
    assert cfg.train.epochs >= 10 * cfg.train.patience // 2 and cfg.data.val_fraction > 0


def test_flags_and_builtin_sets_keep_their_values():
    cfg = _cfg("--data", "t.csv", "--epochs", "7", "--patience", "3", "--hidden", "8")
    assert (cfg.train.epochs, cfg.train.patience, cfg.model.hidden) == (7, 3, (8,))
    digits = _cfg()
    assert digits.train.patience is None and digits.model.hidden == config.ModelConfig().hidden


def test_help_names_the_file_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert f"file {config.DATASET_DEFAULTS['file']['train.epochs']}" in capsys.readouterr().out


@pytest.fixture
def raw_table(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 2))
    X = np.tanh(z @ rng.normal(size=(2, 6))) + 0.05 * rng.normal(size=(300, 6))
    X[:, 0] *= 5000.0  # one column in other units
    path = tmp_path / "raw.csv"
    path.write_text("a,b,c,d,e,f\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in X) + "\n")
    return path


def _warnings(err: str):
    return [ln for ln in err.splitlines() if ln.startswith("vaelens train: warning: ")]


def test_raw_scales_hint_and_budget_note(raw_table, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(raw_table), "--likelihood", "gaussian", "--epochs", "3", "--lr", "1e-2",
                 "--out", str(out), *TINY]) == 0
    warned = _warnings(capsys.readouterr().err)
    assert any("the Gaussian likelihood sees raw columns whose scales differ" in w and "std of 'a'" in w
               and "--standardize" in w for w in warned), warned
    summary = ck.read_summary(out)
    if summary["best_epoch"] == 3:
        assert any(f"still improving at the last epoch (best epoch 3 of 3); more epochs may help: vaelens train "
                   f"--resume {out} --epochs 103" in w for w in warned), warned


def test_standardized_table_has_no_scale_hint(raw_table, tmp_path, capsys):
    assert main(["train", "--data", str(raw_table), "--likelihood", "gaussian", "--standardize", "--epochs", "2",
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    assert not any("raw columns" in w for w in _warnings(capsys.readouterr().err))


def test_collapse_warning_for_a_collapsed_run_only(tmp_path, capsys):
    base = ["train", "--limit", "300", "--batch-size", "50", *TINY]
    assert main([*base, "--epochs", "4", "--beta", "200", "--out", str(tmp_path / "collapsed")]) == 0
    warned = _warnings(capsys.readouterr().err)
    assert any(w.startswith("vaelens train: warning: posterior collapse: 0 of 2 latent dimensions are active")
               and "--warmup-epochs" in w and "--free-bits" in w for w in warned), warned
    # the same model trained long enough to use its latents (KL about 1.5 nats)
    assert main([*base, "--epochs", "15", "--lr", "3e-3", "--out", str(tmp_path / "healthy")]) == 0
    assert not any("collapse" in w for w in _warnings(capsys.readouterr().err))
