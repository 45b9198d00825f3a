"""`vaelens export`: the encoder (x -> mu, sigma) and the decoder (z -> the likelihood's parameters) as
standalone ONNX or torch.export artifacts, with export.json describing them, checked before they are kept.

A full-covariance run's encoder has a third output, scale_tril (batch, d, d): the Cholesky factor L of
q(z|x)'s covariance L L^T (sigma stays the marginal std). The prior (N(0, I), a mixture, the VampPrior)
is not part of either graph: a mixture prior's parameters are in the run's weights, and export.json
names the prior, so that a user who samples z ~ p(z) knows which one to draw from."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from .. import data as data_mod
from ..api import VAE
from ..errors import DataError, OutputError, VaelensError
from ..io import check_writable, fsync_dir, write_json
from ..model import SIGMA_MAX, scale_tril
from . import _common as common
from .render import Result

NAME = "export"
FORMATS = ("onnx", "torch")
ATOL = 1e-4
SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}
# the ONNX graph is traced by the TorchScript-based exporter (dynamo=False): for these plain MLP/conv
# modules it gives the same graph as the dynamo exporter in a third of the time and needs no onnxscript
ONNX_OPSET = 17

_EPILOG = ("examples:\n  vaelens export runs/digits-... --format onnx --out served/digits\n"
           "  vaelens export RUN --format torch --out served/digits-pt2 --force\n")


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME, epilog=_EPILOG,
        help="write the encoder and decoder as standalone ONNX or torch.export artifacts",
        description="Export the run's encoder (x -> mu, sigma of q(z|x); a full-covariance run also gives "
                    "scale_tril, the Cholesky factor of the covariance) and decoder (z -> the likelihood's "
                    "parameters: logits, or loc and scale) into --out: encoder.onnx and decoder.onnx (ONNX, "
                    "dynamic batch dimension) or encoder.pt2 and decoder.pt2 (torch.export programs), and "
                    "export.json with their inputs, outputs, the preprocessing the encoder expects (the inputs "
                    "are in the model's units: standardized with the saved mean and std, or binarized) and the "
                    "run's config. Before the folder is kept, the artifacts are run (onnxruntime, or "
                    "torch.export.load) on rows of the data and compared with the model (atol 1e-4); a mismatch "
                    "leaves nothing behind and exits 2.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--format", choices=FORMATS, required=True, help="onnx or torch (torch.export)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    common.add_data_args(p)
    p.add_argument("--check-rows", type=int, default=37, metavar="N",
                   help="rows of the data (default: the run's own) the check runs the artifacts on")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    return p


@dataclass
class ExportResult(Result):
    path: Path
    format: str
    files: list
    max_abs_diff: dict
    rows: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "files": self.files,
                "max_abs_diff": self.max_abs_diff, "check_rows": self.rows}

    def lines(self):
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in self.max_abs_diff.items())
        return [f"wrote {self.path}: {', '.join(self.files)} ({self.format})",
                f"  checked on {self.rows} rows against the model: max |difference| {diffs} (atol {ATOL:g})"]


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


def run(args) -> ExportResult:
    if args.check_rows < 1:
        raise VaelensError(f"--check-rows must be >= 1, got {args.check_rows}")
    out = check_export_folder(args.out, args.force)
    _require(args.format)
    vae = VAE.load(args.run)
    vae.module_.eval()
    ds = data_mod.load(common.data_config(args, base=vae.config_.data), "train")
    common.show_notes(ds)
    Xm = vae.model_input(ds.X[:args.check_rows], seed=0)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files, io_spec = write_artifacts(vae, args.format, tmp)
        diffs = check_artifacts(vae, args.format, tmp, Xm)
        bad = {k: v for k, v in diffs.items() if not v <= ATOL}
        if bad:
            raise DataError(f"{args.out}: the exported {args.format} artifacts differ from the model on "
                            f"{len(Xm)} rows ({', '.join(f'{k} by {v:.3g}' for k, v in bad.items())}, atol "
                            f"{ATOL:g}); nothing was written")
        write_json(tmp / "export.json", describe(vae, args, files, io_spec, diffs, len(Xm)))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, args.format, files + ["export.json"], diffs, len(Xm))


def check_export_folder(out: Path, force: bool) -> Path:
    """--out as a new folder; an existing one only with --force, and only if it is empty or an export
    (holds export.json): --force must not wipe a folder of the user's other files."""
    check_writable(out, folder=True, what="export folder")
    if out.exists():
        if not force:
            raise OutputError(f"{out}: export folder already exists; pass --force to replace it "
                              f"or choose another --out")
        if any(out.iterdir()) and not (out / "export.json").is_file():
            raise OutputError(f"{out}: exists and holds files that are not an export (no export.json); "
                              f"choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create its folder ({e.strerror or e})") from None
    return out


