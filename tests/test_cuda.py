"""The CUDA path: training with the data on the GPU, bf16 autocast, inference, evaluation, checkpoints and
NCCL under torchrun. Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`python -m pytest -q tests/test_cuda.py`."""

import json

import numpy as np
import pytest
import torch

from vaelens import VAE, train
from vaelens.evaluate import evaluate

from _helpers import prepared, small_cfg, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


class _Seen:
    """Devices and dtypes of every module's input and output while active (torch's global forward hook)."""

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook

        self.devices, self.dtypes = set(), set()

        def hook(module, args, out):
            if isinstance(module, torch.nn.Linear):
                self.devices.add(args[0].device.type)
                self.dtypes.add(out.dtype)

        self._h = register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()
        return False


def test_training_on_cuda_matches_cpu_and_checkpoints_load_on_cpu(tmp_path):
    cfg, X, Xv = prepared(small_cfg(epochs=5, device="cuda"))
    with _Seen() as seen:
        gpu = train.fit(cfg, X, Xv, progress=False, run_dir=tmp_path / "gpu", checkpoint_interval_s=0)
    # every layer call of the training and validation ran on the GPU (a CPU fall-back shows here;
    # not run on the development host, which has no GPU)
    assert seen.devices == {"cuda"}, seen.devices
    assert gpu.summary["device"].startswith("cuda")
    cpu = train.fit(cfg.replace(train={"device": "cpu"}), X, Xv, progress=False)
    assert next(gpu.module.parameters()).device.type == "cuda"
    # Same seeds, shuffles and initial weights; only the Gaussian noise differs (CUDA and the CPU draw
    # different streams). Measured on the CPU with seeds 1-6, where the initial weights and the shuffles
    # change too: validation losses after 5 epochs 39.1-40.3, a spread of 2.9%; the noise alone moves
    # them less, so 5% cannot fail by chance and still catches a GPU step that trains differently.
    assert gpu.history[-1]["val_loss"] == pytest.approx(cpu.history[-1]["val_loss"], rel=0.05)
    assert gpu.history[-1]["val_loss"] < gpu.history[0]["val_loss"]
    # a run trained on the GPU loads on a machine without one
    est = VAE.load(tmp_path / "gpu", device="cpu")
    assert est.device_.type == "cpu"
    mu_cpu = est.encode(X[:50]).mu
    with _Seen() as seen:
        mu_gpu = VAE.load(tmp_path / "gpu", device="cuda").encode(X[:50]).mu
    assert seen.devices == {"cuda"}, seen.devices
    assert isinstance(mu_gpu, np.ndarray)
    np.testing.assert_allclose(mu_gpu, mu_cpu, atol=1e-4)  # TF32 is off by default for float32 matmuls


def test_bf16_autocast_on_cuda_keeps_float32_parameters():
    cfg, X, Xv = prepared(small_cfg(epochs=5, device="cuda"))
    with _Seen() as seen:
        full = train.fit(cfg, X, Xv, progress=False)
    assert seen.devices == {"cuda"} and seen.dtypes == {torch.float32}, (seen.devices, seen.dtypes)
    with _Seen() as seen:
        half = train.fit(cfg.replace(train={"bf16": True}), X, Xv, progress=False)
    # the training steps' layers computed in bf16 on the GPU (validation runs outside autocast, in float32)
    assert seen.devices == {"cuda"} and torch.bfloat16 in seen.dtypes, (seen.devices, seen.dtypes)
    assert not torch.equal(full.module.encoder.mu_head.weight, half.module.encoder.mu_head.weight)
    assert all(p.dtype == torch.float32 for p in half.module.parameters())
    # bf16 rounding of the products only: same bound as the CPU test of bf16 (2% of the loss)
    for a, b in zip(full.history, half.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)


def test_evaluate_on_cuda_agrees_with_cpu():
    cfg, X, Xv = prepared(small_cfg(epochs=5, device="cuda"))
    module = train.fit(cfg, X, Xv, progress=False).module
    with _Seen() as seen:
        on_gpu = evaluate(module, Xv[:64], iw_samples=200, seed=0)
    assert seen.devices == {"cuda"}, seen.devices
    on_cpu = evaluate(module.to("cpu"), Xv[:64], iw_samples=200, seed=0)
    # Each row draws its own seeded noise on its device, so the two differ by Monte Carlo error only:
    # measured on the CPU over 6 evaluation seeds with k = 200, the per-image estimate has a std of
    # 0.08 nats on average (0.15 at most) and the mean over 64 images stays within 0.03; allow 0.5.
    assert on_gpu.nll == pytest.approx(on_cpu.nll, abs=0.5)
    assert np.all(on_gpu.log_likelihood >= on_gpu.elbo - 1e-3)


def _torchrun_train(out, nproc, epochs=3):
    torchrun("train", "--device", "cuda", "--epochs", epochs, "--hidden", "64", "--latent-dim", "4",
             "--batch-size", "128", "--no-progress", "--out", out, nproc=nproc)
    return json.loads((out / "summary.json").read_text())


def test_torchrun_on_one_gpu(tmp_path):
    # Not shown to fail here (no GPU on the development host, the file skips): a CPU fall-back writes
    # summary device "cpu" (as every CPU run does), which this assertion rejects.
    summary = _torchrun_train(tmp_path / "one", nproc=1)
    assert summary["world_size"] == 1
    assert summary["device"].startswith("cuda"), summary["device"]
    assert len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs (one rank per GPU)")
def test_ddp_over_nccl_on_two_gpus(tmp_path):
    summary = _torchrun_train(tmp_path / "two", nproc=2)
    assert summary["world_size"] == 2
    assert summary["device"] == "cuda:0", summary["device"]  # rank 0's, one GPU per rank
    run = tmp_path / "two"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert len(list((run / "checkpoints").glob("ckpt-*"))) == 1  # rank 0 alone writes
