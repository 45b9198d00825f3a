"""The one path from user data to model input: `VAE.model_input`, and every consumer going through it.

A binarized run's figures must not depend on which command computed them: `report` and
`evaluate` (Python and CLI) feed the model one binarization with the same seed, so they report the
same log-likelihood for the same rows.
"""

import json

import numpy as np
import pytest
import torch

from _helpers import cli
from vaelens import VAE, data
from vaelens.errors import DataError
from vaelens.report import EVAL_IW_SAMPLES, build_report

SEED = 3


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def binarized_run(digits, tmp_path_factory):
    """A tiny digits model trained on dynamically binarized images, saved as a run directory."""
    run = tmp_path_factory.mktemp("datapath") / "bin"
    vae = VAE(latent_dim=3, hidden=(16,), binarize="dynamic", batch_size=100, epochs=3, seed=0)
    vae.fit(digits.X[:300], image_shape=(8, 8)).save(run)
    return run, VAE.load(run)


@pytest.fixture(scope="module")
def rows(digits):
    """Grey-level rows the model never saw: fewer than the report's evaluation subset, so it uses them all."""
    return digits.X[300:420]


def test_binarized_model_input_is_one_seeded_binarization(binarized_run, rows):
    _, vae = binarized_run
    x = vae.model_input(rows, seed=SEED)
    assert x.dtype == np.float32 and x.shape == rows.shape
    assert np.array_equal(x, data.binarize_static(rows, SEED))
    # binary data pass unchanged, so binarizing once and handing the result on keeps the bits
    assert np.array_equal(vae.model_input(x, seed=SEED + 1), x)
    assert np.array_equal(vae.binarize_input(rows, SEED), x)
    assert not np.array_equal(vae.model_input(rows, seed=SEED + 1), x)
    # torch tensors and images (n, h, w) take the same path
    assert np.array_equal(vae.model_input(torch.as_tensor(rows), seed=SEED), x)
    assert np.array_equal(vae.model_input(rows.reshape(-1, 8, 8), seed=SEED), x)


def test_standardized_model_input_uses_the_runs_statistics(table_data):
    vae = VAE(latent_dim=2, hidden=(8,), likelihood="gaussian", standardize=True, epochs=1).fit(table_data[:200])
    t = vae.config_.transform
    expected = ((table_data - np.float32(t.mean)) / np.float32(t.std)).astype(np.float32)
    assert np.allclose(vae.model_input(table_data), expected, atol=1e-6)
    assert np.array_equal(vae.binarize_input(table_data), table_data)  # not a binarized run


def test_model_input_checks(binarized_run, rows):
    _, vae = binarized_run
    with pytest.raises(DataError, match="has 10 features, the model expects 64"):
        vae.model_input(np.zeros((3, 10), np.float32))
    with pytest.raises(DataError, match="1-D"):
        vae.model_input(np.zeros(64, np.float32))
    with pytest.raises(DataError, match="NaN"):
        vae.model_input(np.full((2, 64), np.nan))
    with pytest.raises(DataError, match=r"values in \[0, 1\]"):
        vae.model_input(rows * 2)  # grey levels outside [0, 1] cannot be binarized
    with pytest.raises(DataError, match="non-numeric"):
        vae.model_input(np.array([["a"] * 64], dtype=object))


