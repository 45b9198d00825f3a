import math

import pytest
import torch
from torch.distributions import Independent, Normal

from vaelens.config import ModelConfig
from vaelens.model import VAEModule, diagonal_normal


def make(**kw):
    base = dict(input_dim=64, image_shape=(8, 8), latent_dim=3, hidden=(16,))
    base.update(kw)
    torch.manual_seed(0)
    return VAEModule(ModelConfig(**base))


def test_encoder_returns_normal_and_rsample_is_the_trick():
    m = make()
    x = torch.rand(5, 64)
    qz = m.encoder(x)
    # the diagonal family: d independent Normals as one event of d dimensions
    assert isinstance(qz, Independent) and isinstance(qz.base_dist, Normal)
    assert qz.batch_shape == (5,) and qz.event_shape == (3,)
    assert (qz.stddev > 0).all()
    torch.manual_seed(1)
    z = qz.rsample((4,))
    torch.manual_seed(1)
    eps = torch.randn(4, 5, 3)
    # z = mu + sigma * eps, bit for bit, with gradients flowing to mu and sigma
    assert torch.equal(z, qz.mean + qz.stddev * eps)
    z.sum().backward()
    assert m.encoder.mu_head.weight.grad is not None and m.encoder.sigma_head.weight.grad is not None


def test_kl_is_the_analytic_gaussian_kl():
    m = make()
    x = torch.rand(6, 64)
    t = m.terms(x)
    mu, sigma = m.encoder(x).mean, m.encoder(x).stddev
    ref = 0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * torch.log(sigma))
    assert torch.allclose(t.kl_dim, ref, atol=1e-5)
    assert t.rec.shape == t.kl.shape == t.elbo.shape == (6,) and t.kl_dim.shape == (6, 3)
    assert torch.allclose(t.elbo, t.rec - t.kl)


@pytest.mark.parametrize("lik", ["bernoulli", "cbernoulli", "gaussian"])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_every_decoder_gives_finite_per_sample_terms(lik, arch):
    for scale in (["fixed", "shared", "per_feature"] if lik == "gaussian" else ["fixed"]):
        m = make(likelihood=lik, arch=arch, gaussian_scale=scale)
        x = torch.rand(7, 64)
        loss, t = m(x)
        assert loss.shape == () and torch.isfinite(loss)
        assert t.elbo.shape == (7,)
        px = m.decoder(torch.zeros(2, 7, 3))
        assert px.batch_shape == (2, 7, 64)


def test_linear_model_has_no_trunk():
    m = make(hidden=())
    assert isinstance(m.encoder.trunk, torch.nn.Identity)
    assert len([l for l in m.decoder.net if isinstance(l, torch.nn.Linear)]) == 1


def test_encoder_has_no_batch_dependent_layers_and_mu_ignores_the_batch():
    m = make(arch="conv").eval()
    bad = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.Dropout)
    assert not any(isinstance(l, bad) for l in m.encoder.modules())
    x = torch.rand(10, 64)
    alone = m.encoder(x[3:4]).mean
    together = m.encoder(x).mean[3:4]
    assert torch.allclose(alone, together, atol=1e-6)


def test_iwae_with_one_sample_equals_the_elbo_sample():
    m = make()
    x = torch.rand(4, 64)
    torch.manual_seed(5)
    b = m.iwae_bound(x, 1)
    torch.manual_seed(5)
    t = m.terms(x)
    # with one sample the IWAE bound is rec + log p(z) - log q(z|x); the ELBO uses the analytic KL instead,
    # so they agree only in expectation: compare their means over many seeds
    bs, es = [], []
    for s in range(200):
        torch.manual_seed(s)
        bs.append(m.iwae_bound(x, 1))
        torch.manual_seed(s)
        es.append(m.terms(x).elbo)
    diff = (torch.stack(bs) - torch.stack(es)).mean(0)
    sd = (torch.stack(bs) - torch.stack(es)).std(0) / math.sqrt(200)
    # unbiased difference: within 4 standard errors (seeded, so this is deterministic)
    assert (diff.abs() < 4 * sd + 1e-4).all()
    assert b.shape == t.elbo.shape == (4,)


def test_iwae_bound_increases_with_k_on_average():
    m = make()
    x = torch.rand(20, 64)
    torch.manual_seed(0)
    b1 = m.iwae_bound(x, 1).mean()
    b50 = m.iwae_bound(x, 50).mean()
    assert b50 > b1


def test_free_bits_floors_each_dimension():
    m = make()
    x = torch.rand(8, 64)
    torch.manual_seed(0)
    loss_fb, t = m(x, free_bits=100.0)
    # every dimension's KL is below 100 nats, so each counts as exactly 100
    assert torch.allclose(loss_fb, -(t.rec.mean()) + 3 * 100.0, atol=1e-3)


