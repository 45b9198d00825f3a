"""What a learned prior costs per training step: the MNIST IWAE step with N(0, I), a MoG and the VampPrior.

The step is the one `vaelens train` takes for the `best` recipe of benchmarks/mnist_nll.py (784-400-400-50
ReLU, Bernoulli, IWAE k = 20 with DReG, batch 100, Adam), float32, timed as forward, backward and the
optimizer update on dynamically binarized MNIST batches. The mixture priors have K = 500 components;
the VampPrior's pseudo-inputs start at 500 training images. With --weights RUN the VampPrior's weights
come from a trained run (its components are then narrow, and far from most z, as in late training).

Each prior is timed in `--rounds` rounds, taking turns, so that a machine whose speed drifts affects all
of them alike; the median of the rounds is printed.

Run:  python benchmarks/prior_step.py --data-dir ../shared/data/mnist [--threads 2] [--weights RUN]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from mnist_nll import machine  # beside this file: the same host line as the likelihood benchmark
from vaelens import data as data_mod
from vaelens.config import ConfigError, DataConfig, ModelConfig
from vaelens.errors import VaelensError

PRIORS = ("normal", "mog", "vamp")


def build(prior: str, X: torch.Tensor, weights):
    from vaelens.checkpoint import load_model
    from vaelens.model import VAEModule

    if weights is not None and prior == "vamp":
        cfg, module = load_model(Path(weights))
        if cfg.model.prior != "vamp":
            raise ConfigError(f"that run's prior is {cfg.model.prior!r}, not 'vamp'")
        return module.train()
    cfg = ModelConfig(latent_dim=50, hidden=(400, 400), activation="relu", likelihood="bernoulli", input_dim=784,
                      prior=prior, prior_components=500 if prior != "normal" else None)
    module = VAEModule(cfg)
    module.init_prior(X, seed=0)
    return module.train()


def time_steps(module, X: torch.Tensor, opt, start: int, steps: int, batch: int = 100) -> float:
    """Milliseconds per training step over `steps` steps from batch `start`."""
    t0 = time.perf_counter()
    for i in range(start, start + steps):
        j = (i * batch) % (len(X) - batch)
        x = torch.bernoulli(X[j:j + batch])                                  # dynamic binarization
        loss, _ = module(x, objective="iwae", iw_samples=20, dreg=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("VAELENS_DATA_DIR"),
                    help="folder with the MNIST IDX files (default $VAELENS_DATA_DIR)")
    ap.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated, of {', '.join(PRIORS)}")
    ap.add_argument("--weights", help="a trained VampPrior run folder whose weights the vamp step starts from")
    ap.add_argument("--steps", type=int, default=30, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if not args.data_dir:
        ap.error("no MNIST folder: pass --data-dir or set VAELENS_DATA_DIR")
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    if any(p not in PRIORS for p in priors):
        ap.error(f"--priors: choose from {', '.join(PRIORS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    try:
        train = data_mod.load(DataConfig(name="mnist", data_dir=args.data_dir), "train")
    except VaelensError as e:  # a missing or damaged folder: one line, exit status 2
        ap.error(f"--data-dir {args.data_dir}: {e}")
    X = torch.as_tensor(train.X[:20000], dtype=torch.float32)
    print(f"machine: {machine()}")
    try:
        models = {p: build(p, X, args.weights) for p in priors}
    except VaelensError as e:  # --weights is not a readable run
        ap.error(f"--weights {args.weights}: {e}")
    opts = {p: torch.optim.Adam(m.parameters(), 1e-4) for p, m in models.items()}
    for p in priors:                                                         # warm-up: allocator, thread pool
        time_steps(models[p], X, opts[p], 0, 5)
    times = {p: [] for p in priors}
    for r in range(args.rounds):
        for p in priors:
            times[p].append(time_steps(models[p], X, opts[p], 5 + r * args.steps, args.steps))
    base = statistics.median(times["normal"]) if "normal" in times else None
    for p in priors:
        med = statistics.median(times[p])
        rel = f", {med / base:.2f}x the N(0, I) step" if base else ""
        print(f"{p:7s} {med:7.1f} ms a step (rounds: {', '.join(f'{t:.1f}' for t in times[p])}){rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