METHODS = {
    "encode": lambda v, X, s: v.encode(X, seed=s),
    "transform": lambda v, X, s: v.transform(X, seed=s),
    "sample_latent": lambda v, X, s: v.sample_latent(X, 2, seed=s),
    "elbo": lambda v, X, s: v.elbo(X, seed=s),
    "elbo_terms": lambda v, X, s: v.elbo_terms(X, seed=s),
    "reconstruction_error": lambda v, X, s: v.reconstruction_error(X, seed=s),
    "posterior_cloud": lambda v, X, s: v.posterior_cloud(X, k=8, seed=s),
    "log_likelihood": lambda v, X, s: v.log_likelihood(X, k=4, seed=s),
    "score_samples": lambda v, X, s: v.score_samples(X, seed=s),
    "score": lambda v, X, s: v.score(X, seed=s),
    "evaluate": lambda v, X, s: v.evaluate(X, iw_samples=4, seed=s, aggregate_draws=50),
    "check": lambda v, X, s: v.check(X, n=2, n_samples=50, seed=s),
    "symmetry": lambda v, X, s: v.symmetry(X, seed=s, n_rotations=1, n_samples=2),
    "reconstruct": lambda v, X, s: v.reconstruct(X, seed=s),
    "aggregate_posterior": lambda v, X, s: v.aggregate_posterior(X, seed=s),
    "true_posterior": lambda v, X, s: v.true_posterior(X, k=8, seed=s),
    "inference_gaps": lambda v, X, s: v.inference_gaps(X, k=8, steps=2, seed=s, elbo_draws=4),
    "encode_refine": lambda v, X, s: v.encode(X, seed=s, refine=2),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_feeds_the_model_through_model_input(binarized_run, rows, monkeypatch, name):
    _, vae = binarized_run
    seen = []
    original = VAE.model_input

    def spy(self, X, seed=0):
        seen.append(seed)
        return original(self, X, seed)

    monkeypatch.setattr(VAE, "model_input", spy)
    METHODS[name](vae, rows[:20], 7)
    assert seen and set(seen) == {7}, seen


def test_encode_of_a_binarized_run_sees_the_binarized_rows(binarized_run, rows):
    _, vae = binarized_run
    bits = data.binarize_static(rows, SEED)
    assert np.array_equal(vae.encode(rows, seed=SEED).mu, vae.encode(bits).mu)
    assert np.array_equal(vae.log_likelihood(rows, k=8, seed=SEED), vae.log_likelihood(bits, k=8, seed=SEED))


def test_report_log_likelihood_equals_evaluate(binarized_run, rows, tmp_path):
    """The acceptance test of issue 16: report and evaluate, same rows and seed, the same numbers."""
    run, vae = binarized_run
    rep = build_report(run, data=rows, out_path=tmp_path / "r.html", seed=SEED, max_points=len(rows))
    got = rep.numbers["evaluation"]
    assert rep.numbers["binarized"] and got["n"] == len(rows)
    ev = vae.evaluate(rows, iw_samples=EVAL_IW_SAMPLES, seed=SEED).to_dict()
    assert got["log_likelihood"] == ev["log_likelihood"] and got["elbo"] == ev["elbo"]
    ll = vae.log_likelihood(rows, k=EVAL_IW_SAMPLES, seed=SEED)
    assert got["log_likelihood"] == float(ll.mean())
    # grey levels would give another (meaningless) figure: the binarization really is applied
    other = vae.evaluate(data.binarize_static(rows, SEED + 1), iw_samples=EVAL_IW_SAMPLES, seed=SEED).to_dict()
    assert other["log_likelihood"] != got["log_likelihood"]


_cli = cli  # in-process; see _helpers.cli


def test_cli_report_and_evaluate_agree(binarized_run, rows, tmp_path):
    run, _ = binarized_run
    npy = tmp_path / "rows.npy"
    np.save(npy, rows)
    r = _cli("report", run, "--data", npy, "--seed", SEED, "--out", tmp_path / "r.html", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    e = _cli("evaluate", run, "--data", npy, "--split", "train", "--seed", SEED, "--iw-samples", EVAL_IW_SAMPLES,
             "--no-progress", "--json", tmp_path / "e.json")
    assert e.returncode == 0, e.stderr
    rep = json.loads((tmp_path / "r.json").read_text())["numbers"]["evaluation"]
    ev = json.loads((tmp_path / "e.json").read_text())
    assert rep["n"] == ev["n"] == len(rows)
    assert rep["log_likelihood"] == ev["log_likelihood"] and rep["elbo"] == ev["elbo"]