def _encoder_grads(m, x, K, groups, *, dreg=False, stl=False):
    """One flattened encoder gradient per group, each the mean over the rows of x (independent draws)."""
    enc = list(m.encoder.parameters())
    out = []
    for g in range(groups):
        torch.manual_seed(1000 + g)
        if stl:
            # the biased "sticking the landing" gradient for IWAE: log q held fixed, no re-weighting
            lw = m.draw(x, n_samples=K, weights=True, dreg=True).log_w
            loss = -(torch.logsumexp(lw, 0) - math.log(K)).mean()
        else:
            loss, _ = m(x, objective="iwae", iw_samples=K, dreg=dreg)
        grads = torch.autograd.grad(loss, enc)
        out.append(torch.cat([g_.flatten() for g_ in grads]))
    return torch.stack(out).double()                                    # (groups, n_params)


def _mean_t2(a, b):
    """Mean over coordinates of the squared Welch t statistic of mean(a) - mean(b): about 1 when unbiased."""
    se2 = a.var(0) / len(a) + b.var(0) / len(b)
    keep = se2 > 0
    return (((a.mean(0) - b.mean(0))[keep] ** 2) / se2[keep]).mean().item()


def test_dreg_keeps_the_loss_and_decoder_gradient_and_is_unbiased_for_the_encoder():
    m = make(latent_dim=2, hidden=(8,))
    x = torch.rand(1, 64).expand(400, 64)   # 400 independent K-sample draws for one image per group
    K = 8
    torch.manual_seed(3)
    l_std, _ = m(x, objective="iwae", iw_samples=K)
    g_std = torch.autograd.grad(l_std, list(m.decoder.parameters()))
    torch.manual_seed(3)
    l_dreg, _ = m(x, objective="iwae", iw_samples=K, dreg=True)
    g_dreg = torch.autograd.grad(l_dreg, list(m.decoder.parameters()))
    # same draws: the same loss value and the same decoder gradient, up to float32 rounding
    torch.testing.assert_close(l_dreg, l_std)
    for a, b in zip(g_dreg, g_std):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # Encoder: E[DReG] = E[standard IWAE gradient]. 60 groups of 400 draws per estimator; the statistic is the
    # mean over coordinates of the squared Welch t of the difference, ~1 when unbiased. The coordinates are
    # strongly correlated, so it spreads far more than chi-square/n would: measured 0.5-3.3 on 30-group
    # subsets over three models, 0.67 on 150 groups (it does not grow with the groups, as a bias would).
    # Hence a bound of 6; the biased STL gradient with the same draws scores in the thousands.
    std = _encoder_grads(m, x, K, 60)
    dreg = _encoder_grads(m, x, K, 60, dreg=True)
    stl = _encoder_grads(m, x, K, 60, stl=True)
    t2_dreg, t2_stl = _mean_t2(dreg, std), _mean_t2(stl, std)
    assert t2_dreg < 6.0, t2_dreg
    assert t2_stl > 100.0, t2_stl
    # and its point: a lower-variance encoder gradient (measured 0.54-0.58 of the standard's at K = 8)
    assert dreg.var(0).sum() < 0.75 * std.var(0).sum()


def test_dreg_needs_the_iwae_objective():
    from vaelens.config import TrainConfig
    from vaelens.errors import ConfigError
    with pytest.raises(ConfigError, match="dreg needs objective 'iwae'"):
        TrainConfig(dreg=True).validate()
    TrainConfig(objective="iwae", iw_samples=4, dreg=True).validate()


def test_draw_is_rsample_and_one_computation_for_terms_and_weights():
    # fresh noise is drawn exactly as qz.rsample draws it, so training's random stream is unchanged
    m = make()
    x = torch.rand(5, 64)
    torch.manual_seed(2)
    z_ref = m.inference(x).rsample((3,))
    torch.manual_seed(2)
    s = m.draw(x, n_samples=3, weights=True)
    assert torch.equal(s.z, z_ref) and s.eps is None
    # given noise gives the same numbers as the same noise drawn fresh (up to the rounding of (z - mu) / sigma)
    qz0 = m.inference(x)
    g = m.draw(x, (s.z - qz0.mean) / qz0.stddev, weights=True)
    for a, b in ((g.log_w, s.log_w), (g.terms.elbo, s.terms.elbo), (g.terms.kl_dim, s.terms.kl_dim)):
        torch.testing.assert_close(a, b)
    # the terms and the weights are what their names say
    qz, pz = m.inference(x), m.prior()
    px = m.generative(s.z)
    assert torch.equal(s.log_px, px.log_prob(x).sum(-1))
    # both are distributions over the whole latent vector (event (d,)): log_prob sums the dimensions
    torch.testing.assert_close(s.log_w, s.log_px + pz.log_prob(s.z) - qz.log_prob(s.z))
    torch.testing.assert_close(s.terms.rec, s.log_px.mean(0))
    torch.testing.assert_close(s.terms.kl_dim, torch.distributions.kl_divergence(qz.base_dist, pz.base_dist))
    # terms(), log_weights() and forward() are views of the same computation, draw for draw
    torch.manual_seed(2)
    assert torch.equal(m.log_weights(x, 3), s.log_w)
    torch.manual_seed(2)
    assert torch.equal(m.terms(x, n_samples=3).elbo, s.terms.elbo)
    torch.manual_seed(2)
    loss, t = m(x, objective="iwae", iw_samples=3)
    assert torch.equal(loss, -(torch.logsumexp(s.log_w, 0) - math.log(3)).mean())
    assert not t.kl.requires_grad and torch.equal(t.kl, s.terms.kl)


