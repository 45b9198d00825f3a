"""The estimator users import: ``from vaelens import VAE``.

scikit-learn conventions: the constructor only stores parameters (every option of the config
sections, defaults read from them), `fit` validates and returns self, learned state ends in
``_``. Inputs may be numpy arrays or torch tensors in data units; `VAE.model_input` is the one
path from them to the model (validation, the run's binarization with a seed, its
standardization; docs/datapath.md). Outputs are numpy arrays. Every inference call runs in
eval mode under inference_mode.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from . import checkpoint as ck
from . import data as data_mod
from . import gap as _gap
from .config import GAP_K, GAP_REFINE_STEPS, DataConfig, ModelConfig, RunConfig, TrainConfig, options
from .data import Dataset
from .errors import ConfigError, DataError, VaelensError
from .evaluate import Evaluation
from .evaluate import elbo_terms as _elbo_terms
from .evaluate import encode_all as _encode_all
from .evaluate import evaluate as _evaluate
from .evaluate import iwae_log_likelihood as _iwae_log_likelihood
from .evaluate import prior_of
from .model import VAEModule, moments, seeded
from .posterior import Posterior, aggregate_posterior, point_cloud_check
from .train import fit as _fit
from .train import prepare as _prepare
from .uniqueness import symmetry_report

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


# --- the estimator's parameters --------------------------------------------------------------
# Every user-settable option of the config (`config.options()`, the source the `vaelens train` flags
# are generated from too) is a parameter of `VAE.__init__`, with the config's own default: defaults
# are written once, in vaelens.config. Fields filled from the data (input_dim, image_shape) and the
# data-source fields (name, path, key ...) are not parameters.
_OPTIONS = tuple(o for o in options() if o.api)
# Importance samples per row for `score_samples`/`score`: enough for a model-selection ranking at a
# few milliseconds a row; `log_likelihood` takes k explicitly for reported figures.
SCORE_K = 100


def _signature() -> inspect.Signature:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for o in _OPTIONS:
        if o.default is dataclasses.MISSING:  # a bug in config.py, not user input
            raise TypeError(f"config field {o.key} has no plain default")
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.type))
    params.append(inspect.Parameter("score_k", inspect.Parameter.KEYWORD_ONLY, default=SCORE_K, annotation=int))
    return inspect.Signature(params)


def _plain(v):
    """A parameter value as the config takes it: numpy scalars (a grid search's) as Python, lists as tuples."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, np.ndarray)):
        return tuple(_plain(e) for e in v)
    return v


class VAE(TransformerMixin, BaseEstimator):
    """A variational autoencoder: a Gaussian encoder (diagonal or full covariance) and a prior p(z)
    (N(0, I), a mixture of Gaussians, or the VampPrior); docs/families.md.

    A scikit-learn estimator: the constructor only stores its keyword parameters, `fit` validates
    and returns self, learned state ends in ``_``; `get_params`, `set_params`, `clone`, Pipelines
    and grid searches work. The parameters are every option of `vaelens.config.ModelConfig`,
    `TrainConfig` and ``binarize``, ``standardize``, ``val_fraction`` of `DataConfig`, with the
    defaults written there (``inspect.signature(VAE)`` lists them), and ``score_k``.

    Parameters
    ----------
    latent_dim : int
    hidden : tuple of int
        Hidden layer sizes of the encoder trunk (the decoder mirrors them); () for linear.
    likelihood : {"bernoulli", "cbernoulli", "gaussian"}
    posterior : {"diagonal", "full"}
        The family of q(z|x); prior : {"normal", "mog", "vamp"}; prior_components : int or None.
    activation, arch, gaussian_scale, fixed_scale, sigma_floor, conv_channels
        The rest of `ModelConfig`.
    epochs, batch_size, lr, optimizer, weight_decay, schedule, lr_gamma, grad_clip, objective,
    iw_samples, dreg, beta, warmup_epochs, free_bits, patience, seed, device, bf16
        `TrainConfig`.
    binarize : {"none", "static", "dynamic"}
    standardize : bool
    val_fraction : float
    score_k : int
        Importance samples per row of `score_samples` and `score`.

    Attributes
    ----------
    module_ : VAEModule
        The trained torch module (eval mode).
    config_ : RunConfig
    history_ : list of dict
        One metrics record per epoch.
    n_features_in_ : int
    latent_dim_ : int

    Inputs may be numpy arrays, torch tensors or `Dataset`s in data units; every method that feeds
    the model prepares them with `model_input` (see there, and docs/datapath.md). Outputs are numpy.
    """

    def __init__(self, **params):
        unknown = sorted(set(params) - set(_PARAM_NAMES))
        if unknown:
            raise ConfigError(f"VAE: unknown parameter(s) {', '.join(unknown)}; "
                              f"the parameters are {', '.join(_PARAM_NAMES)}")
        for p in _SIGNATURE.parameters.values():
            if p.name != "self":
                setattr(self, p.name, params.get(p.name, p.default))

    # --- configuration ---------------------------------------------------------------------
    def _run_config(self) -> RunConfig:
        """The run configuration the parameters describe (validated when `fit` prepares the data)."""
        section = {name: {o.name: _plain(getattr(self, o.name)) for o in _OPTIONS if o.section == name}
                   for name in ("data", "model", "train")}
        return RunConfig(data=DataConfig(name="array", **section["data"]), model=ModelConfig(**section["model"]),
                         train=TrainConfig(**section["train"]))

    @classmethod
    def from_config(cls, cfg: RunConfig, module: VAEModule) -> "VAE":
        """A fitted estimator for a run's config and trained module; its parameters are the run's."""
        values = {"model": cfg.model, "train": cfg.train, "data": cfg.data}
        est = cls(**{o.name: getattr(values[o.section], o.name) for o in _OPTIONS})
        est.config_ = cfg
        est.module_ = module.eval()
        est.n_features_in_ = cfg.model.input_dim
        est.history_ = []
        return est

    # --- training --------------------------------------------------------------------------
    def fit(self, X: ArrayLike, y=None, *, X_val: Optional[ArrayLike] = None, epochs: Optional[int] = None,
            seed: Optional[int] = None, image_shape: Optional[Tuple[int, int]] = None,
            run_dir: Optional[Union[str, Path]] = None, progress: Optional[bool] = False) -> "VAE":
        """Train on X (n, p); returns self.

        Parameters
        ----------
        X : array-like of shape (n, p), or (n, h, w) images
        y : ignored
            Present for scikit-learn (Pipelines pass labels through); a VAE is unsupervised.
        X_val : array-like of shape (m, p), optional
            Validation data for early stopping; without it ``val_fraction`` of X is held out.
        epochs, seed : int, optional
            Override the ``epochs`` and ``seed`` parameters for this fit only (the parameters, and so
            `get_params` and `clone`, stay as they are; ``config_`` records what was used).
        image_shape : (h, w), optional
            Needed for ``arch="conv"`` when X is flattened.
        run_dir : path, optional
            Also write a run directory (config, weights, metrics) there.
        """
        if y is not None and np.ndim(y) == 2 and np.shape(y)[1:] == np.shape(X)[1:]:
            raise ConfigError("fit(X, y): y is ignored (a VAE is unsupervised); pass validation data as X_val=")
        ds = as_dataset(X, "X", image_shape)
        val = None if X_val is None else as_dataset(X_val, "X_val", image_shape)
        cfg = self._run_config()
        overrides = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
        cfg = cfg.replace(train=overrides, data={"val_fraction": 0.0} if val is not None else {})
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

    # --- the one path from user data to model input ----------------------------------------
    def _check(self) -> None:
        if not hasattr(self, "module_"):
            raise VaelensError("this VAE is not fitted yet: call fit(X) or VAE.load(path) first")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    @property
    def device_(self) -> torch.device:
        self._check()
        return next(self.module_.parameters()).device

    @property
    def latent_dim_(self) -> int:
        """The fitted model's latent dimension d (the ``latent_dim`` parameter may have been set since)."""
        self._check()
        return int(self.config_.model.latent_dim)

    @property
    def binarized_(self) -> bool:
        """Whether the run was trained on binarized data (``binarize`` static or dynamic)."""
        self._check()
        return self.config_.data.binarize != "none"

    def binarize_input(self, X: ArrayLike, seed: Optional[int] = 0) -> np.ndarray:
        """X in data units as the model sees it: for a binarized run one seeded binarization, else X itself.

        Returns float32 of shape (n, p), checked like `model_input` (shape, numbers, finite, feature
        count, the likelihood's support). For a run trained with ``binarize`` static or dynamic each
        value becomes one Bernoulli draw of its intensity, ``data.binarize_static(X, seed)``: the same
        bits for the same X and seed, whatever the method or command. 0/1 data come back unchanged,
        so binarizing once and passing the result on gives every later call the same bits (report and
        serve show these inputs beside their reconstructions). ``seed=None`` draws fresh bits.
        """
        X = self._checked(X)
        return data_mod.binarize_static(X, seed) if self.binarized_ else X

    def model_input(self, X: ArrayLike, seed: Optional[int] = 0) -> np.ndarray:
        """X (data units) as the model takes it: float32 of shape (n, p) in the model's units.

        The one path from user data to the model; every method below that feeds the module calls it.

        1. validation: a 2-D array of numbers (or images (n, h, w), flattened), finite, representable
           in float32, with the fitted model's number of features, inside the likelihood's support;
        2. a run trained with ``binarize`` static or dynamic: one seeded binarization (`binarize_input`);
        3. a run trained with ``standardize``: the run's saved per-feature mean and std.

        (A run is never both: binarization needs a Bernoulli likelihood, standardization a Gaussian.)
        Every command feeds the model through here with its ``--seed`` (default 0), so `vaelens
        evaluate`, `report` and the Python methods see the same bits for the same rows and seed.
        """
        Xb = self.binarize_input(X, seed)
        if not self.config_.data.standardize:
            return Xb
        Xn = data_mod.apply_transform(Xb, self.config_.transform)
        data_mod.check_finite(Xn, "X", what="values too large to standardize")
        return Xn

    def _checked(self, X: ArrayLike, where: str = "X") -> np.ndarray:
        self._check()
        Xa = as_dataset(X, where, None).X
        # the likelihood's support applies to the data before standardization only for unstandardized runs
        support = "gaussian" if self.config_.data.standardize else self.config_.model.likelihood
        data_mod.validate(Xa, support, where, self.n_features_in_)
        return Xa

    def _tensor(self, X: ArrayLike, seed: Optional[int] = 0) -> torch.Tensor:
        return torch.as_tensor(self.model_input(X, seed), device=self.device_)

    # --- inference -------------------------------------------------------------------------
    def encode(self, X: ArrayLike, batch_size: int = 4096, seed: Optional[int] = 0, refine: int = 0) -> Posterior:
        """Per-sample posterior q(z|x): mu and sigma (marginal std) of shape (n, d), float32, and for a
        full-covariance run its Cholesky factor ``scale_tril`` (n, d, d).

        `seed` binarizes X for a binarized run (see `model_input`); plain encoding draws nothing.
        With ``refine=N`` > 0 the semi-amortized posterior: each sample's Gaussian is started at the
        encoder's mu, sigma and improved by N Adam steps on its own seeded Monte Carlo ELBO for the
        fixed decoder (`vaelens.gap.refine`; `seed` also seeds those draws), towards q*(z|x), a
        Gaussian of the run's family (full covariance for a full run).
        """
        if refine < 0:
            raise ConfigError(f"refine must be >= 0 (Adam steps), got {refine}")
        Xt = self._tensor(X, seed)
        if refine:
            loc, scale = _gap.refine(self.module_, Xt, refine, seed=0 if seed is None else seed)
            f32 = lambda t: t.cpu().numpy().astype(np.float32)  # noqa: E731
            if scale.ndim == 3:  # a full-covariance run's q* is full too: scale is its Cholesky factor
                return Posterior(mu=f32(loc), sigma=f32(_gap.gaussian(loc, scale).stddev), scale_tril=f32(scale))
            return Posterior(mu=f32(loc), sigma=f32(scale))
        if self.config_.model.posterior == "full":
            mu, sigma, L = _encode_all(self.module_, Xt, batch_size=batch_size, tril=True)
            return Posterior(mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), scale_tril=L.astype(np.float32))
        mu, sigma = _encode_all(self.module_, Xt, batch_size=batch_size)
        return Posterior(mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))

    def transform(self, X: ArrayLike, seed: Optional[int] = 0) -> np.ndarray:
        """The posterior means mu(x), shape (n, d): the usual latent representation."""
        return self.encode(X, seed=seed).mu

    def sample_latent(self, X: ArrayLike, n_samples: int = 1, seed: Optional[int] = 0) -> np.ndarray:
        """Reparameterized z = mu + sigma * eps through the training path, shape (n_samples, n, d).

        `seed` binarizes X (binarized runs) and seeds the draws; None draws fresh noise (and bits).
        """
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        Xt = self._tensor(X, seed)
        self.module_.eval()
        with torch.inference_mode(), seeded(seed, Xt.device):
            z = self.module_.inference(Xt).rsample((n_samples,))               # (S, n, d)
        return z.cpu().numpy()

    def decode(self, Z: ArrayLike, mean: bool = True) -> np.ndarray:
        """Decoder output for latent points Z (m, d): the likelihood's mean (or a draw), in data units."""
        self._check()
        Zt = self._latent(Z)
        self.module_.eval()
        with torch.inference_mode():
            px = self.module_.generative(Zt)
            out = px.mean if mean else px.sample()
        out = out.cpu().numpy()
        return data_mod.invert_transform(out, self.config_.transform) if self.config_.data.standardize else out

    def reconstruct(self, X: ArrayLike, seed: Optional[int] = 0) -> np.ndarray:
        """Decoder mean at z = mu(x), shape (n, p), in data units (of the binarized X for a binarized run)."""
        return self.decode(self.encode(X, seed=seed).mu)

    def generate(self, n: int, seed: Optional[int] = None) -> np.ndarray:
        """Decoder means for n draws z ~ p(z) (`prior_sample`), shape (n, p)."""
        return self.decode(self.prior_sample(n, seed))

    # --- the prior p(z) -----------------------------------------------------------------------
    def prior_sample(self, n: int, seed: Optional[int] = None) -> np.ndarray:
        """n draws z ~ p(z), shape (n, d): N(0, I), the learned mixture, or the VampPrior."""
        self._check()
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if self.config_.model.prior == "normal":
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            return torch.randn(n, self.latent_dim_, generator=g).numpy()
        self.module_.eval()
        with torch.inference_mode(), seeded(seed, self.device_):
            return self.module_.prior().sample((n,)).cpu().numpy()

    def prior_log_prob(self, Z: ArrayLike) -> np.ndarray:
        """log p(z) for latent points Z (m, d), shape (m,), float64."""
        self._check()
        Zt = self._latent(Z)
        self.module_.eval()
        with torch.inference_mode():
            return self.module_.prior().log_prob(Zt).double().cpu().numpy()

    def prior_moments(self) -> Tuple[np.ndarray, np.ndarray]:
        """The prior's mean (d,) and covariance (d, d), float64: (0, I) for the normal prior."""
        self._check()
        self.module_.eval()
        with torch.inference_mode():
            mean, cov = moments(self.module_.prior())
        return mean.double().cpu().numpy(), cov.double().cpu().numpy()

    def _latent(self, Z: ArrayLike) -> torch.Tensor:
        d = self.latent_dim_
        Zt = torch.as_tensor(np.asarray(Z, dtype=np.float32), device=self.device_)
        if Zt.ndim != 2 or Zt.shape[1] != d:
            raise DataError(f"Z: expected shape (m, {d}), got {tuple(Zt.shape)}")
        if not torch.isfinite(Zt).all():
            raise DataError("Z: contains NaN or infinite values")
        return Zt

    def elbo_terms(self, X: ArrayLike, n_samples: int = 1, seed: Optional[int] = 0,
                   batch_size: int = 4096) -> dict:
        """Per-sample ELBO terms in nats: ``elbo``, ``rec`` (E_q[log p(x|z)], `n_samples` seeded draws) and
        ``kl`` (KL(q(z|x) || p(z)), analytic; Monte Carlo on the same draws for a mixture prior), each of
        shape (n,)."""
        Xt = self._tensor(X, seed)
        return _elbo_terms(self.module_, Xt, n_samples=n_samples, batch_size=batch_size, seed=seed)

    def elbo(self, X: ArrayLike, n_samples: int = 1, seed: Optional[int] = 0, batch_size: int = 4096) -> np.ndarray:
        """Per-sample ELBO in nats, shape (n,), with `n_samples` draws of z per sample (seeded)."""
        return self.elbo_terms(X, n_samples=n_samples, seed=seed, batch_size=batch_size)["elbo"]

    def reconstruction_error(self, X: ArrayLike, seed: Optional[int] = 0, batch_size: int = 4096) -> np.ndarray:
        """Per sample, the sum over features of (x - E[x | z = mu(x)])^2, shape (n,), in the model's units:
        a standardized run weighs every feature alike, a binarized run compares bits with probabilities."""
        Xt = self._tensor(X, seed)
        module = self.module_.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(Xt), batch_size):
                x = Xt[i:i + batch_size]                                     # (b, p)
                mean = module.generative(module.inference(x).mean).mean      # (b, p): decoder mean at mu(x)
                out.append(((x - mean) ** 2).sum(dim=1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def log_likelihood(self, X: ArrayLike, k: int = 5000, seed: Optional[int] = 0, batch_size: Optional[int] = None,
                       chunk_size: Optional[int] = None, progress: bool = False,
                       distributed: bool = False) -> np.ndarray:
        """Per-sample IWAE estimate of log p(x) in nats with `k` importance samples, shape (n,).

        Of the model's input (`model_input`): for a standardized run log p of the standardized data,
        for a binarized run of X binarized once with `seed`. A row's figure depends on `seed` and its
        row index only, not on the batching; with `distributed` under torchrun the ranks share the
        rows and all get the whole result.
        """
        Xt = self._tensor(X, seed)
        return _iwae_log_likelihood(self.module_, Xt, k, chunk_size=chunk_size, batch_size=batch_size,
                                    progress=progress, seed=seed, distributed=distributed)

    def score_samples(self, X: ArrayLike, seed: Optional[int] = 0) -> np.ndarray:
        """Per-sample log p(x) in nats, shape (n,): `log_likelihood` with k = ``score_k`` (scikit-learn's name)."""
        return self.log_likelihood(X, k=self.score_k, seed=seed)

    def score(self, X: ArrayLike, y=None, seed: Optional[int] = 0) -> float:
        """Mean log p(x) in nats over the rows of X (higher is better): what `GridSearchCV` maximizes."""
        return float(self.score_samples(X, seed=seed).mean())

    def evaluate(self, X: ArrayLike, iw_samples: int = 5000, seed: Optional[int] = 0, progress: bool = False,
                 **kwargs) -> Evaluation:
        """ELBO terms, IWAE log-likelihood, active units, I(x; z) and KL(q(z) || p(z)) on X.

        `seed` binarizes X (binarized runs, see `model_input`) and seeds every draw: the figures of
        ``vaelens evaluate --seed s`` and of ``vaelens report --seed s`` on the same rows. Returns a
        `vaelens.evaluate.Evaluation`; ``to_dict()`` gives its JSON summary. Other keyword arguments
        go to `vaelens.evaluate.evaluate` (``elbo_samples``, ``aggregate_draws``, ``batch_size`` ...).
        """
        Xt = self._tensor(X, seed)
        return _evaluate(self.module_, Xt, iw_samples, seed=seed, progress=progress, **kwargs)

    # --- what mu(x) and sigma(x) are ------------------------------------------------------
    def check(self, X: ArrayLike, indices: Optional[Sequence[int]] = None, n: int = 10, n_samples: int = 2000,
              level: float = 0.01, seed: int = 0, mu: Optional[np.ndarray] = None,
              sigma: Optional[np.ndarray] = None, scale_tril: Optional[np.ndarray] = None):
        """Point-cloud check: do S reparameterized draws for each chosen x follow N(mu(x), Sigma(x))?

        Parameters
        ----------
        X : array-like of shape (m, p)
        indices : sequence of int, optional
            Rows of X to check; default `n` rows chosen at random with `seed`.
        n_samples, level, seed
            Draws per sample, overall significance level, seed (of the rows, the draws and, for a
            binarized run, the binarization).
        mu, sigma : ndarray of shape (k, d), optional
            A claimed posterior to test instead of the encoder's (a wrong claim fails).
        scale_tril : ndarray of shape (k, d, d), optional
            A claimed Cholesky factor: the claim N(mu, L L^T) (a full-covariance run's is tested by default).

        Returns
        -------
        vaelens.posterior.PointCloudCheck
        """
        Xt = self._tensor(X, seed)
        if indices is None:
            if n < 1:
                raise ConfigError(f"n must be >= 1, got {n}")
            indices = np.sort(np.random.default_rng(seed).choice(len(Xt), size=min(n, len(Xt)), replace=False))
        return point_cloud_check(self.module_, Xt, indices, n_samples=n_samples, seed=seed, level=level,
                                 mu=mu, sigma=sigma, scale_tril=scale_tril)

    def true_posterior(self, X: ArrayLike, k: int = GAP_K, seed: int = 0,
                       refine: int = 0) -> "_gap.TruePosterior":
        """What mu(x) and sigma(x) approximate: E_p[z] and Std_p[z] of the model's own posterior
        p(z|x) ~ p(x|z) p(z), by self-normalized importance sampling with `k` draws per sample (seeded
        per row), with ESS, Pareto-k reliability flags and the per-dimension distance
        |mu - E_p[z]| / Std_p[z] and ratio sigma / Std_p[z]. The proposal is the encoder's q(z|x), or
        with ``refine=N`` > 0 q* after N Adam steps (`encode(refine=N)`), closer to p(z|x).

        Returns
        -------
        vaelens.gap.TruePosterior
        """
        Xt, proposal = self._proposal(X, refine, seed)
        return _gap.true_posterior(self.module_, Xt, k, seed=seed, proposal=proposal)

    def posterior_cloud(self, X: ArrayLike, k: int = GAP_K, seed: int = 0,
                        refine: int = 0) -> "_gap.PosteriorCloud":
        """The importance-weighted cloud behind `true_posterior` for a few samples: per sample the k
        draws (n, k, d) and their normalized weights (n, k), with the proposal's and the encoder's
        mean and std. With the same X, k, seed and refine its weighted mean is `true_posterior`'s
        mean; with ``refine=N`` the proposal is q* after N Adam steps (`encode(refine=N)`).

        Returns
        -------
        vaelens.gap.PosteriorCloud
        """
        Xt, proposal = self._proposal(X, refine, seed)
        return _gap.posterior_cloud(self.module_, Xt, k, seed=seed, proposal=proposal)

    def _proposal(self, X: ArrayLike, refine: int, seed: int):
        """The model input and the importance proposal: None (the encoder's q) or q* after `refine` steps."""
        if refine < 0:
            raise ConfigError(f"refine must be >= 0 (Adam steps), got {refine}")
        Xt = self._tensor(X, seed)
        return Xt, (_gap.refine(self.module_, Xt, refine, seed=seed) if refine else None)

    def inference_gaps(self, X: ArrayLike, k: int = GAP_K, steps: int = GAP_REFINE_STEPS, seed: int = 0,
                       **kwargs) -> "_gap.InferenceGaps":
        """Per sample: log p(x) (IWAE, k), L[q] of the encoder, L[q*] of the best Gaussian of the run's
        family for this x (`steps` Adam steps from the encoder's output), the approximation gap log p(x) - L[q*]
        and the amortization gap L[q*] - L[q], with Monte Carlo standard errors (Cremer et al. 2018).
        The importance sampler's proposal is q* (``proposal="refined"``) or the encoder's q
        (``"encoder"``: log p(x) is then `log_likelihood`'s with the same k and seed). Other keyword
        arguments (``lr``, ``draws``, ``elbo_draws``, ``proposal``) go to `vaelens.gap.inference_gaps`.

        Returns
        -------
        vaelens.gap.InferenceGaps
        """
        return _gap.inference_gaps(self.module_, self._tensor(X, seed), k, steps, seed=seed, **kwargs)

    def aggregate_posterior(self, X: ArrayLike, seed: Optional[int] = 0):
        """The data set's latent distribution q(z) = mean_x q(z|x): mean, covariance and variance split,
        against the run's prior p(z) (its moments; E_x KL(q(z|x) || p(z))).

        Returns
        -------
        vaelens.posterior.AggregatePosterior
        """
        post = self.encode(X, seed=seed)
        return aggregate_posterior(post.mu, post.sigma, post.scale_tril, prior_of(self.module_))

    def symmetry(self, X: ArrayLike, seed: int = 0, n_rotations: int = 3, n_samples: int = 16,
                 n_permutations: int = 3, n_orthogonal: int = 3, atol: Optional[float] = None):
        """Which orthogonal maps of the latent space leave the ELBO unchanged, measured (`vaelens symmetry`).

        Each map R acts on the whole model (q(z|x) projected onto the run's posterior family, the
        decoder's first layer, the prior's parameters); signed permutations, Givens rotations in
        `n_rotations` random planes and `n_orthogonal` Haar-random orthogonal maps are tried, each with
        its paired ELBO change and standard error; `atol` is the floor of "free" (default: the CLI's).

        Returns
        -------
        vaelens.symmetries.SymmetryReport
            Per-map changes, per-kind verdicts and `group`, the group measured.
        """
        return symmetry_report(self.module_, self._tensor(X, seed), seed=seed, n_rotations=n_rotations,
                               n_samples=n_samples, n_permutations=n_permutations, n_orthogonal=n_orthogonal,
                               atol=atol)

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


_SIGNATURE = _signature()
_PARAM_NAMES = tuple(p for p in _SIGNATURE.parameters if p != "self")
# scikit-learn's get_params, clone and repr read the constructor's signature: this one is built
# from the config dataclasses, so the defaults live there only.
VAE.__init__.__signature__ = _SIGNATURE


def as_dataset(X: ArrayLike, where: str = "X", image_shape: Optional[Tuple[int, int]] = None) -> Dataset:
    """User data as a `Dataset`: the one check of array input (numpy, torch, nested lists, images).

    2-D (n, p) arrays of numbers, or images (n, h, w) that are flattened with their shape kept;
    float32 must hold the values. Raises a `DataError` naming `where`. A `Dataset` passes unchanged.
    Finiteness, feature count and the likelihood's support are checked against a model by
    `VAE.model_input`.
    """
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
        ds = data_mod.from_array(arr, where)
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
        ds = dataclasses.replace(ds, image_shape=tuple(image_shape))  # never the caller's Dataset
    return ds
