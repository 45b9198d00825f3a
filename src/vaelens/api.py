"""The estimator users import: ``from vaelens import VAE``.

scikit-learn conventions: the constructor only stores parameters, `fit` validates and
returns self, learned state ends in ``_``. Inputs may be numpy arrays or torch tensors;
outputs are numpy arrays. Every inference call runs in eval mode under inference_mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import checkpoint as ck
from . import data as data_mod
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .data import Dataset
from .errors import ConfigError, DataError, VaelensError
from .evaluate import Evaluation
from .evaluate import encode_all as _encode_all
from .evaluate import evaluate as _evaluate
from .evaluate import iwae_log_likelihood as _iwae_log_likelihood
from .model import VAEModule, seeded
from .train import fit as _fit
from .train import prepare as _prepare

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


@dataclass(frozen=True)
class Posterior:
    """q(z|x) = N(mu, diag(sigma^2)) for each of n samples.

    Attributes
    ----------
    mu : ndarray of shape (n, d)
    sigma : ndarray of shape (n, d), all > 0
    """

    mu: np.ndarray
    sigma: np.ndarray

    @property
    def var(self) -> np.ndarray:
        return self.sigma ** 2

    def __len__(self) -> int:
        return len(self.mu)


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"input_dim", "image_shape"}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"epochs", "seed"}
_DATA_FIELDS = {"binarize", "standardize", "val_fraction"}


class VAE:
    """A variational autoencoder with a diagonal-Gaussian encoder and a N(0, I) prior.

    Parameters
    ----------
    latent_dim : int
    hidden : tuple of int
        Hidden layer sizes of the encoder trunk (the decoder mirrors them); () for linear.
    likelihood : {"bernoulli", "cbernoulli", "gaussian"}
    **kwargs
        Any other field of `ModelConfig` (``arch``, ``activation``, ``gaussian_scale``,
        ``sigma_floor`` ...), `TrainConfig` (``lr``, ``batch_size``, ``beta``, ``objective`` ...)
        or ``binarize``, ``standardize``, ``val_fraction``.

    Attributes
    ----------
    module_ : VAEModule
        The trained torch module (eval mode).
    config_ : RunConfig
    history_ : list of dict
        One metrics record per epoch.
    n_features_in_ : int
    """

    def __init__(self, latent_dim: int = 8, hidden: Tuple[int, ...] = (256, 128), likelihood: str = "bernoulli",
                 **kwargs):
        self.latent_dim = latent_dim
        self.hidden = tuple(hidden)
        self.likelihood = likelihood
        unknown = set(kwargs) - _MODEL_FIELDS - _TRAIN_FIELDS - _DATA_FIELDS
        if unknown:
            raise ConfigError(f"VAE: unknown parameter(s) {', '.join(sorted(unknown))}")
        self.params = dict(kwargs)

    # --- configuration ---------------------------------------------------------------------
    def _config(self, epochs: int, seed: int) -> RunConfig:
        p = self.params
        model = ModelConfig(latent_dim=self.latent_dim, hidden=self.hidden, likelihood=self.likelihood,
                            **{k: v for k, v in p.items() if k in _MODEL_FIELDS})
        train = TrainConfig(epochs=epochs, seed=seed, **{k: v for k, v in p.items() if k in _TRAIN_FIELDS})
        data = DataConfig(name="array", **{k: v for k, v in p.items() if k in _DATA_FIELDS})
        return RunConfig(data=data, model=model, train=train)

    @classmethod
    def from_config(cls, cfg: RunConfig, module: VAEModule) -> "VAE":
        est = cls(latent_dim=cfg.model.latent_dim, hidden=cfg.model.hidden, likelihood=cfg.model.likelihood)
        est.config_ = cfg
        est.module_ = module.eval()
        est.n_features_in_ = cfg.model.input_dim
        est.history_ = []
        return est

    # --- training --------------------------------------------------------------------------
    def fit(self, X: ArrayLike, X_val: Optional[ArrayLike] = None, *, epochs: int = 100, seed: int = 0,
            image_shape: Optional[Tuple[int, int]] = None, run_dir: Optional[Union[str, Path]] = None,
            progress: Optional[bool] = False) -> "VAE":
        """Train on X (n, p); returns self.

        Parameters
        ----------
        X : array-like of shape (n, p), or (n, h, w) images
        X_val : array-like of shape (m, p), optional
            Validation data for early stopping; without it ``val_fraction`` of X is held out.
        epochs, seed : int
        image_shape : (h, w), optional
            Needed for ``arch="conv"`` when X is flattened.
        run_dir : path, optional
            Also write a run directory (config, weights, metrics) there.
        """
        ds = _as_dataset(X, "X", image_shape)
        val = None if X_val is None else _as_dataset(X_val, "X_val", image_shape)
        cfg = self._config(epochs, seed)
        if val is not None:
            cfg = cfg.replace(data={"val_fraction": 0.0})
        cfg, Xtr, Xv = _prepare(cfg, ds, val)
        if run_dir is not None and Path(run_dir).exists() and any(Path(run_dir).iterdir()):
            raise VaelensError(f"{run_dir}: already exists and is not empty; choose another run directory")
        result = _fit(cfg, Xtr, Xv, run_dir=None if run_dir is None else Path(run_dir), progress=progress)
        self.module_ = result.module
        self.config_ = result.config
        self.history_ = result.history
        self.n_features_in_ = cfg.model.input_dim
        self.result_ = result
        return self

    # --- inference -------------------------------------------------------------------------
    def _check(self) -> None:
        if not hasattr(self, "module_"):
            raise VaelensError("this VAE is not fitted yet: call fit(X) or VAE.load(path) first")

    def _tensor(self, X: ArrayLike, where: str = "X") -> torch.Tensor:
        """Validate and transform new data exactly as the training data was."""
        self._check()
        ds = _as_dataset(X, where, None)
        Xn = data_mod.apply_transform(ds.X, self.config_.transform) if self.config_.data.standardize else ds.X
        data_mod.validate(Xn, self.config_.model.likelihood, where, self.n_features_in_)
        return torch.as_tensor(Xn, dtype=torch.float32, device=self.device_)

    @property
    def device_(self) -> torch.device:
        self._check()
        return next(self.module_.parameters()).device

    def encode(self, X: ArrayLike, batch_size: int = 4096) -> Posterior:
        """Per-sample posterior q(z|x): mu and sigma of shape (n, d), float32."""
        Xt = self._tensor(X)
        mu, sigma = _encode_all(self.module_, Xt, batch_size=batch_size)
        return Posterior(mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))

    def transform(self, X: ArrayLike) -> np.ndarray:
        """The posterior means mu(x), shape (n, d): the usual latent representation."""
        return self.encode(X).mu

    def sample_latent(self, X: ArrayLike, n_samples: int = 1, seed: Optional[int] = None) -> np.ndarray:
        """Reparameterized z = mu + sigma * eps through the training path, shape (n_samples, n, d)."""
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        Xt = self._tensor(X)
        self.module_.eval()
        with torch.inference_mode(), seeded(seed, Xt.device):
            z = self.module_.encoder(Xt).rsample((n_samples,))               # (S, n, d)
        return z.cpu().numpy()

    def decode(self, Z: ArrayLike, mean: bool = True) -> np.ndarray:
        """Decoder output for latent points Z (m, d): the likelihood's mean (or a draw), in data units."""
        self._check()
        Zt = torch.as_tensor(np.asarray(Z, dtype=np.float32), device=self.device_)
        if Zt.ndim != 2 or Zt.shape[1] != self.config_.model.latent_dim:
            raise DataError(f"Z: expected shape (m, {self.config_.model.latent_dim}), got {tuple(Zt.shape)}")
        if not torch.isfinite(Zt).all():
            raise DataError("Z: contains NaN or infinite values")
        self.module_.eval()
        with torch.inference_mode():
            px = self.module_.decoder(Zt)
            out = px.mean if mean else px.sample()
        out = out.cpu().numpy()
        return data_mod.invert_transform(out, self.config_.transform) if self.config_.data.standardize else out

    def reconstruct(self, X: ArrayLike) -> np.ndarray:
        """Decoder mean at z = mu(x), shape (n, p), in data units."""
        return self.decode(self.encode(X).mu)

    def generate(self, n: int, seed: Optional[int] = None) -> np.ndarray:
        """Decoder means for n draws z ~ N(0, I), shape (n, p)."""
        self._check()
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.config_.model.latent_dim, generator=g)
        return self.decode(z.numpy())

    def elbo(self, X: ArrayLike, n_samples: int = 1, seed: Optional[int] = 0, batch_size: int = 4096) -> np.ndarray:
        """Per-sample ELBO in nats, shape (n,), with `n_samples` draws of z per sample."""
        Xt = self._tensor(X)
        out = []
        self.module_.eval()
        with torch.inference_mode(), seeded(seed, Xt.device):
            for i in range(0, len(Xt), batch_size):
                out.append(self.module_.terms(Xt[i:i + batch_size], n_samples=n_samples).elbo)
        return torch.cat(out).double().cpu().numpy()

    def log_likelihood(self, X: ArrayLike, k: int = 5000, seed: Optional[int] = 0, batch_size: Optional[int] = None,
                       chunk_size: Optional[int] = None, progress: bool = False,
                       distributed: bool = False) -> np.ndarray:
        """Per-sample IWAE estimate of log p(x) in nats with `k` importance samples, shape (n,).

        In the model's units: for a standardized run, log p of the standardized data. Binary
        data (a binarized run) should be binarized before the call. A row's figure depends on
        `seed` and its row index only, not on the batching; with `distributed` under torchrun the
        ranks share the rows and all get the whole result.
        """
        return _iwae_log_likelihood(self.module_, self._tensor(X), k, chunk_size=chunk_size, batch_size=batch_size,
                                    progress=progress, seed=seed, distributed=distributed)

    def evaluate(self, X: ArrayLike, iw_samples: int = 5000, seed: Optional[int] = 0, progress: bool = False,
                 **kwargs) -> Evaluation:
        """ELBO terms, IWAE log-likelihood, active units, I(x; z) and KL(q(z) || p(z)) on X.

        Returns a `vaelens.evaluate.Evaluation`; ``to_dict()`` gives its JSON summary. Other keyword
        arguments go to `vaelens.evaluate.evaluate` (``elbo_samples``, ``aggregate_draws`` ...).
        """
        return _evaluate(self.module_, self._tensor(X), iw_samples, seed=seed, progress=progress, **kwargs)

    # --- what mu(x) and sigma(x) are ------------------------------------------------------
    def check(self, X: ArrayLike, indices: Optional[Sequence[int]] = None, n: int = 10, n_samples: int = 2000,
              level: float = 0.01, seed: int = 0, mu: Optional[np.ndarray] = None,
              sigma: Optional[np.ndarray] = None):
        """Point-cloud check: do S reparameterized draws for each chosen x follow N(mu(x), sigma(x)^2)?

        Parameters
        ----------
        X : array-like of shape (m, p)
        indices : sequence of int, optional
            Rows of X to check; default `n` rows chosen at random with `seed`.
        n_samples, level, seed
            Draws per sample, overall significance level, seed.
        mu, sigma : ndarray of shape (k, d), optional
            A claimed posterior to test instead of the encoder's (a wrong claim fails).

        Returns
        -------
        vaelens.posterior.PointCloudCheck
        """
        from .posterior import point_cloud_check

        Xt = self._tensor(X)
        if indices is None:
            if n < 1:
                raise ConfigError(f"n must be >= 1, got {n}")
            indices = np.sort(np.random.default_rng(seed).choice(len(Xt), size=min(n, len(Xt)), replace=False))
        return point_cloud_check(self.module_, Xt, indices, n_samples=n_samples, seed=seed, level=level,
                                 mu=mu, sigma=sigma)

    def aggregate_posterior(self, X: ArrayLike):
        """The data set's latent distribution q(z) = mean_x q(z|x): mean, covariance and variance split.

        Returns
        -------
        vaelens.posterior.AggregatePosterior
        """
        from .posterior import aggregate_posterior

        post = self.encode(X)
        return aggregate_posterior(post.mu, post.sigma)

    def symmetry(self, X: ArrayLike, seed: int = 0, n_rotations: int = 3, n_samples: int = 16):
        """ELBO under a random signed permutation (unchanged) and random rotations (lower) of the latents.

        Returns
        -------
        vaelens.uniqueness.SymmetryReport
        """
        from .uniqueness import symmetry_report

        return symmetry_report(self.module_, self._tensor(X), seed=seed, n_rotations=n_rotations,
                               n_samples=n_samples)

    # --- persistence -----------------------------------------------------------------------
    def save(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """Write a run directory (config.json, model.safetensors) that `VAE.load` and the CLI read."""
        self._check()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise VaelensError(f"{path}: already exists and is not empty; pass overwrite=True to replace it")
        path.mkdir(parents=True, exist_ok=True)
        ck.save_config(path, self.config_)
        ck.save_tensors(path / ck.WEIGHTS, self.module_.state_dict())
        summary = getattr(self, "result_", None)
        ck.write_summary(path, summary.summary if summary is not None else {})
        return path

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "cpu") -> "VAE":
        """Load a run directory written by `save` or `vaelens train`."""
        cfg, module = ck.load_model(Path(path), map_location=device)
        est = cls.from_config(cfg, module)
        est.history_ = ck.read_metrics(Path(path))
        return est

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"VAE(latent_dim={self.latent_dim}, hidden={self.hidden}, likelihood={self.likelihood!r}{extra})"


def _as_dataset(X: ArrayLike, where: str, image_shape) -> Dataset:
    if isinstance(X, Dataset):
        return X
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        arr = np.asarray(X)
    except ValueError as e:
        raise DataError(f"{where}: cannot be read as an array ({e})") from None
    if arr.dtype == object:
        raise DataError(f"{where}: ragged or non-numeric input (dtype object)")
    if arr.ndim == 1:
        raise DataError(f"{where}: expected a 2-D array (samples, features), got 1-D shape {arr.shape}; "
                        f"use X.reshape(-1, 1) for one feature or X.reshape(1, -1) for one sample")
    if arr.ndim == 3:
        ds = data_mod._from_array(arr, where)
    else:
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: expected numbers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise DataError(f"{where}: expected a 2-D array (samples, features), got shape {arr.shape}")
        with np.errstate(over="ignore"):
            X32 = arr.astype(np.float32)
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 and np.isfinite(arr).all() and not np.isfinite(X32).all():
            data_mod.check_finite(X32, where, what="values too large for float32 (|x| > 3.4e38)")
        ds = Dataset(X=X32, name=where, image_shape=image_shape)
    if image_shape is not None:
        ds.image_shape = tuple(image_shape)
    return ds
