"""Experiment tracking: TensorBoard event files in RUN/tensorboard, written from `train.fit`'s epoch callback.

`TensorBoardLogger` is called on rank 0 only (fit calls its callback there alone) with each epoch's
record and the model. One step is one epoch, so a resumed run continues the same curves: the writer
opens at the first epoch this invocation logs with ``purge_step`` set to it, and TensorBoard's
readers drop what an earlier invocation logged from that epoch on (epochs trained after the last
checkpoint and trained again), so no step appears twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import RunConfig
from .errors import VaelensError
from .evaluate import ACTIVE_THRESHOLD, active_units, encode_all

SUBDIR = "tensorboard"
IMAGE_EVERY = 10  # epochs between image summaries (and the last epoch)
N_IMAGES = 8
N_ACTIVITY = 2000  # rows whose posterior means give the active-unit count each epoch


def require_tensorboard():
    """torch.utils.tensorboard.SummaryWriter, or one line naming the install (tensorboard is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VaelensError("--tensorboard needs the tensorboard package: pip install 'vaelens[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLogger:
    """fit's ``on_epoch`` callback (with ``on_epoch_model=True``): scalars every epoch, images every
    IMAGE_EVERY epochs and the last for image runs, the config with the final metrics at `close`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, X: np.ndarray):
        self.folder = Path(run_dir) / SUBDIR
        self.cfg = cfg
        self.shown = np.asarray(X[:N_IMAGES], dtype=np.float32) if cfg.model.image_shape else None
        self.rows = np.asarray(X[:N_ACTIVITY], dtype=np.float32)
        self.writer = None
        self.last: Optional[dict] = None

    def __call__(self, record: dict, module: Optional[torch.nn.Module] = None) -> None:
        if self.writer is None:
            # opened at the first epoch logged here: on resume, earlier events from this epoch on are purged
            self.writer = require_tensorboard()(log_dir=str(self.folder), purge_step=record["epoch"])
        step, w = record["epoch"], self.writer
        for key, tag in (("train_loss", "loss/train"), ("train_rec", "reconstruction/train"),
                         ("train_kl", "kl/train"), ("val_loss", "loss/validation"),
                         ("val_rec", "reconstruction/validation"), ("val_kl", "kl/validation"),
                         ("beta", "train/beta"), ("lr", "train/learning_rate"),
                         ("samples_per_s", "train/samples_per_s")):
            if record.get(key) is not None:
                w.add_scalar(tag, record[key], step)
        for j, v in enumerate(record.get("kl_per_dim") or ()):
            w.add_scalar(f"kl_per_dim/{j}", v, step)
        if module is not None and len(self.rows) > 1:
            w.add_scalar("active_units", self._active(module), step)
        last = step >= self.cfg.train.epochs
        if module is not None and self.shown is not None and (step % IMAGE_EVERY == 0 or last or step == 1):
            self._images(module, step)
        self.last = record
        w.flush()

    def _active(self, module: torch.nn.Module) -> int:
        """Burda et al.'s active units (Var_x mu_u(x) > 0.01) on the validation rows (or the first training rows)."""
        was_training = module.training
        mu, _ = encode_all(module, self.rows)
        module.train(was_training)
        return active_units(mu, ACTIVE_THRESHOLD)[0]

    def _images(self, module: torch.nn.Module, step: int) -> None:
        """Originals over their reconstructions (decoder mean at mu), and decoder means of prior draws."""
        h, w = self.cfg.model.image_shape
        device = next(module.parameters()).device
        gen = torch.Generator().manual_seed(0)  # its own stream: the training's random state is left alone
        was_training = module.training
        module.eval()
        with torch.inference_mode():
            x = torch.as_tensor(self.shown, device=device)
            rec = module.generative(module.inference(x).mean).mean
            z = torch.randn(N_IMAGES * 2, module.latent_dim, generator=gen).to(device)
            prior = module.generative(z).mean
        module.train(was_training)
        self.writer.add_images("reconstructions", self._pixels(torch.cat([x, rec]), h, w), step)
        self.writer.add_images("prior_samples", self._pixels(prior, h, w), step)

    def _pixels(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        t = t.float().cpu()
        tr = self.cfg.transform
        if self.cfg.data.standardize and tr is not None:
            t = t * torch.tensor(tr.std) + torch.tensor(tr.mean)
        return t.clamp(0, 1).reshape(-1, 1, h, w)

    def close(self) -> None:
        """The run's config as hyper-parameters with the last epoch's figures as their metrics."""
        if self.writer is None:
            return
        if self.last is not None:
            metrics = {f"hparam/{k}": float(v) for k, v in self.last.items()
                       if k in ("train_loss", "train_rec", "train_kl", "val_loss", "val_rec", "val_kl")}
            self.writer.add_hparams(hparams(self.cfg), metrics, run_name="hparams", global_step=self.last["epoch"])
        self.writer.close()
        self.writer = None


def hparams(cfg: RunConfig) -> dict:
    """The config's model, data and train fields as flat scalars (tuples and None as text)."""
    out = {}
    for section in ("data", "model", "train"):
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(v, bool) or isinstance(v, (int, float, str)):
                out[f"{section}.{k}"] = v
            elif v is not None:
                out[f"{section}.{k}"] = ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    return out
