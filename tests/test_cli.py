import json
import os
from pathlib import Path

import numpy as np
import pytest

from _helpers import cli

from vaelens import config
from vaelens import io as vio
from vaelens.api import VAE
from vaelens.cli import build_parser, main
from vaelens.commands import COMMANDS
from vaelens.errors import OutputError


run = cli  # in-process; see _helpers.cli


def test_help_on_every_command_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text, f"`vaelens {name} --help` has no example"
        # flags whose default the config fills must not claim a default of None
        assert "default: None" not in " ".join(text.split()), f"`vaelens {name} --help` shows (default: None)"
    # the entry point itself, once, as a shell runs it
    assert run("--help", check_rc=0, in_process=False).stdout.startswith("usage: vaelens")


def test_train_writes_a_run_and_reports(tmp_path):
    p = run("train", "--epochs", "3", "--latent-dim", "2", "--hidden", "32", "--out", tmp_path / "r", check_rc=0)
    assert "run: " in p.stdout and "validation -ELBO" in p.stdout
    assert (tmp_path / "r" / "model.safetensors").exists()
    assert "\r" not in p.stderr  # no progress bar when output is not a terminal
    # nothing is overwritten without --force
    p = run("train", "--epochs", "1", "--out", tmp_path / "r", check_rc=2)
    assert "already exists" in p.stderr and "Traceback" not in p.stderr
    run("train", "--epochs", "1", "--latent-dim", "2", "--out", tmp_path / "r", "--force", check_rc=0)


def test_train_iwae_with_dreg(tmp_path):
    run("train", "--epochs", "2", "--hidden", "16", "--iw-samples", "4", "--dreg", "--out", tmp_path / "r",
        check_rc=0)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (cfg["objective"], cfg["iw_samples"], cfg["dreg"]) == ("iwae", 4, True)
    assert "iwae(K=4) DReG" in run("info", tmp_path / "r", check_rc=0).stdout


def test_default_out_goes_under_runs(tmp_path):
    run("train", "--epochs", "1", "--hidden", "16", cwd=tmp_path, check_rc=0)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-")


@pytest.mark.parametrize("ext", ["npz", "csv", "parquet"])
def test_encode_formats(digits_run, tmp_path, ext):
    out = tmp_path / f"post.{ext}"
    p = run("encode", digits_run, "--out", out, "--samples", "3", check_rc=0)
    assert "1500 samples x 4 dimensions" in p.stdout
    if ext == "npz":
        z = np.load(out)
        assert z["mu"].shape == z["sigma"].shape == (1500, 4) and (z["sigma"] > 0).all()
        assert z["z"].shape == (1500, 3, 4) and z["label"].shape == (1500,) and z["index"][-1] == 1499
    elif ext == "csv":
        header = out.read_text().splitlines()[0].split(",")
        assert header[:3] == ["index", "label", "mu_0"] and "sigma_3" in header and "z2_3" in header
        assert len(out.read_text().splitlines()) == 1501
    else:
        import pyarrow.parquet as pq

        t = pq.read_table(out)
        assert t.num_rows == 1500 and "sigma_0" in t.column_names


def test_encode_is_deterministic(digits_run, tmp_path):
    run("encode", digits_run, "--out", tmp_path / "a.npz", check_rc=0)
    run("encode", digits_run, "--out", tmp_path / "b.npz", "--split", "test", check_rc=0)
    run("encode", digits_run, "--out", tmp_path / "c.npz", check_rc=0)
    a, c = np.load(tmp_path / "a.npz"), np.load(tmp_path / "c.npz")
    assert np.array_equal(a["mu"], c["mu"]) and np.array_equal(a["sigma"], c["sigma"])
    assert np.load(tmp_path / "b.npz")["mu"].shape == (297, 4)
    p = run("encode", digits_run, "--out", tmp_path / "a.npz", check_rc=2)
    assert "already exists" in p.stderr


def test_encode_other_file_with_wrong_width(digits_run, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 10), np.float32))
    p = run("encode", digits_run, "--data", tmp_path / "x.npy", "--out", tmp_path / "o.npz", check_rc=2)
    assert "has 10 features, the model expects 64" in p.stderr and "Traceback" not in p.stderr