def _require(fmt: str) -> None:
    """onnx and onnxruntime for --format onnx, with the install to run named; checked before any work."""
    if fmt != "onnx":
        return
    import importlib

    try:
        for name in ("onnx", "onnxruntime"):
            importlib.import_module(name)
    except ImportError:
        raise VaelensError("--format onnx needs onnx and onnxruntime: pip install 'vaelens[export]'") from None


def _replace(tmp: Path, out: Path) -> None:
    """Move the checked folder into place (an old export, allowed by --force, is removed first)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    fsync_dir(out.parent)


def _example(vae: VAE):
    """Example inputs of batch 2 (not 1: a batch of one invites the exporter to specialize the dimension)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, vae.n_features_in_, generator=g), torch.randn(2, vae.latent_dim_, generator=g)


def write_artifacts(vae: VAE, fmt: str, folder: Path):
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


def check_artifacts(vae: VAE, fmt: str, folder: Path, Xm: np.ndarray) -> dict:
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


def _family(m) -> dict:
    """export.json's posterior family and prior; a diagonal run with N(0, I) adds nothing (its file is as it was)."""
    if m.posterior == "diagonal" and m.prior == "normal":
        return {}
    return {"posterior": m.posterior, "prior": m.prior, "prior_components": m.components,
            "prior_note": "the artifacts hold q(z|x) and p(x|z) only; p(z) is not exported"
                          + ("" if m.prior == "normal" else " (its parameters are in the run's model.safetensors)")}


def describe(vae: VAE, args, files: list, spec: dict, diffs: dict, rows: int) -> dict:
    """export.json: what each artifact takes and gives, the preprocessing, the run's config."""
    cfg = vae.config_
    p, d = vae.n_features_in_, vae.latent_dim_
    shapes = {"x": ["batch", p], "mu": ["batch", d], "sigma": ["batch", d], "scale_tril": ["batch", d, d],
              "z": ["batch", d],
              "logits": ["batch", p], "loc": ["batch", p], "scale": ["batch", p]}
    arts = {name: {"file": f, "inputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in spec[name][0]],
                   "outputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in spec[name][1]]}
            for name, f in zip(("encoder", "decoder"), files)}
    t = cfg.transform if cfg.data.standardize else None
    pre = {"binarize": cfg.data.binarize, "standardize": bool(cfg.data.standardize),
           "mean": None if t is None else list(t.mean), "std": None if t is None else list(t.std),
           "how": "the encoder takes x in the model's units: "
                  + ("(x - mean) / std per feature" if t is not None else
                     "values in {0, 1} (binarize each feature by a Bernoulli draw with p = x, as in training)"
                     if cfg.data.binarize != "none" else "the data as the run was trained on it")}
    return {"format": args.format, "vaelens_version": __version__, "run": str(args.run),
            "exporter": (f"torch.onnx.export (TorchScript-based, dynamo=False), opset {ONNX_OPSET}"
                         if args.format == "onnx" else "torch.export.export, saved with torch.export.save"),
            "likelihood": cfg.model.likelihood, "image_shape": cfg.model.image_shape, "artifacts": arts,
            **_family(cfg.model),
            "preprocessing": pre, "check": {"rows": rows, "atol": ATOL, "max_abs_diff": diffs},
            "config": cfg.to_dict()}
