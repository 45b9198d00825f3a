import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never download; a test that needs MNIST uses the shared copy or skips.
os.environ.setdefault("VAELENS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small digits run directory trained once per session through the CLI's code path."""
    from vaelens.cli import main

    out = tmp_path_factory.mktemp("runs") / "digits"
    rc = main(["train", "--epochs", "15", "--latent-dim", "4", "--hidden", "64", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture
def table_data():
    """Correlated continuous data: 3 latent factors through a nonlinearity into 12 features, plus noise."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 3))
    W = rng.normal(size=(3, 12))
    X = np.tanh(z @ W) * 3 + 0.1 * rng.normal(size=(600, 12)) + 5
    return X.astype(np.float32)


@pytest.fixture(scope="session")
def digits_vae():
    """A tiny VAE fitted on 300 digits in a few epochs, and that data: for tests of what any model satisfies."""
    from vaelens import VAE
    from vaelens.data import load_digits

    X = load_digits().X[:300]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only adds synchronisation
    try:
        return VAE(latent_dim=3, hidden=(16,), batch_size=100).fit(X, epochs=3, seed=0), X
    finally:
        torch.set_num_threads(threads)
