"""Training, encoding and IWAE-evaluation throughput on this machine, against its fp32 matmul ceiling.

Configuration (issue 6): the MNIST MLP VAE 784-512-256-32, batch 128, dynamic binarization, Adam 1e-3,
Bernoulli likelihood. MNIST comes from an IDX folder (--data-dir, or $VAELENS_DATA_DIR); without one,
random data of the same shape is used and the output says so.

FLOPs are counted as 2 per multiply-add of the Linear layers only (activations, the loss and the
optimizer are not counted); a training step is counted as 3x the forward pass (forward, and a backward
that computes gradients for both inputs and weights). The ceiling is the best of several fp32
matrix products of 2048 x 2048 with torch on all threads (8192 x 8192 on a GPU), measured before and after training (the
higher of the two is used).

Run:  python benchmarks/throughput.py --data-dir ../shared/data/mnist [--epochs 3] [--iw-k 5000] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(n: int = 2048, reps: int = 10, dtype=torch.float32, device: str = "cpu") -> float:
    """Best observed GFLOP/s of an n x n matrix product in `dtype` on `device`."""
    if device == "cuda":
        n = max(n, 8192)  # a 2048^3 product is too short to keep a data-centre GPU busy
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def linear_macs(sizes) -> int:
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def load_mnist(data_dir):
    from vaelens import data
    from vaelens.config import DataConfig

    if data_dir:
        try:
            tr = data.load(DataConfig(name="mnist", data_dir=data_dir), "train")
            te = data.load(DataConfig(name="mnist", data_dir=data_dir), "test")
            return tr.X, te.X, "MNIST (IDX files)"
        except Exception as e:  # the benchmark still runs, on stand-in data
            print(f"# MNIST not loaded ({e}); using random data of the same shape")
    rng = np.random.default_rng(0)
    return (rng.random((60000, 784), dtype=np.float32), rng.random((10000, 784), dtype=np.float32),
            "random stand-in for MNIST (60000 x 784)")


def plain_loop(X: np.ndarray, epochs: int, seed: int = 0, device: str = "cpu"):
    """A minimal hand-written PyTorch VAE loop (default Adam, sigmoid+BCE), the comparison baseline."""
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 64)).to(device)
    dec = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 784)).to(device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=1e-3)
    Xt = torch.as_tensor(X).to(device)
    n = len(Xt)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, device=device)
        tot = 0.0
        for i in range(0, n, 128):
            x = torch.bernoulli(Xt[perm[i:i + 128]])
            h = enc(x)
            mu, logvar = h.chunk(2, -1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            xr = torch.sigmoid(dec(z))
            rec = F.binary_cross_entropy(xr, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())
            loss = (rec + kl) / len(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(x)
    dt = time.perf_counter() - t0
    return n * epochs / dt, tot / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("VAELENS_DATA_DIR"))
    ap.add_argument("--epochs", type=int, default=3, help="training epochs to time (the first is warm-up)")
    ap.add_argument("--iw-k", type=int, default=5000, help="importance samples for the evaluation figure")
    ap.add_argument("--iw-n", type=int, default=200, help="test images timed for the IWAE figure")
    ap.add_argument("--skip-plain", action="store_true", help="skip the hand-written baseline loop")
    ap.add_argument("--bf16", action="store_true",
                    help="also time training with bf16 autocast, against the bf16 matmul ceiling")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where to train and evaluate (cuda: the data set lives on the GPU; the ceiling is the GPU's)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    dev = args.device

    from vaelens import evaluate
    from vaelens.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vaelens.train import fit

    torch.set_flush_denormal(True)
    print(f"# machine: {machine()}" + (f"; GPU: {torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    # The VM's speed drifts by tens of percent within minutes: the ceiling is measured before and after
    # training and the higher figure is used, so drift cannot flatter the fraction.
    ceiling_before = matmul_ceiling(device=dev)
    print(f"fp32 matmul ceiling before training: {ceiling_before:.1f} GFLOP/s")

    X, X_test, source = load_mnist(args.data_dir)
    print(f"# data: {source}")
    enc_macs = linear_macs((784, 512, 256)) + 2 * 256 * 32
    dec_macs = linear_macs((32, 256, 512, 784))
    train_flops_per_sample = 3 * 2 * (enc_macs + dec_macs)

    cfg = RunConfig(data=DataConfig(binarize="dynamic", val_fraction=0.0),
                    model=ModelConfig(latent_dim=32, hidden=(512, 256), input_dim=784, image_shape=(28, 28)),
                    train=TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, device=dev))

    def timed_fit(cfg):
        """Mean samples/s over epochs 2.. (an epoch's time includes its binarization), and the TrainResult."""
        result = fit(cfg, X, None, progress=False)
        timed = result.history[1:] if len(result.history) > 1 else result.history
        return float(np.mean([h["samples_per_s"] for h in timed])), result

    sps, result = timed_fit(cfg)
    gflops = sps * train_flops_per_sample / 1e9
    ceiling_after = matmul_ceiling(device=dev)
    ceiling = max(ceiling_before, ceiling_after)
    print(f"fp32 matmul ceiling after training: {ceiling_after:.1f} GFLOP/s; used: {ceiling:.1f}")
    print(f"vaelens training: {sps:,.0f} samples/s, {gflops:.1f} GFLOP/s = {gflops / ceiling:.0%} of the ceiling "
          f"(mean of epochs 2..{args.epochs}; -ELBO after {args.epochs} epochs {result.history[-1]['train_loss']:.2f})")

    if args.bf16:
        bf16_ceiling = matmul_ceiling(dtype=torch.bfloat16, device=dev)
        bf_sps, bf_result = timed_fit(cfg.replace(train={"bf16": True}))
        bf_gflops = bf_sps * train_flops_per_sample / 1e9
        print(f"bf16 matmul ceiling: {bf16_ceiling:.1f} GFLOP/s")
        print(f"vaelens training, bf16 autocast: {bf_sps:,.0f} samples/s, {bf_gflops:.1f} GFLOP/s = "
              f"{bf_gflops / bf16_ceiling:.0%} of the bf16 ceiling, {bf_gflops / ceiling:.0%} of the fp32 one; "
              f"{bf_sps / sps:.2f}x float32 (-ELBO after {args.epochs} epochs "
              f"{bf_result.history[-1]['train_loss']:.2f})")

    if not args.skip_plain:
        plain_sps, plain_loss = plain_loop(X, args.epochs, device=dev)
        print(f"plain PyTorch loop: {plain_sps:,.0f} samples/s, {plain_sps * train_flops_per_sample / 1e9:.1f} GFLOP/s "
              f"(-ELBO after {args.epochs} epochs {plain_loss:.2f}; includes its first epoch)")
        print(f"speed-up over the plain loop: {sps / plain_sps:.2f}x")

    module = result.module.eval()
    Xt = torch.as_tensor((X_test > 0.5).astype(np.float32)).to(dev)
    t0 = time.perf_counter()
    evaluate.encode_all(module, Xt)
    _sync(dev)
    dt = time.perf_counter() - t0
    print(f"encoding: {len(Xt) / dt:,.0f} samples/s ({len(Xt)} test images)")

    sub = Xt[:args.iw_n]
    t0 = time.perf_counter()
    evaluate.iwae_log_likelihood(module, sub, k=args.iw_k)
    _sync(dev)
    dt = time.perf_counter() - t0
    pairs = args.iw_n * args.iw_k
    print(f"IWAE evaluation, k={args.iw_k}: {pairs / dt:,.0f} (image, sample) pairs/s; {args.iw_n} images in "
          f"{dt:.1f} s, so 10,000 test images would take {dt * 10000 / args.iw_n / 60:.1f} min "
          f"(extrapolated, this architecture)")


if __name__ == "__main__":
    main()
