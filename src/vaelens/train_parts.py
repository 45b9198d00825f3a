"""The parts of the training loop that do not depend on where the data lives: device and bf16 set-up,
the epochs' seeds, dynamic binarization, optimizer and schedule, the signal flag, divergence messages and
the validation pass. `vaelens.train` (data in memory) and `vaelens.stream` (data read in blocks) share them.
"""

from __future__ import annotations

import math
import signal
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import torch

from . import checkpoint as ck
from .config import RunConfig
from .errors import ConfigError, TrainingDiverged
from .model import VAEModule, seeded

VAL_SEED_OFFSET = 7_919  # validation noise (and a held-out set's binarization) is seeded apart from the training stream


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device 'cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def bf16_autocast(device: torch.device):
    """bf16 autocast for the training step on `device` (CUDA, or a CPU).

    On a CPU without native bf16 arithmetic (AVX-512 BF16 or AMX) bf16 is emulated and slower than
    float32; it still trains correctly, so this warns instead of refusing.
    """
    if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported():
        warnings.warn("train.bf16: this CPU has no native bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 "
                      "autocast is emulated and slower than float32; drop --bf16 on this machine")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63 - 1)


def binarize_dynamic(X: torch.Tensor, seed: int, parts: int = 0, out: Optional[torch.Tensor] = None,
                     chunk_rows: int = 2048) -> torch.Tensor:
    """x ~ Bernoulli(X) elementwise, drawn in `parts` row blocks on as many threads.

    torch's CPU generator fills a tensor on one thread (about 2-8 ns a number: 0.1-0.4 s for MNIST);
    seeded blocks drawn in parallel keep the result a function of `seed`. Each block draws its
    uniforms `chunk_rows` rows at a time into one small buffer and compares them straight into
    `out` (given: reused, e.g. every epoch): a fresh 188 MB result and its 188 MB of uniforms cost
    more in page faults than the draw itself. A block's numbers are the same however it is chunked.
    """
    out = torch.empty_like(X) if out is None else out
    if X.device.type != "cpu":
        g = torch.Generator(device=X.device).manual_seed(seed)
        return torch.lt(torch.rand(X.shape, generator=g, device=X.device), X, out=out)
    parts = parts or max(1, min(torch.get_num_threads(), len(X) // 4096, 8))
    blocks = [(i * len(X) // parts, (i + 1) * len(X) // parts) for i in range(parts)]

    def draw_into(b):
        lo, hi = blocks[b]
        g = torch.Generator().manual_seed(seed * 16 + b)
        u = torch.empty((min(chunk_rows, hi - lo), *X.shape[1:]))
        for a in range(lo, hi, chunk_rows):
            n = min(chunk_rows, hi - a)
            torch.rand((n, *X.shape[1:]), generator=g, out=u[:n])
            torch.lt(u[:n], X[a:a + n], out=out[a:a + n])

    if parts == 1:
        draw_into(0)
    else:
        with ThreadPoolExecutor(parts) as pool:
            list(pool.map(draw_into, range(parts)))
    return out


def build_optimizer(cfg: RunConfig, params, device: torch.device):
    t = cfg.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    kw = dict(lr=t.lr, weight_decay=t.weight_decay)
    try:
        # The fused kernel updates all parameters in one pass: several times faster per step.
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)


def build_scheduler(cfg: RunConfig, opt):
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t.lr_gamma)
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=t.lr_gamma if t.lr_gamma < 1 else 0.5,
                                                          patience=max(1, (t.patience or 10) // 3))
    return None


class SignalStop:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps, so it can save first."""

    def __init__(self):
        self.name: Optional[str] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None:  # a second signal: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def last_checkpoint(run_dir: Path) -> str:
    """Where a stopped run can be continued from, in words."""
    found = ck.checkpoint_candidates(run_dir) if run_dir is not None else []
    if not found:
        return "no checkpoint was written yet"
    return f"the last complete checkpoint is {found[0]}; continue with: vaelens train --resume {run_dir}"


def check_weights(params, last, run_dir: Optional[Path]) -> None:
    """Raise TrainingDiverged, naming the gradient of step `last`, if a weight is no longer finite."""
    # the largest magnitude, not the 2-norm: squares of huge but finite weights would overflow
    if last is not None and not torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)):
        raise TrainingDiverged(diverged_message(*last, "gradient", run_dir))


def diverged_message(epoch: int, step: int, terms, what: str, run_dir: Optional[Path] = None) -> str:
    bad = [name for name, v in (("reconstruction", terms.rec), ("KL", terms.kl)) if not torch.isfinite(v).all()]
    term = f" ({' and '.join(bad)} term)" if bad else (" (both loss terms were finite)" if what == "gradient" else "")
    found = ck.checkpoint_candidates(run_dir) if run_dir is not None else []
    kept = (f" The last good checkpoint, {found[0]}, is kept." if found else
            " No checkpoint had been written yet." if run_dir is not None else "")
    return (f"training diverged at epoch {epoch + 1}, step {step + 1}: the {what} became non-finite"
            f"{term}.{kept} Try a lower learning rate (--lr), gradient "
            f"clipping (--grad-clip 1.0), a larger sigma floor (--sigma-floor), or standardizing the data "
            f"(--standardize).")


def validation_terms(module: VAEModule, X: torch.Tensor, seed: int, batch_size: int = 1024) -> dict:
    """Mean ELBO terms on X with noise seeded apart from the training stream (eval mode)."""
    return validation_terms_of(module, (X[i:i + batch_size] for i in range(0, len(X), batch_size)), X.device, seed)


@torch.inference_mode()
def validation_terms_of(module: VAEModule, batches: Iterable[torch.Tensor], device: torch.device, seed: int) -> dict:
    """Mean ELBO terms over `batches` (each (b, p) on `device`), the noise seeded by `seed` (eval mode): the
    same figures whether the rows are sliced from one tensor or read block by block."""
    was_training = module.training
    module.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    n = 0
    with seeded(seed, device):
        for xb in batches:
            tm = module.terms(xb)
            tot += torch.stack([tm.elbo.double().sum(), tm.rec.double().sum(), tm.kl.double().sum()])
            n += len(xb)
    module.train(was_training)
    return {"elbo": float(tot[0] / n), "rec": float(tot[1] / n), "kl": float(tot[2] / n)}
