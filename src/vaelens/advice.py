"""What a finished training run should tell its user beyond the figures: posterior collapse, raw
columns of very different scales under a Gaussian likelihood, and a table run cut off by its epoch
budget while still improving. Each finding is one line with the usual remedy; `vaelens train`
prints them as warnings and keeps them in its JSON.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .config import RunConfig
from .evaluate import active_units, encode_all

# Below this KL (nats per sample, the whole latent) the latents carry next to nothing about x: the
# issue's collapsed conv model sat at 0.03 after 20 epochs; a healthy digits model has 10 or more.
COLLAPSE_KL = 0.1
# Column standard deviations this many times apart: one column dominates a Gaussian likelihood's
# sum of squared errors (and its -ELBO reaches the hundreds of thousands on raw units).
SCALE_RATIO = 100.0
# Rows encoded to count active units: enough for a variance, cheap even for MNIST-sized sets.
_AU_ROWS = 5000


def collapse(module, X: np.ndarray, history: list, best_epoch: int) -> Optional[str]:
    """A warning when the kept weights use no latent dimension (Burda et al.'s active units, on up to
    `_AU_ROWS` training rows) or their KL is near 0."""
    if not history or X is None or not len(X):
        return None
    record = next((r for r in history if r.get("epoch") == best_epoch), history[-1])
    kl = record.get("val_kl", record.get("train_kl"))
    mu, _ = encode_all(module, X[:_AU_ROWS])
    au, _ = active_units(mu)
    d = mu.shape[1]
    low_kl = kl is not None and kl < COLLAPSE_KL
    if au > 0 and not low_kl:
        return None
    what = " and ".join(([f"{au} of {d} latent dimensions are active"] if au == 0 else [])
                        + ([f"the KL is {kl:.3g} nats per sample"] if low_kl else []))
    return (f"posterior collapse: {what} (epoch {record.get('epoch')}), so the latents say almost nothing "
            f"about each sample. Usual "
            f"remedies: KL warm-up (--warmup-epochs 10), free bits (--free-bits 0.5), a lower --beta, or a "
            f"smaller decoder (--hidden)")


def raw_scales(cfg: RunConfig, X: np.ndarray, feature_names: Optional[Sequence[str]] = None) -> Optional[str]:
    """A hint to --standardize when a Gaussian model sees raw columns whose scales differ by `SCALE_RATIO`."""
    if cfg.model.likelihood != "gaussian" or cfg.data.standardize or X is None or len(X) < 2:
        return None
    std = np.asarray(X, dtype=np.float64).std(axis=0)
    live = np.flatnonzero(std > 0)
    if len(live) < 2:
        return None
    hi, lo = live[np.argmax(std[live])], live[np.argmin(std[live])]
    ratio = std[hi] / std[lo]
    if ratio < SCALE_RATIO:
        return None
    name = (lambda j: repr(feature_names[j]) if feature_names is not None else f"column {j}")
    return (f"the Gaussian likelihood sees raw columns whose scales differ {ratio:,.0f}-fold (std of {name(hi)} "
            f"{std[hi]:.3g}, of {name(lo)} {std[lo]:.3g}), so the largest dominate the fit; --standardize "
            f"(kept in the run and applied to every later file) usually trains a better model")


def budget(cfg: RunConfig, run_dir, epochs_run: int, best_epoch: int, stopped_early: bool) -> Optional[str]:
    """A note when a table run used its whole epoch budget and its best epoch was the last one."""
    if cfg.data.name != "file" or stopped_early or epochs_run < cfg.train.epochs or best_epoch != epochs_run:
        return None
    more = max(2 * epochs_run, epochs_run + 100)
    return (f"the monitored loss was still improving at the last epoch (best epoch {best_epoch} of "
            f"{epochs_run}); more epochs may help: vaelens train --resume {run_dir} --epochs {more}")


def advise(cfg: RunConfig, result, X: np.ndarray, raw: Optional[np.ndarray] = None,
           feature_names: Optional[Sequence[str]] = None, run_dir=None) -> List[str]:
    """Every finding about a finished run (`train.TrainResult`), as one line each; [] for a healthy one.

    X is the prepared training data (model input), `raw` the same rows in data units.
    """
    found = [collapse(result.module, X, result.history, result.best_epoch),
             raw_scales(cfg, raw if raw is not None else X, feature_names),
             budget(cfg, run_dir, result.epochs_run, result.best_epoch, result.stopped_early)]
    return [f for f in found if f]
