"""`vaelens score`: per-sample anomaly scores, labels as written, and detection metrics."""

import csv

import numpy as np
import pytest

from _helpers import cli as run
from vaelens import VAE


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """A Gaussian run on one cluster (labels 5, 8 as written) and a file with a far-away class 11 added."""
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5
    far = rng.normal(size=(40, 6)) + 6.0
    labels = np.r_[np.where(np.arange(300) % 2, 5, 8), np.full(40, 11)]
    _write_csv(d / "train.csv", normal, labels[:300])
    _write_csv(d / "test.csv", np.r_[normal[:60], far], np.r_[labels[:60], labels[300:]])
    run("train", "--data", d / "train.csv", "--label-column", "label", "--likelihood", "gaussian", "--standardize",
        "--epochs", "8", "--latent-dim", "2", "--hidden", "16", "--out", d / "run", "--no-progress", check_rc=0)
    return d


def _write_csv(path, X, y):
    header = ",".join(f"f{i}" for i in range(X.shape[1])) + ",label"
    rows = [",".join(f"{v:.6f}" for v in r) + f",{lab}" for r, lab in zip(X, y)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def _read(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_one_row_per_sample_labels_as_written_and_values_match_the_api(table_run, tmp_path):
    d = table_run
    p = run("score", d / "run", "--data", d / "test.csv", "--label-column", "label", "--out", tmp_path / "s.csv",
            "--k", "30", "--seed", "3", check_rc=0)
    assert "scores of 100 samples" in p.stdout
    t = _read(tmp_path / "s.csv")
    assert list(t) == ["index", "label", "neg_elbo", "log_px", "neg_log_px", "rec_error", "kl"]
    assert t["index"].astype(int).tolist() == list(range(100))
    assert sorted(set(t["label"].tolist())) == ["11", "5", "8"]  # as written, not recoded 0, 1, 2
    vae = VAE.load(d / "run")
    X = np.loadtxt(d / "test.csv", delimiter=",", skiprows=1)[:, :6]
    np.testing.assert_allclose(-t["neg_elbo"].astype(float), vae.elbo(X, seed=3), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t["log_px"].astype(float), vae.log_likelihood(X, k=30, seed=3), rtol=1e-6, atol=1e-6)
    # reconstruction error: squared error in the model's (standardized) units at z = mu
    Xm = vae.model_input(X)
    rec = ((Xm - (vae.reconstruct(X) - vae.config_.transform.mean) / vae.config_.transform.std) ** 2).sum(1)
    np.testing.assert_allclose(t["rec_error"].astype(float), rec, rtol=1e-4, atol=1e-4)
    assert (t["kl"].astype(float) >= 0).all()


def test_held_out_class_auc_above_chance_and_computed_right(table_run, tmp_path):
    d = table_run
    run("score", d / "run", "--data", d / "test.csv", "--label-column", "label", "--out", tmp_path / "s.npz",
        "--k", "20", "--normal", "5,8", "--json", tmp_path / "s.json", check_rc=0)
    import json

    r = json.loads((tmp_path / "s.json").read_text())
    assert r["n_normal"] == 60 and r["n_anomalous"] == 40 and r["normal"] == ["5", "8"]
    z = np.load(tmp_path / "s.npz")
    assert z["label"].tolist() == [8, 5] * 30 + [11] * 40
    positive = z["label"] == 11
    for name in ("neg_elbo", "neg_log_px", "rec_error", "kl"):
        # Mann-Whitney: the share of (anomalous, normal) pairs ranked the right way, ties counted half
        a, n = z[name][positive][:, None], z[name][~positive][None, :]
        auc = float(np.mean((a > n) + 0.5 * (a == n)))
        assert r["metrics"][name]["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert r["metrics"]["neg_elbo"]["roc_auc"] > 0.9 and r["metrics"]["neg_log_px"]["roc_auc"] > 0.9
    assert 0 < r["metrics"]["neg_elbo"]["average_precision"] <= 1


@pytest.mark.parametrize("extra, fragment", [
    (["--out", "s.txt"], "must end in .csv, .parquet or .npz"),
    (["--out", "s.csv", "--k", "0"], "--k must be >= 1"),
    (["--out", "s.csv", "--normal", "5,99"], "no sample has label 99"),
    (["--out", "s.csv", "--normal", "5,8,11"], "every labelled sample is normal"),
    (["--out", "s.csv", "--normal", "x"], "the labels are numbers"),
    (["--out", "s.csv", "--limit", "0"], "--limit must be >= 1"),
])
def test_bad_inputs_exit_2_with_one_line(table_run, tmp_path, extra, fragment):
    d = table_run
    extra = [str(tmp_path / a) if a.startswith("s.") else a for a in extra]
    p = run("score", d / "run", "--data", d / "test.csv", "--label-column", "label", *extra)
    assert p.returncode == 2 and fragment in p.stderr, p.stderr
    # the data's own notes (here: label 11 unseen in training) may precede the one error line
    errors = [line for line in p.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(errors) == 1 and errors[0].startswith("vaelens score: error: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "s.csv").exists()


def test_normal_without_labels_exits_2(table_run, tmp_path):
    d = table_run
    np.save(tmp_path / "x.npy", np.loadtxt(d / "test.csv", delimiter=",", skiprows=1)[:, :6])
    p = run("score", d / "run", "--data", tmp_path / "x.npy", "--out", tmp_path / "s.csv", "--normal", "5")
    assert p.returncode == 2 and "the data has no labels" in p.stderr, p.stderr