def test_sample_and_info(digits_run, tmp_path):
    p = run("sample", digits_run, "-n", "16", "--out", tmp_path / "s.png", check_rc=0)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run("sample", digits_run, "-n", "5", "--out", tmp_path / "s.csv", check_rc=0)
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 6
    p = run("info", digits_run, check_rc=0)
    assert "mlp 64-64-4" in p.stdout and "best" in p.stdout
    info = json.loads(run("info", digits_run, "--json", check_rc=0).stdout)
    assert info["config"]["model"]["latent_dim"] == 4


@pytest.mark.parametrize("args, fragment", [
    (["train", "--data", "nope.csv"], "nope.csv: no such file"),
    (["train", "--latent-dim", "0"], "model.latent_dim must be a positive integer"),
    (["train", "--hidden", "a,b"], "expected comma-separated integers"),
    (["train", "--data", "mnist", "--data-dir", "."], "not found in"),
    (["info", "no-such-run"], "no-such-run: no such run directory"),
    (["encode", "no-such-run", "--out", "x.txt"], "output must end in .npz, .csv or .parquet"),
    (["train", "--likelihood", "gaussian", "--binarize", "static"], "binarize needs a bernoulli likelihood"),
    (["train", "--arch", "conv", "--data", "t.csv"], "needs image data"),
    (["train", "--dreg"], "train.dreg needs objective 'iwae'"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, args, fragment):
    (tmp_path / "t.csv").write_text("a,b\n0.1,0.2\n0.3,0.4\n0.5,0.6\n")
    p = run(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2


def test_table_training_end_to_end(tmp_path, table_data):
    header = ",".join(f"f{i}" for i in range(12)) + ",label"
    rows = [",".join(f"{v:.5f}" for v in r) + f",{'ab'[i % 2]}" for i, r in enumerate(table_data)]
    (tmp_path / "t.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    run("train", "--data", tmp_path / "t.csv", "--label-column", "label", "--likelihood", "gaussian",
        "--standardize", "--epochs", "3", "--latent-dim", "8", "--out", tmp_path / "r", check_rc=0)
    run("encode", tmp_path / "r", "--out", tmp_path / "p.npz", check_rc=0)
    z = np.load(tmp_path / "p.npz")
    assert z["mu"].shape == (600, 8) and z["label"].tolist() == ["ab"[i % 2] for i in range(600)]  # as written
    p = run("sample", tmp_path / "r", "--out", tmp_path / "s.png", check_rc=2)
    assert "table model has no images" in p.stderr
    run("sample", tmp_path / "r", "--out", tmp_path / "s.csv", "-n", "4", check_rc=0)
    vals = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    assert abs(vals.mean() - 5) < 3  # decoded in data units (the training mean is about 5), not standardized


# --- outputs: checked before any work, written atomically with the umask's permissions ----------


# (command, arguments before the output, the output flag, a file name): every output a command writes
OUTPUTS = [
    ("train", [], "--out", None),
    ("encode", ["RUN"], "--out", "o.npz"),
    ("sample", ["RUN"], "--out", "o.png"),
    ("report", ["RUN"], "--out", "o.html"),
    ("report", ["RUN"], "--json", "o.json"),
    ("evaluate", ["RUN"], "--json", "o.json"),
    ("check", ["RUN"], "--json", "o.json"),
    ("posterior", ["RUN"], "--json", "o.json"),
    ("symmetry", ["RUN"], "--json", "o.json"),
    ("compare", ["RUN", "RUN"], "--json", "o.json"),
    ("gap", ["RUN"], "--json", "o.json"),
    ("score", ["RUN"], "--out", "o.csv"),
    ("score", ["RUN", "--out", "s.csv"], "--json", "o.json"),
    ("export", ["RUN", "--format", "torch"], "--out", None),
]


@pytest.fixture
def no_work(monkeypatch):
    """Loading a run or data set fails the test: an output check must come before both."""
    def refuse(*a, **k):
        raise AssertionError("expensive work started before the output was checked")

    monkeypatch.setattr("vaelens.data.load", refuse)
    monkeypatch.setattr(VAE, "load", refuse)


def _bad_output(tmp_path, capsys, command, before, flag, name, out):
    args = [str(tmp_path / "no-run") if a == "RUN" else a for a in before]
    rc = main([command, *args, flag, str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"vaelens {command}: error: {out}"), err
    return err[0]


@pytest.mark.parametrize("command, before, flag, name", OUTPUTS)
def test_an_unusable_output_fails_before_any_work(tmp_path, capsys, no_work, command, before, flag, name):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    # a file where a folder should be
    out = afile / (name or "run")
    assert "is a file" in _bad_output(tmp_path, capsys, command, before, flag, name, out)
    # a place nobody may write, root included (/proc); a read-only mount or a missing permission is
    # found by the same probe (test_check_writable_probes_the_folder)
    out = Path("/proc") / "vaelens-test" / (name or "run")
    assert "cannot write in /proc" in _bad_output(tmp_path, capsys, command, before, flag, name, out)
    # an existing file without --force; for train, an existing file where the run directory should be
    out = afile if name is None else tmp_path / name
    out.write_text("mine")
    msg = _bad_output(tmp_path, capsys, command, before, flag, name, out)
    assert ("is a file" if name is None else "already exists; pass --force") in msg
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"afile", out.name})  # nothing else created


def test_every_output_writing_command_is_covered():
    writers = {c for c, *_ in OUTPUTS}
    assert writers | {"info", "serve"} == set(COMMANDS)  # info prints, serve serves


def test_check_writable_probes_the_folder(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputError, match="cannot write in .*Read-only file system"):
        vio.check_writable(tmp_path / "deeper" / "o.json")
    with pytest.raises(OutputError, match="Read-only file system"):
        vio.check_writable(tmp_path / "run", folder=True)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_are_0644_under_umask_022(tmp_path, umask_022, capsys):
    run = tmp_path / "run"
    assert main(["train", "--limit", "60", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress",
                 "--out", str(run)]) == 0
    # each in a folder that does not exist yet: created once the work is done
    outs = [tmp_path / "o" / n for n in ("p.npz", "p.csv", "s.png", "s.npy")] + [tmp_path / "j" / "e.json"]
    assert main(["encode", str(run), "--out", str(outs[0])]) == 0
    assert main(["encode", str(run), "--out", str(outs[1])]) == 0
    assert main(["sample", str(run), "-n", "4", "--out", str(outs[2])]) == 0
    assert main(["sample", str(run), "-n", "4", "--out", str(outs[3])]) == 0
    assert main(["evaluate", str(run), "--limit", "5", "--iw-samples", "2", "--json", str(outs[4])]) == 0
    capsys.readouterr()
    files = [p for p in run.rglob("*") if p.is_file()] + outs
    assert len(files) > len(outs) + 3
    assert {p: oct(p.stat().st_mode & 0o777) for p in files} == {p: "0o644" for p in files}
    assert not list(tmp_path.rglob("*.tmp"))
    assert json.loads(outs[4].read_text())["n"] == 5


# --- options generated from the config ---------------------------------------------------------

def _train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


def test_train_flags_are_generated_from_the_config():
    p = _train_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for opt in config.options():
        if opt.flag is not None:
            assert opt.flag in flags
            action = next(a for a in p._actions if opt.flag in a.option_strings)
            assert action.dest == opt.name and action.default is None
            assert opt.help in action.help
            if opt.choices:
                assert tuple(action.choices) == opt.choices
    text = " ".join(p.format_help().split())
    # a data file's own defaults (issue 17) are listed beside the plain default, like the built-in sets'
    assert "--latent-dim D latent dimensions d (default: 8; file 32)" in text
    assert "(default: 50; file 3000, digits 200, mnist 50" in text and "(default: none; mnist dynamic)" in text


def test_train_config_applies_the_data_sets_defaults_once():
    p = _train_parser()
    from vaelens.commands.train import train_config

    cfg = train_config(p.parse_args([]))
    assert (cfg.data.name, cfg.train.epochs, cfg.data.binarize) == ("digits", 200, "none")
    cfg = train_config(p.parse_args(["--data", "mnist"]))
    assert (cfg.train.epochs, cfg.data.binarize) == (50, "dynamic")
    cfg = train_config(p.parse_args(["--data", "mnist", "--likelihood", "gaussian"]))
    assert cfg.data.binarize == "none"  # mnist's binarization is for bernoulli models
    cfg = train_config(p.parse_args(["--epochs", "3", "--iw-samples", "4", "--hidden", "none", "--bf16"]))
    assert (cfg.train.epochs, cfg.train.objective, cfg.model.hidden, cfg.train.bf16) == (3, "iwae", (), True)
    assert cfg.model == config.ModelConfig(hidden=())  # only what was given changed
