"""Standalone artifacts of a trained model: the encoder (x -> mu, sigma, and scale_tril for a full
covariance) and the decoder (z -> the likelihood's parameters) as ONNX or torch.export programs,
written and then run against the model (`vaelens export`; docs/export.md).

The prior is part of neither graph: a mixture prior's parameters stay in the run's weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import SIGMA_MAX, scale_tril

SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}
# the ONNX graph is traced by the TorchScript-based exporter (dynamo=False): for these plain MLP/conv
# modules it gives the same graph as the dynamo exporter in a third of the time and needs no onnxscript
ONNX_OPSET = 17


class EncoderExport(nn.Module):
    """x (model units) -> (mu, sigma), and scale_tril for the full family: the module's own inference
    network, its distribution unpacked (sigma the marginal std).

    The full family's L is assembled here as [sigma, below] @ P, P a constant 0/1 placement matrix,
    from the encoder's own heads with its own arithmetic (`model.Encoder.forward`): the encoder writes
    the entries below the diagonal by indexed assignment, which the TorchScript ONNX exporter cannot
    express. `check_artifacts` compares the result with the model's L before anything is kept.
    """

    def __init__(self, module):
        super().__init__()
        # the encoder alone, not the module: a mixture prior's parameters (the VampPrior's pseudo-inputs)
        # are no part of the graph
        self.encoder, self.full, self.d = module.encoder, module.cfg.posterior == "full", module.latent_dim
        if self.full:
            d = module.latent_dim
            below = torch.tril_indices(d, d, offset=-1)
            cells = torch.cat([torch.arange(d) * (d + 1), below[0] * d + below[1]])   # diagonal, then below it
            place = torch.zeros(len(cells), d * d)
            place[torch.arange(len(cells)), cells] = 1.0
            self.register_buffer("place", place, persistent=False)           # (d(d+1)/2, d^2)

    def forward(self, x):
        if not self.full:
            q = self.encoder(x)                                              # q(z|x): `VAEModule.inference`
            return q.mean, q.stddev
        enc, d = self.encoder, self.d
        xt = enc.trunk(x)                                                    # (n, width)
        mu = enc.mu_head(xt)                                                 # (n, d)
        sigma = F.softplus(enc.sigma_head(xt)).clamp(max=SIGMA_MAX) + enc.sigma_floor   # (n, d): L's diagonal
        off = enc.tril_head(xt).clamp(-SIGMA_MAX, SIGMA_MAX)                 # (n, d(d-1)/2): below it
        L = (torch.cat([sigma, off], 1) @ self.place).reshape(-1, d, d)      # (n, d, d)
        return mu, L.square().sum(-1).sqrt(), L


class DecoderExport(nn.Module):
    """z -> logits (Bernoulli, continuous Bernoulli) or (loc, scale) (Gaussian)."""

    def __init__(self, module, likelihood: str):
        super().__init__()
        self.decoder, self.gaussian = module.decoder, likelihood == "gaussian"

    def forward(self, z):
        px = self.decoder(z)                                                 # p(x|z): `VAEModule.generative`
        return (px.loc, px.scale) if self.gaussian else px.logits


def _example(vae):
    """Example inputs of batch 2 (not 1: a batch of one invites the exporter to specialize the dimension)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, vae.n_features_in_, generator=g), torch.randn(2, vae.latent_dim_, generator=g)


def write_artifacts(vae, fmt: str, folder: Path):
    """encoder/decoder artifacts in `folder`: (file names, {name: (inputs, outputs)})."""
    gaussian = vae.config_.model.likelihood == "gaussian"
    full = vae.config_.model.posterior == "full"
    spec = {"encoder": (["x"], ["mu", "sigma"] + (["scale_tril"] if full else [])),
            "decoder": (["z"], ["loc", "scale"] if gaussian else ["logits"])}
    mods = {"encoder": EncoderExport(vae.module_), "decoder": DecoderExport(vae.module_, vae.config_.model.likelihood)}
    x, z = _example(vae)
    files = []
    for name, example in (("encoder", x), ("decoder", z)):
        path = folder / f"{name}{SUFFIX[fmt]}"
        ins, outs = spec[name]
        if fmt == "onnx":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(mods[name], (example,), str(path), input_names=ins, output_names=outs,
                                  dynamic_axes={n: {0: "batch"} for n in ins + outs}, opset_version=ONNX_OPSET,
                                  dynamo=False)
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(mods[name], (example,), dynamic_shapes={ins[0]: {0: batch}})
            torch.export.save(program, str(path))
        files.append(path.name)
    return files, spec


def check_artifacts(vae, fmt: str, folder: Path, Xm: np.ndarray) -> dict:
    """Run the written artifacts on the rows Xm (and on z = mu of them and prior draws); the largest
    absolute difference from the model for each output."""
    module = vae.module_
    with torch.inference_mode():
        x = torch.as_tensor(Xm)
        q = module.inference(x)
        z = torch.cat([q.mean, torch.randn(3, q.mean.shape[1], generator=torch.Generator().manual_seed(1))])
        px = module.generative(z)
    want_enc = [q.mean.numpy(), q.stddev.numpy()] + ([scale_tril(q).numpy()] if vae.config_.model.posterior == "full"
                                                     else [])
    want_dec = [px.loc.numpy(), px.scale.numpy()] if vae.config_.model.likelihood == "gaussian" else [px.logits.numpy()]
    got_enc = _run_artifact(fmt, folder / f"encoder{SUFFIX[fmt]}", "x", Xm)
    got_dec = _run_artifact(fmt, folder / f"decoder{SUFFIX[fmt]}", "z", z.numpy())
    names = ["mu", "sigma"] + (["scale_tril"] if len(want_enc) == 3 else []) + (["loc", "scale"] if len(want_dec) == 2
                                                                             else ["logits"])
    diffs = {}
    for name, want, got in zip(names, want_enc + want_dec, got_enc + got_dec):
        diffs[name] = float(np.max(np.abs(want - got))) if want.shape == got.shape else float("inf")
    return diffs


def _run_artifact(fmt: str, path: Path, input_name: str, value: np.ndarray) -> list:
    value = np.ascontiguousarray(value, dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [np.asarray(o) for o in session.run(None, {input_name: value})]
    program = torch.export.load(str(path)).module()
    with torch.inference_mode():
        out = program(torch.as_tensor(value))
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
