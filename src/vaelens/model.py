"""The VAE: q(z|x) (inference), p(x|z) (generative), the prior p(z), and the one computation of the loss terms.

Shapes: x (n, p); q(z|x) has batch (n,) and event (d,): `Independent(Normal(mu, sigma), 1)` for the
diagonal family, `MultivariateNormal(mu, scale_tril=L)` for the full one; p(z) has event (d,); with S
samples z is (S, n, d) and the decoder's distribution has batch shape (S, n, p). Every loss term is
per sample, shape (n,); callers average. Code outside this module reads q through `.mean`,
`.stddev` (marginal) and `scale_tril(q)`, so it works for both families.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Categorical, ContinuousBernoulli, Distribution, Independent,
                                 MixtureSameFamily, MultivariateNormal, Normal, kl_divergence)

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


def diagonal_normal(mu: torch.Tensor, sigma: torch.Tensor) -> Independent:
    """The diagonal family: N(mu, diag(sigma^2)) with batch (n,) and event (d,), for mu, sigma (n, d)."""
    return Independent(Normal(mu, sigma, validate_args=False), 1, validate_args=False)


def full_normal(mu: torch.Tensor, L: torch.Tensor) -> MultivariateNormal:
    """The full family: N(mu, L L^T) for mu (n, d) and a lower-triangular L (n, d, d) with a positive diagonal."""
    return MultivariateNormal(mu, scale_tril=L, validate_args=False)


def scale_tril(q: Distribution) -> torch.Tensor:
    """The Cholesky factor L of q's covariance, (..., d, d), for either family."""
    if isinstance(q, MultivariateNormal):
        return q.scale_tril
    return torch.diag_embed(q.stddev)


def covariance(q: Distribution) -> torch.Tensor:
    """q's covariance matrix, (..., d, d), for either family."""
    if isinstance(q, MultivariateNormal):
        return q.covariance_matrix
    return torch.diag_embed(q.variance)


def log_det_scale(q: Distribution) -> torch.Tensor:
    """log |det L| = sum log diag L, shape q's batch: the entropy's share that depends on q's spread."""
    if isinstance(q, MultivariateNormal):
        return q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return q.base_dist.scale.log().sum(-1)