@pytest.mark.parametrize("lik", ["bernoulli", "cbernoulli", "gaussian"])
def test_closed_form_weights_equal_the_generic_ones(lik):
    # evaluation's closed form (log p(z) - log q(z|x) from eps, two-pass Bernoulli) is the same quantity
    m = make(likelihood=lik).eval()
    x = torch.rand(4, 64) if lik != "gaussian" else torch.randn(4, 64)
    eps = torch.randn(6, 4, 3)
    with torch.inference_mode():
        fast = m.draw(x, eps, weights=True, closed_form=True).log_w
        slow = m.draw(x, eps, weights=True).log_w
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)


def test_draw_with_another_posterior_and_float64():
    # the symmetry check's use: given noise, a replaced sigma, float64 throughout
    m = make().double().eval()
    x = torch.rand(5, 64, dtype=torch.float64)
    eps = torch.randn(4, 5, 3, dtype=torch.float64)
    qz = m.inference(x)
    q2 = diagonal_normal(qz.mean, 2 * qz.stddev)
    s = m.draw(x, eps, qz=q2)
    assert s.terms.elbo.dtype == torch.float64
    assert torch.equal(s.z, qz.mean + eps * 2 * qz.stddev)
    torch.testing.assert_close(s.terms.kl, torch.distributions.kl_divergence(q2, m.prior()))


def test_gaussian_mixture_log_prob_is_mixture_same_family():
    # the one-matmul density of the mog/vamp priors against torch's generic MixtureSameFamily, both in
    # float64 (so only the expansion's rounding differs: relative 1e-10 is far above it, far below any bug),
    # and its gradients too
    from torch.distributions import Categorical, MixtureSameFamily
    from vaelens.model import GaussianMixture
    g = torch.Generator().manual_seed(0)
    K, d = 7, 4
    loc = torch.randn(K, d, generator=g, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(K, d, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    logits = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    z = 2 * torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    fast = GaussianMixture(logits, loc, scale).log_prob(z)
    ref = MixtureSameFamily(Categorical(logits=logits), diagonal_normal(loc, scale)).log_prob(z)
    assert fast.shape == ref.shape == (3, 5)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(v.sum(), (loc, scale, logits)) for v in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_marginals_of_a_mixture_are_mixture_same_family():
    # the per-dimension marginals' fused log_prob (training logs it every step) against torch's generic
    # MixtureSameFamily over the same Normal components, in float64 with z both near and far (30 sd) from
    # every component, so only rounding differs; and its gradients
    from torch.distributions import Categorical, MixtureSameFamily, Normal
    from vaelens.model import GaussianMixture, NormalMixtures, marginals
    g = torch.Generator().manual_seed(1)
    K, d = 6, 3
    loc = torch.randn(K, d, generator=g, dtype=torch.float64).requires_grad_()
    scale = (0.3 * torch.rand(K, d, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    logits = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    z = torch.cat([torch.randn(4, d, generator=g, dtype=torch.float64), torch.full((1, d), 10.0, dtype=torch.float64)])
    pm = marginals(GaussianMixture(logits, loc, scale))
    assert isinstance(pm, NormalMixtures) and pm.batch_shape == (d,)
    ref = MixtureSameFamily(Categorical(logits=logits.expand(d, K)), Normal(loc.T, scale.T))
    fast, want = pm.log_prob(z), ref.log_prob(z)
    assert fast.shape == want.shape == (5, d)
    torch.testing.assert_close(fast, want, rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(v.sum(), (loc, scale, logits)) for v in (fast, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
@pytest.mark.parametrize("prior", ["normal", "mog", "vamp"])
def test_each_family_and_prior_gives_per_sample_terms_and_weights(posterior, prior):
    m = make(posterior=posterior, prior=prior, prior_components=3 if prior != "normal" else None)
    x = torch.rand(6, 64)
    m.init_prior(x, seed=0)
    qz, pz = m.inference(x), m.prior()
    assert qz.batch_shape == (6,) and qz.event_shape == (3,) and pz.event_shape == (3,)
    s = m.draw(x, n_samples=4, weights=True)
    assert s.z.shape == (4, 6, 3) and s.log_w.shape == (4, 6)
    for t in (s.terms.rec, s.terms.kl, s.terms.elbo):
        assert t.shape == (6,) and torch.isfinite(t).all()
    assert s.terms.kl_dim.shape == (6, 3)
    # the weights are log p(x|z) + log p(z) - log q(z|x) for the chosen prior and family
    torch.testing.assert_close(s.log_w, s.log_px + pz.log_prob(s.z) - qz.log_prob(s.z))
    loss, _ = m(x, objective="iwae", iw_samples=3, dreg=True)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("encoder.mu_head"))
    if prior == "vamp":  # the pseudo-inputs are learned
        assert m.pseudo_inputs.grad is not None and m.pseudo_inputs.grad.abs().sum() > 0
