"""`vaelens export`: ONNX and torch.export artifacts equal the model, and nothing unchecked is left behind."""

import json

import numpy as np
import pytest
import torch

from _helpers import cli as run
from vaelens import VAE
from vaelens.data import load_digits


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    run("train", "--epochs", "2", "--latent-dim", "3", "--hidden", "16", "--out", out, "--no-progress", check_rc=0)
    return out


@pytest.fixture(scope="module")
def table_small(tmp_path_factory):
    """A standardized Gaussian run: the decoder gives loc and scale, the encoder takes standardized input."""
    d = tmp_path_factory.mktemp("export-table")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", (rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + 10).astype(np.float32))
    run("train", "--data", d / "x.npy", "--likelihood", "gaussian", "--standardize", "--gaussian-scale",
        "per_feature", "--epochs", "2", "--latent-dim", "2", "--hidden", "8", "--out", d / "run", "--no-progress",
        check_rc=0)
    return d


def test_onnx_encoder_equals_vaelens_encode_for_another_batch_size(digits_small, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    p = run("export", digits_small, "--format", "onnx", "--out", tmp_path / "e", check_rc=0)
    assert "checked on 37 rows" in p.stdout
    meta = json.loads((tmp_path / "e" / "export.json").read_text())
    assert meta["artifacts"]["encoder"]["outputs"][0] == {"name": "mu", "shape": ["batch", 3], "dtype": "float32"}
    assert meta["preprocessing"]["standardize"] is False and meta["config"]["model"]["latent_dim"] == 3
    run("encode", digits_small, "--out", tmp_path / "p.npz", check_rc=0)
    want = np.load(tmp_path / "p.npz")
    X = load_digits().X[:13].astype(np.float32)  # 13 rows: the export's example had 2
    enc = ort.InferenceSession(str(tmp_path / "e" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    mu, sigma = enc.run(None, {"x": X})
    np.testing.assert_allclose(mu, want["mu"][:13], atol=1e-4)
    np.testing.assert_allclose(sigma, want["sigma"][:13], atol=1e-4)
    dec = ort.InferenceSession(str(tmp_path / "e" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = dec.run(None, {"z": mu})
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), VAE.load(digits_small).decode(mu), atol=1e-4)


def test_torch_export_of_a_standardized_gaussian_run(table_small, tmp_path):
    d = table_small
    run("export", d / "run", "--format", "torch", "--out", tmp_path / "t", check_rc=0)
    meta = json.loads((tmp_path / "t" / "export.json").read_text())
    assert [o["name"] for o in meta["artifacts"]["decoder"]["outputs"]] == ["loc", "scale"]
    vae = VAE.load(d / "run")
    assert meta["preprocessing"]["mean"] == pytest.approx(list(vae.config_.transform.mean))
    X = np.load(d / "x.npy")[:11]
    xm = (X - np.array(meta["preprocessing"]["mean"])) / np.array(meta["preprocessing"]["std"])
    enc = torch.export.load(str(tmp_path / "t" / "encoder.pt2")).module()
    dec = torch.export.load(str(tmp_path / "t" / "decoder.pt2")).module()
    with torch.inference_mode():
        mu, sigma = enc(torch.as_tensor(xm, dtype=torch.float32))
        loc, scale = dec(mu)
    post = vae.encode(X)
    np.testing.assert_allclose(mu.numpy(), post.mu, atol=1e-4)
    np.testing.assert_allclose(sigma.numpy(), post.sigma, atol=1e-4)
    recon = loc.numpy() * np.array(meta["preprocessing"]["std"]) + np.array(meta["preprocessing"]["mean"])
    np.testing.assert_allclose(recon, vae.reconstruct(X), atol=1e-3)  # data units: scaled by std up to 5
    assert scale.shape == (11, 5) and (scale.numpy() > 0).all()


def test_a_mismatch_exits_2_and_leaves_nothing(digits_small, tmp_path, monkeypatch):
    from vaelens import exporting

    monkeypatch.setattr(exporting, "check_artifacts", lambda *a: {"mu": 0.5, "sigma": 0.0, "logits": 0.0})
    p = run("export", digits_small, "--format", "torch", "--out", tmp_path / "e")
    assert p.returncode == 2 and "differ from the model" in p.stderr and "mu by 0.5" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_existing_out_needs_force_and_force_spares_other_folders(digits_small, tmp_path):
    (tmp_path / "e").mkdir()
    p = run("export", digits_small, "--format", "torch", "--out", tmp_path / "e")
    assert p.returncode == 2 and "already exists; pass --force" in p.stderr
    (tmp_path / "e" / "mine.txt").write_text("mine")
    p = run("export", digits_small, "--format", "torch", "--out", tmp_path / "e", "--force")
    assert p.returncode == 2 and "not an export" in p.stderr
    assert (tmp_path / "e" / "mine.txt").read_text() == "mine"
    run("export", digits_small, "--format", "torch", "--out", tmp_path / "x", check_rc=0)
    run("export", digits_small, "--format", "torch", "--out", tmp_path / "x", "--force", check_rc=0)  # an export
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["decoder.pt2", "encoder.pt2", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "x"]  # no temporary folder left


@pytest.mark.parametrize("extra, fragment", [
    (["--format", "tflite"], "invalid choice"),
    (["--format", "torch", "--check-rows", "0"], "--check-rows must be >= 1"),
])
def test_bad_inputs_exit_2_with_one_line(digits_small, tmp_path, extra, fragment):
    p = run("export", digits_small, "--out", tmp_path / "e", *extra)
    assert p.returncode == 2 and fragment in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "e").exists()


def test_a_missing_run_exits_2(tmp_path):
    p = run("export", tmp_path / "nothing", "--format", "torch", "--out", tmp_path / "e")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_onnx_without_onnxruntime_is_one_line_and_exit_2(digits_small, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    p = run("export", digits_small, "--format", "onnx", "--out", tmp_path / "e")
    assert p.returncode == 2 and "pip install 'vaelens[export]'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