def reparameterize(q: Distribution, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + L eps for standard-normal noise eps (S, n, d): given noise mapped through q."""
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    return q.base_dist.loc + eps * q.base_dist.scale


def detached(q: Distribution) -> Distribution:
    """q with its parameters cut from the graph (same values): for the DReG estimator."""
    if isinstance(q, MultivariateNormal):
        return full_normal(q.loc.detach(), q.scale_tril.detach())
    return diagonal_normal(q.base_dist.loc.detach(), q.base_dist.scale.detach())


def marginals(q: Distribution) -> Distribution:
    """The d one-dimensional marginals of a latent distribution, batch (..., d): used for per-dimension KLs.

    For a mixture p(z) = sum_k w_k p_k(z) the marginal of z_j is sum_k w_k p_k(z_j).
    """
    if isinstance(q, MixtureSameFamily):
        comp, logits = q.component_distribution, q.mixture_distribution.logits    # comp batch (..., K)
        loc, std = comp.mean.movedim(-2, -1), comp.stddev.movedim(-2, -1)      # (..., d, K)
        mix = Categorical(logits=logits.unsqueeze(-2).expand(*loc.shape), validate_args=False)
        return NormalMixtures(mix, Normal(loc, std, validate_args=False), validate_args=False)
    return Normal(q.mean, q.stddev, validate_args=False)


def moments(p: Distribution):
    """Mean (..., d) and covariance (..., d, d) of a latent distribution: a Gaussian of either family or a
    mixture of them, whose covariance is sum_k w_k (S_k + m_k m_k^T) - m m^T."""
    if not isinstance(p, MixtureSameFamily):
        return p.mean, covariance(p)
    comp = p.component_distribution                                          # batch (..., K)
    w = p.mixture_distribution.probs                                         # (..., K)
    m_k, S_k = comp.mean, covariance(comp)                                   # (..., K, d), (..., K, d, d)
    mean = (w.unsqueeze(-1) * m_k).sum(-2)                                   # (..., d)
    second = (w[..., None, None] * (S_k + m_k.unsqueeze(-1) * m_k.unsqueeze(-2))).sum(-3)
    return mean, second - mean.unsqueeze(-1) * mean.unsqueeze(-2)


class GaussianMixture(MixtureSameFamily):
    """A mixture of K diagonal Gaussians whose log_prob is one matrix product instead of (..., K, d) differences.

    MixtureSameFamily's generic log_prob broadcasts z (..., d) against every component, building
    (..., K, d) tensors: for IWAE training with a 500-component VampPrior that is 50M elements per
    density, a second per step. Expanding sum_j (z_j - m_kj)^2 / s_kj^2 = z^2 . (1/s^2) - 2 z . (m/s^2)
    + m^2 . (1/s^2), every per-component constant (the normalizer, the mixture weight) folds into the
    same product: one (N, 2d + 1) x (2d + 1, K) product in float64 gives each component's log-density
    plus its log-weight (float64 because the expansion subtracts terms as large as (z/s)^2, so float32
    would lose digits when s is small). Each elementwise pass over the (N, K) result costs about as
    much as the product, so there is one product and a logsumexp, nothing else. Sampling, mean and
    variance are MixtureSameFamily's; tests compare log_prob with MixtureSameFamily's to 1e-10. Also the
    aggregate posterior's density in evaluation (`evaluate._log_mixture`: the n posteriors, equal weights).
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__(Categorical(logits=logits, validate_args=False), diagonal_normal(loc, scale),
                         validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        comp = self.component_distribution.base_dist
        loc, scale = comp.loc.double(), comp.scale.double()                  # (K, d)
        lead, d = z.shape[:-1], z.shape[-1]
        zf = z.reshape(-1, d).double()                                       # (N, d)
        prec = scale.pow(-2)                                                 # (K, d)
        log_w = torch.log_softmax(self.mixture_distribution.logits.double(), -1)   # (K,)
        offset = (log_w - 0.5 * (loc.square() * prec).sum(-1) - scale.log().sum(-1)
                  - 0.5 * d * math.log(2 * math.pi))                         # (K,)
        B = torch.cat([-0.5 * prec, loc * prec, offset.unsqueeze(-1)], 1)    # (K, 2d + 1)
        A = torch.cat([zf.square(), zf, torch.ones_like(zf[:, :1])], 1)      # (N, 2d + 1)
        # log w_k + log N(z; m_k, s_k) for every row and component; rounding can put it above the
        # component's peak (a Mahalanobis distance below 0) only by float64 rounding, harmless here.
        return torch.logsumexp(A @ B.T, -1).to(z.dtype).reshape(lead)             # (N, K) -> lead


class NormalMixtures(MixtureSameFamily):
    """Mixtures of K one-dimensional normals, batch (..., d): the per-dimension marginals of a mixture prior.

    log_prob is MixtureSameFamily's in fewer passes over the (..., d, K) standardized distances
    (a difference, a product, one fused multiply-add and the logsumexp), which matters because
    training computes it every step for the per-dimension KL it logs: with K = 500 and a batch of
    100 that is 2.5M elements, and the generic path made it an eighth of a VampPrior step.
    """

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        comp = self.component_distribution                                    # Normal, batch (..., d, K)
        log_c = (torch.log_softmax(self.mixture_distribution.logits, -1) - comp.scale.log()
                 - 0.5 * math.log(2 * math.pi))                               # (..., d, K)
        t = (x.unsqueeze(-1) - comp.loc) * comp.scale.reciprocal()            # (..., d, K)
        return torch.logsumexp(torch.addcmul(log_c, t, t, value=-0.5), -1)   # (..., d)


class Encoder(nn.Module):
    """x -> trunk -> x̃ -> heads -> q(z|x): N(mu(x), diag sigma(x)^2), or N(mu(x), L(x) L(x)^T) (full).

    sigma = min(softplus(sigma_head(x̃)), SIGMA_MAX) + sigma_floor: softplus keeps it positive with a
    gradient everywhere, the floor keeps log sigma and the KL finite when a head saturates, and the
    cap keeps sigma^2 inside float32 for extreme inputs. The full family puts sigma on L's diagonal
    and a third head's d(d-1)/2 outputs below it; that head starts at zero, so a full-covariance
    model starts as the diagonal one, and is capped like sigma.
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
        d = cfg.latent_dim
        self.mu_head = nn.Linear(width, d)
        self.sigma_head = nn.Linear(width, d)
        self.sigma_floor = cfg.sigma_floor
        self.full = cfg.posterior == "full"
        if self.full:
            self.tril_head = nn.Linear(width, d * (d - 1) // 2)
            nn.init.zeros_(self.tril_head.weight)
            nn.init.zeros_(self.tril_head.bias)
            self.register_buffer("tril_index", torch.tril_indices(d, d, offset=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> Distribution:
        xt = self.trunk(x)                                                   # (n, width): x̃
        mu = _fp32(self.mu_head(xt))                                         # (n, d)
        sigma = F.softplus(_fp32(self.sigma_head(xt))).clamp(max=SIGMA_MAX) + self.sigma_floor  # (n, d)
        if not self.full:
            return diagonal_normal(mu, sigma)
        off = _fp32(self.tril_head(xt)).clamp(-SIGMA_MAX, SIGMA_MAX)         # (n, d(d-1)/2)
        L = torch.diag_embed(sigma)                                          # (n, d, d)
        L[:, self.tril_index[0], self.tril_index[1]] = off                   # strictly below the diagonal
        return full_normal(mu, L)


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
    kl: torch.Tensor        # KL(q(z|x) || p(z)): analytic where torch has the pair, else Monte Carlo (same z)
    kl_dim: torch.Tensor    # per latent dimension: KL's own split when it factorizes, else the marginals' KLs
    elbo: torch.Tensor      # rec - kl

    @property
    def neg_elbo(self) -> torch.Tensor:
        return -self.elbo

    def detach(self) -> "Terms":
        return Terms(rec=self.rec.detach(), kl=self.kl.detach(), kl_dim=self.kl_dim.detach(), elbo=self.elbo.detach())


@dataclass
class Draws:
    """S draws z = mu + sigma * eps for each of n samples, and what they give (see `VAEModule.draw`)."""

    qz: Distribution                 # q(z|x), batch (n,), event (d,)
    eps: Optional[torch.Tensor]      # (S, n, d) the given standard-normal noise; None when drawn here
    z: torch.Tensor                  # (S, n, d)
    log_px: torch.Tensor             # (S, n): log p(x|z_s)
    log_w: Optional[torch.Tensor]    # (S, n): log p(x|z_s) + log p(z_s) - log q(z_s|x); None unless asked for
    terms: Terms                     # rec = mean_s log p(x|z_s), analytic KL, ELBO: (n,); kl_dim (n, d)


class VAEModule(nn.Module):
    """The generative model p(z) p(x|z) and the inference model q(z|x).

    `inference(x)` and `generative(z)` are the encoder and decoder as distributions, `prior()` is
    p(z); `draw` is the one place where draws of z become ELBO terms and importance log-weights:
    training (`forward`), `terms`, `log_weights`, `iwae_bound`, `evaluate` and `uniqueness` all go
    through it.

    Priors (`cfg.prior`): ``normal`` N(0, I); ``mog`` a mixture of K diagonal Gaussians with learned
    weights, means (initialized N(0, 1)) and scales (initialized 1); ``vamp`` the VampPrior
    (Tomczak & Welling 2018), (1/K) sum_k q(z|u_k) at K learned pseudo-inputs u_k in the model's
    input space, initialized at K training rows (`init_prior`). The VampPrior goes through the
    encoder, so it has the posterior's family and moves with the encoder.
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
        K, d = cfg.components, cfg.latent_dim
        if cfg.prior == "mog":
            self.prior_logits = nn.Parameter(torch.zeros(K))                 # (K,): mixture weights
            self.prior_means = nn.Parameter(torch.randn(K, d))               # (K, d)
            self.prior_raw_scales = nn.Parameter(torch.full((K, d), math.log(math.expm1(1.0))))  # softplus -> 1
        elif cfg.prior == "vamp":
            self.pseudo_inputs = nn.Parameter(torch.zeros(K, cfg.input_dim))  # (K, p): set by init_prior

    def init_prior(self, X, seed: int) -> None:
        """Place the VampPrior's pseudo-inputs at K rows of the training data X (n, p), chosen with `seed`.

        Without replacement when K <= n; otherwise every row is used and the rest drawn again, with
        a little noise (1% of each feature's std) so that no two pseudo-inputs stay equal. A no-op for
        the other priors.
        """
        if self.cfg.prior != "vamp":
            return
        X = torch.as_tensor(X, dtype=torch.float32)
        K, n = self.cfg.components, len(X)
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(n, generator=g)[:K]
        rows = X[idx]
        if K > n:
            extra = X[torch.randint(n, (K - n,), generator=g)]
            extra = extra + 0.01 * X.std(0) * torch.randn(extra.shape, generator=g)
            rows = torch.cat([rows, extra])
        with torch.no_grad():
            self.pseudo_inputs.copy_(rows.to(self.pseudo_inputs))

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def prior(self) -> Distribution:
        """p(z), event (d,): N(0, I) in the posterior's family (so the KL is analytic), a MoG, or the VampPrior."""
        if self.cfg.prior == "mog":
            scales = F.softplus(self.prior_raw_scales) + self.cfg.sigma_floor   # (K, d)
            return GaussianMixture(self.prior_logits, self.prior_means, scales)
        if self.cfg.prior == "vamp":
            comp = self.encoder(self.pseudo_inputs)                          # batch (K,): q(z|u_k)
            uniform = torch.zeros(self.pseudo_inputs.shape[0], device=comp.mean.device)   # (K,)
            if isinstance(comp, Independent):
                return GaussianMixture(uniform, comp.base_dist.loc, comp.base_dist.scale)
            return MixtureSameFamily(Categorical(logits=uniform, validate_args=False), comp, validate_args=False)
        if self.cfg.posterior == "full":
            return full_normal(self.prior_loc, torch.diag_embed(self.prior_scale))
        return diagonal_normal(self.prior_loc, self.prior_scale)

    def kl(self, qz: Distribution, pz: Distribution, z: torch.Tensor, log_pz: Optional[torch.Tensor] = None):
        """KL(q(z|x) || p(z)) per sample (n,) and its per-dimension view (n, d).

        Analytic where torch.distributions has the pair (found by type); otherwise Monte Carlo,
        mean_s [log q(z_s|x) - log p(z_s)], with the draws z (S, n, d) the reconstruction used.
        The per-dimension view is the KL's own split when q and p factorize; otherwise it is the
        KL between the marginals of z_j (analytic, or Monte Carlo with the first of the draws), which
        does not sum to the KL: it only says how much each dimension is used (no gradient flows
        through it). `log_pz` (S, n), when the caller has it, saves computing log p(z) again.
        """
        if self.cfg.factorized:
            kl_dim = kl_divergence(qz.base_dist, pz.base_dist)               # (n, d)
            return kl_dim.sum(-1), kl_dim
        try:
            kl = kl_divergence(qz, pz)                                       # (n,)
        except NotImplementedError:
            log_pz = pz.log_prob(z) if log_pz is None else log_pz           # (S, n)
            kl = (qz.log_prob(z) - log_pz).mean(0)                           # (n,): Monte Carlo, same draws
        with torch.no_grad():
            qm, pm = marginals(qz), marginals(pz)                            # batch (n, d) and (d,)
            try:
                kl_dim = kl_divergence(qm, pm)                               # (n, d)
            except NotImplementedError:
                z1 = z[:1]                                                   # (1, n, d): logging needs no more
                kl_dim = (qm.log_prob(z1) - pm.log_prob(z1)).mean(0)         # (n, d)
        return kl, kl_dim

    def inference(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for x (n, p): batch (n, d)."""
        return self.encoder(x)

    def generative(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for z (..., d): batch (..., p)."""
        return self.decoder(z)

    def draw(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None, *, n_samples: int = 1,
             target: Optional[torch.Tensor] = None, qz: Optional[Distribution] = None, weights: bool = False,
             dreg: bool = False, closed_form: bool = False, pz: Optional[Distribution] = None) -> Draws:
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
        qz : q(z|x) of batch (n,), event (d,), optional
            q(z|x) to use instead of ``inference(x)``: evaluation passes the one it computed once per
            batch, the symmetry check one with a moment-matched sigma.
        pz : p(z), optional
            The prior to use instead of ``prior()``: loops over many calls with fixed weights compute
            it once (a VampPrior is an encoder pass over its K pseudo-inputs).
        weights : bool
            Also compute log w = log p(x|z) + log p(z) - log q(z|x), shape (S, n).
        dreg : bool
            log q(z|x) with its parameters held fixed (same value), so the encoder reaches log w
            through z only (the doubly reparameterized gradient, see `forward`).
        closed_form : bool
            For evaluation at large S, where no gradient is wanted: log p(z) - log q(z|x) from eps in
            closed form and a Bernoulli log-density in two passes over the (S, n, p) logits instead of
            the generic log_prob's five. Equal up to float32 rounding; training keeps the generic
            arithmetic, so both paths keep their figures bit for bit. log q(z|x) comes from eps for
            either family; log p(z) in closed form for N(0, I), from the prior's log_prob otherwise.
        """
        if closed_form and eps is None:  # a bug in the caller, not user input
            raise ValueError("draw(closed_form=True) computes log p(z) - log q(z|x) from eps: pass the noise")
        target = x if target is None else target
        qz = self.inference(x) if qz is None else qz                         # batch (n,), event (d,)
        pz = self.prior() if pz is None else pz                              # event (d,)
        if eps is None:
            z = qz.rsample((n_samples,))                                     # (S, n, d): torch.distributions' own draw
        else:
            z = reparameterize(qz, eps)                                      # (S, n, d): the given noise mapped
        px = self.generative(z)                                              # batch (S, n, p)
        if closed_form and isinstance(px, Bernoulli):
            # log Bernoulli(x; sigmoid(l)) = x l - softplus(l), valid for any x in [0, 1]
            log_px = (px.logits * target).sum(-1) - F.softplus(px.logits).sum(-1)   # (S, n)
        else:
            log_px = px.log_prob(target).sum(-1)                             # (S, n)
        log_w = log_pz = None
        if weights and closed_form and self.cfg.prior == "normal":
            # log p(z) - log q(z|x) = -z^2/2 - (-eps^2/2 - log|det L|): the 2 pi terms cancel
            log_w = log_px + (0.5 * (eps.square() - z.square()).sum(-1) + log_det_scale(qz))
        elif weights and closed_form:
            # -log q(z|x) = eps^2/2 + log|det L| + (d/2) log 2 pi
            neg_log_q = 0.5 * eps.square().sum(-1) + log_det_scale(qz) + 0.5 * z.shape[-1] * math.log(2 * math.pi)
            log_pz = pz.log_prob(z)                                          # (S, n)
            log_w = log_px + log_pz + neg_log_q                              # (S, n)
        elif weights:
            q = detached(qz) if dreg else qz
            log_pz = None if self.cfg.prior == "normal" else pz.log_prob(z)  # kept for the Monte Carlo KL
            log_w = log_px + (pz.log_prob(z) if log_pz is None else log_pz) - q.log_prob(z)   # (S, n)
        rec = log_px.mean(0)                                                 # (n,)
        kl, kl_dim = self.kl(qz, pz, z, log_pz)                              # (n,), (n, d)
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
