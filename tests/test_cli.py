import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vaelens.cli import build_parser


def run(*args, cwd=None, check_rc=None):
    env = dict(os.environ, VAELENS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "vaelens", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def test_help_on_every_command_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text, f"`vaelens {name} --help` has no example"
        # flags whose default the config fills must not claim a default of None
        assert "default: None" not in " ".join(text.split()), f"`vaelens {name} --help` shows (default: None)"
    assert run("--help", check_rc=0).stdout.startswith("usage: vaelens")


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
        "--standardize", "--epochs", "3", "--out", tmp_path / "r", check_rc=0)
    run("encode", tmp_path / "r", "--out", tmp_path / "p.npz", check_rc=0)
    z = np.load(tmp_path / "p.npz")
    assert z["mu"].shape == (600, 8) and z["label"].max() == 1
    p = run("sample", tmp_path / "r", "--out", tmp_path / "s.png", check_rc=2)
    assert "table model has no images" in p.stderr
    run("sample", tmp_path / "r", "--out", tmp_path / "s.csv", "-n", "4", check_rc=0)
    vals = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    assert abs(vals.mean() - 5) < 3  # decoded in data units (the training mean is about 5), not standardized
