"""The VAE: q(z|x) (inference), p(x|z) (generative), the prior p(z), and the one computation of the loss terms.

Shapes: x (n, p); the encoder's mu, sigma (n, d); with S samples z is (S, n, d) and the
decoder's distribution has batch shape (S, n, p). Every loss term is per sample, shape (n,);
callers average.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Bernoulli, ContinuousBernoulli, Distribution, Normal, kl_divergence

from .config import ModelConfig
from .errors import ConfigError

# sigma is capped here, 10^4 prior standard deviations: beyond it nothing is learnable, and sigma^2 in the
# KL would overflow float32 (sigma > 1.8e19, from extreme inputs), turning the KL into inf - inf = NaN.
SIGMA_MAX = 1e4
# Decoder scales below this make the Gaussian log-likelihood unbounded as a pixel's error goes to 0.
GAUSSIAN_SCALE_FLOOR = 1e-3

_ACTIVATIONS = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU,
    "silu": nn.SiLU, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU,
}


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device):
    """Seed torch's generator for a block without disturbing the caller's stream (no-op for None).

    Inference-time draws (validation, encoding with samples, evaluation) use this, so they are
    reproducible and leave the training stream exactly where it was.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Lift a bf16/fp16 result of autocast to float32, leaving float32 and float64 as they are.

    Under bf16 autocast the Linear layers compute in bf16; the distributions' parameters, and with
    them every log-density and KL summed over hundreds of pixels, stay in full precision.
    """
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def mlp(sizes, activation: str, last_activation: bool = True) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, each followed by the activation."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x -> trunk -> x̃ -> two heads -> q(z|x) = Normal(mu(x), sigma(x)).

    sigma = min(softplus(sigma_head(x̃)), SIGMA_MAX) + sigma_floor: softplus keeps it positive with a
    gradient everywhere, the floor keeps log sigma and the KL finite when a head saturates, and the
    cap keeps sigma^2 inside float32 for extreme inputs.
    No batch-dependent layers: mu(x) and sigma(x) depend on x alone.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.input_dim
        self.image_shape = cfg.image_shape
        if cfg.arch == "conv":
            h, w = cfg.image_shape
            convs, c_in = [], 1
            for c in cfg.conv_channels:
                convs += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), _ACTIVATIONS[cfg.activation]()]
                c_in = c
            k = 2 ** len(cfg.conv_channels)
            flat = c_in * (h // k) * (w // k)
            self.trunk = nn.Sequential(nn.Unflatten(1, (1, h, w)), *convs, nn.Flatten(1),
                                       *mlp((flat, *cfg.hidden), cfg.activation))
            width = cfg.hidden[-1] if cfg.hidden else flat
        else:
            self.trunk = mlp((p, *cfg.hidden), cfg.activation) if cfg.hidden else nn.Identity()
            width = cfg.hidden[-1] if cfg.hidden else p
        self.mu_head = nn.Linear(width, cfg.latent_dim)
        self.sigma_head = nn.Linear(width, cfg.latent_dim)
        self.sigma_floor = cfg.sigma_floor

    def forward(self, x: torch.Tensor) -> Normal:
        xt = self.trunk(x)                                                   # (n, width): x̃
        mu = _fp32(self.mu_head(xt))                                         # (n, d)
        sigma = F.softplus(_fp32(self.sigma_head(xt))).clamp(max=SIGMA_MAX) + self.sigma_floor  # (n, d)
        return Normal(mu, sigma, validate_args=False)


class Decoder(nn.Module):
    """z -> network -> p(x|z): Bernoulli(logits), ContinuousBernoulli(logits) or Normal(loc, scale)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p, d = cfg.input_dim, cfg.latent_dim
        self.likelihood = cfg.likelihood
        if cfg.arch == "conv":
            h, w = cfg.image_shape
            k = 2 ** len(cfg.conv_channels)
            chans = tuple(reversed(cfg.conv_channels))
            flat = chans[0] * (h // k) * (w // k)
            deconvs = []
            for c_in, c_out in zip(chans, chans[1:] + (1,)):
                deconvs += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), _ACTIVATIONS[cfg.activation]()]
            deconvs = deconvs[:-1]  # the output layer is linear: it gives logits or means
            self.net = nn.Sequential(*mlp((d, *reversed(cfg.hidden), flat), cfg.activation),
                                     nn.Unflatten(1, (chans[0], h // k, w // k)), *deconvs, nn.Flatten(1))
            self._conv = True
        else:
            self.net = mlp((d, *reversed(cfg.hidden), p), cfg.activation, last_activation=False)
            self._conv = False
        if cfg.likelihood == "gaussian":
            init = math.log(math.expm1(max(cfg.fixed_scale - GAUSSIAN_SCALE_FLOOR, 1e-6)))
            shape = {"fixed": (), "shared": (1,), "per_feature": (p,)}[cfg.gaussian_scale]
            raw = torch.full(shape, init)
            if cfg.gaussian_scale == "fixed":
                self.register_buffer("raw_scale", raw)
            else:
                self.raw_scale = nn.Parameter(raw)

    @property
    def first(self) -> nn.Linear:
        """The Linear layer that reads z; latent symmetries act on its input columns."""
        return self.net[0]

    def forward(self, z: torch.Tensor) -> Distribution:
        lead = z.shape[:-1]                                                  # (S, n) or (n,)
        out = self.net(z.reshape(-1, z.shape[-1]) if self._conv else z)
        out = _fp32(out).reshape(*lead, -1)                                  # (..., p)
        if self.likelihood == "bernoulli":
            return Bernoulli(logits=out, validate_args=False)
        if self.likelihood == "cbernoulli":
            return ContinuousBernoulli(logits=out, validate_args=False)
        scale = F.softplus(self.raw_scale) + GAUSSIAN_SCALE_FLOOR
        return Normal(out, scale.expand_as(out), validate_args=False)


@dataclass
class Terms:
    """Per-sample loss terms, all shape (n,) except `kl_dim` (n, d)."""

    rec: torch.Tensor       # E_q[log p(x|z)], Monte Carlo over the samples drawn
    kl: torch.Tensor        # KL(q(z|x) || p(z)), analytic
    kl_dim: torch.Tensor    # per latent dimension
    elbo: torch.Tensor      # rec - kl

    @property
    def neg_elbo(self) -> torch.Tensor:
        return -self.elbo

    def detach(self) -> "Terms":
        return Terms(rec=self.rec.detach(), kl=self.kl.detach(), kl_dim=self.kl_dim.detach(), elbo=self.elbo.detach())


@dataclass
class Draws:
    """S draws z = mu + sigma * eps for each of n samples, and what they give (see `VAEModule.draw`)."""

    qz: Normal                       # q(z|x), batch (n, d)
    eps: Optional[torch.Tensor]      # (S, n, d) the given standard-normal noise; None when drawn here
    z: torch.Tensor                  # (S, n, d)
    log_px: torch.Tensor             # (S, n): log p(x|z_s)
    log_w: Optional[torch.Tensor]    # (S, n): log p(x|z_s) + log p(z_s) - log q(z_s|x); None unless asked for
    terms: Terms                     # rec = mean_s log p(x|z_s), analytic KL, ELBO: (n,); kl_dim (n, d)


class VAEModule(nn.Module):
    """The generative model p(z) p(x|z) with p(z) = N(0, I), and the inference model q(z|x).

    `inference(x)` and `generative(z)` are the encoder and decoder as distributions; `draw` is the
    one place where draws of z become ELBO terms and importance log-weights: training (`forward`),
    `terms`, `log_weights`, `iwae_bound`, `evaluate` and `uniqueness` all go through it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_dim is None:
            raise ConfigError("model.input_dim is not set: build the model from data")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Buffers, so the prior follows the module across devices and dtypes.
        self.register_buffer("prior_loc", torch.zeros(cfg.latent_dim))
        self.register_buffer("prior_scale", torch.ones(cfg.latent_dim))

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def prior(self) -> Normal:
        """p(z) = N(0, I), batch (d,)."""
        return Normal(self.prior_loc, self.prior_scale, validate_args=False)

    def inference(self, x: torch.Tensor) -> Normal:
        """q(z|x) for x (n, p): batch (n, d)."""
        return self.encoder(x)

    def generative(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for z (..., d): batch (..., p)."""
        return self.decoder(z)

    def draw(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None, *, n_samples: int = 1,
             target: Optional[torch.Tensor] = None, qz: Optional[Normal] = None, weights: bool = False,
             dreg: bool = False, closed_form: bool = False) -> Draws:
        """Per-sample ELBO terms and, with `weights`, importance log-weights for draws z = mu + sigma * eps.

        Parameters
        ----------
        x : tensor of shape (n, p)
        eps : tensor of shape (S, n, d), optional
            Given standard-normal noise (evaluation's per-row streams, a symmetry's mapped noise).
            None draws S = `n_samples` with ``qz.rsample`` from torch's global generator (training's
            stream, draw for draw).
        target : tensor of shape (n, p), optional
            What p(x|z) scores; default x.
        qz : Normal of batch (n, d), optional
            q(z|x) to use instead of ``inference(x)``: evaluation passes the one it computed once per
            batch, the symmetry check one with a moment-matched sigma.
        weights : bool
            Also compute log w = log p(x|z) + log p(z) - log q(z|x), shape (S, n).
        dreg : bool
            log q(z|x) with its parameters held fixed (same value), so the encoder reaches log w
            through z only (the doubly reparameterized gradient, see `forward`).
        closed_form : bool
            For evaluation at large S, where no gradient is wanted: log p(z) - log q(z|x) from eps in
            closed form and a Bernoulli log-density in two passes over the (S, n, p) logits instead of
            the generic log_prob's five. Equal up to float32 rounding; training keeps the generic
            arithmetic, so both paths keep their figures bit for bit. Needs the N(0, I) prior.
        """
        if closed_form and eps is None:  # a bug in the caller, not user input
            raise ValueError("draw(closed_form=True) computes log p(z) - log q(z|x) from eps: pass the noise")
        target = x if target is None else target
        qz = self.inference(x) if qz is None else qz                         # batch (n, d)
        if eps is None:
            z = qz.rsample((n_samples,))                                     # (S, n, d): torch.distributions' own draw
        else:
            z = qz.loc + eps * qz.scale                                      # (S, n, d): the given noise mapped
        px = self.generative(z)                                              # batch (S, n, p)
        if closed_form and isinstance(px, Bernoulli):
            # log Bernoulli(x; sigmoid(l)) = x l - softplus(l), valid for any x in [0, 1]
            log_px = (px.logits * target).sum(-1) - F.softplus(px.logits).sum(-1)   # (S, n)
        else:
            log_px = px.log_prob(target).sum(-1)                             # (S, n)
        log_w = None
        if weights and closed_form:
            # log p(z) - log q(z|x) = -z^2/2 - (-eps^2/2 - log sigma): the 2 pi terms cancel
            log_w = log_px + (0.5 * (eps.square() - z.square()).sum(-1) + qz.scale.log().sum(-1))
        elif weights:
            log_pz = self.prior().log_prob(z).sum(-1)                        # (S, n)
            q = Normal(qz.loc.detach(), qz.scale.detach(), validate_args=False) if dreg else qz
            log_w = log_px + log_pz - q.log_prob(z).sum(-1)                  # (S, n)
        rec = log_px.mean(0)                                                 # (n,)
        kl_dim = kl_divergence(qz, self.prior())                             # (n, d)
        kl = kl_dim.sum(-1)                                                  # (n,)
        return Draws(qz=qz, eps=eps, z=z, log_px=log_px, log_w=log_w,
                     terms=Terms(rec=rec, kl=kl, kl_dim=kl_dim, elbo=rec - kl))

    def terms(self, x: torch.Tensor, target: Optional[torch.Tensor] = None, n_samples: int = 1) -> Terms:
        """ELBO terms per sample, with `n_samples` reparameterized draws of z for the reconstruction."""
        return self.draw(x, n_samples=n_samples, target=target).terms

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None, *, objective: str = "elbo",
                iw_samples: int = 1, beta: float = 1.0, free_bits: float = 0.0, dreg: bool = False):
        """Scalar training loss and the per-sample `Terms` for logging.

        ELBO: -(mean rec - beta * KL), where with free bits each dimension's batch-mean KL counts
        as at least `free_bits` nats (Kingma et al. 2016), so nothing is gained by pushing a
        dimension's KL below it. IWAE: -mean of the K-sample bound (Burda et al. 2016). With `dreg`
        the loss keeps its value and its decoder gradient, but the encoder gets the doubly
        reparameterized gradient (Tucker et al. 2018): the score term of log q, zero in expectation
        with a variance that grows with K, is dropped and the path term through z is weighted by the
        squared normalized weights. Both encoder gradients are unbiased for the same bound.
        The training step goes through forward() so that DistributedDataParallel sees it.
        """
        if objective == "iwae":
            s = self.draw(x, n_samples=iw_samples, target=target, weights=True, dreg=dreg)
            bound = torch.logsumexp(s.log_w, 0) - math.log(iw_samples)      # (n,)
            if dreg and s.z.requires_grad:
                # d bound = sum_k w_k d lw_k. The hook turns the encoder's share, reached only
                # through z since log q's parameters are held fixed, into sum_k w_k^2 (d lw_k/dz) dz.
                w = torch.softmax(s.log_w.detach().float(), 0)               # (K, n)
                s.z.register_hook(lambda g: g * w.unsqueeze(-1).to(g.dtype))
            return -bound.mean(), s.terms.detach()                           # terms for logging only
        t = self.draw(x, target=target).terms
        kl_term = t.kl_dim.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else t.kl.mean()
        return -(t.rec.mean() - beta * kl_term), t

    def log_weights(self, x: torch.Tensor, n_samples: int, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Importance log-weights log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (K, n)."""
        return self.draw(x, n_samples=n_samples, target=target, weights=True).log_w

    def iwae_bound(self, x: torch.Tensor, n_samples: int, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The K-sample importance-weighted bound on log p(x), shape (n,)."""
        lw = self.log_weights(x, n_samples, target)                          # (K, n)
        return torch.logsumexp(lw, 0) - math.log(n_samples)


@contextlib.contextmanager
def flush_denormals():
    """Flush denormals to zero while training (they slow the matmuls by 20-30% once weights get small).

    The flag is process-wide CPU state that numpy shares, so the caller's setting is restored on exit.
    """
    was = bool((torch.tensor(1e-39) * 1.0) == 0)  # 1e-39 is a float32 denormal
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)
