"""`vaelens export`: the encoder (x -> mu, sigma) and the decoder (z -> the likelihood's parameters) as
standalone ONNX or torch.export artifacts, with export.json describing them, checked before they are kept.

A full-covariance run's encoder has a third output, scale_tril (batch, d, d): the Cholesky factor L of
q(z|x)'s covariance L L^T (sigma stays the marginal std). The prior (N(0, I), a mixture, the VampPrior)
is not part of either graph: a mixture prior's parameters are in the run's weights, and export.json
names the prior, so that a user who samples z ~ p(z) knows which one to draw from."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .. import data as data_mod
from ..errors import DataError, OutputError, VaelensError
from ..io import check_writable, fsync_dir, write_json
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..api import VAE

NAME = "export"
FORMATS = ("onnx", "torch")
ATOL = 1e-4
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


def run(args) -> ExportResult:
    from .. import exporting
    from ..api import VAE

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
        files, io_spec = exporting.write_artifacts(vae, args.format, tmp)
        diffs = exporting.check_artifacts(vae, args.format, tmp, Xm)
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


def _family(m) -> dict:
    """export.json's posterior family and prior; a diagonal run with N(0, I) adds nothing (its file is as it was)."""
    if m.posterior == "diagonal" and m.prior == "normal":
        return {}
    return {"posterior": m.posterior, "prior": m.prior, "prior_components": m.components,
            "prior_note": "the artifacts hold q(z|x) and p(x|z) only; p(z) is not exported"
                          + ("" if m.prior == "normal" else " (its parameters are in the run's model.safetensors)")}


def describe(vae: VAE, args, files: list, spec: dict, diffs: dict, rows: int) -> dict:
    """export.json: what each artifact takes and gives, the preprocessing, the run's config."""
    from .. import exporting

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
            "exporter": (f"torch.onnx.export (TorchScript-based, dynamo=False), opset {exporting.ONNX_OPSET}"
                         if args.format == "onnx" else "torch.export.export, saved with torch.export.save"),
            "likelihood": cfg.model.likelihood, "image_shape": cfg.model.image_shape, "artifacts": arts,
            **_family(cfg.model),
            "preprocessing": pre, "check": {"rows": rows, "atol": ATOL, "max_abs_diff": diffs},
            "config": cfg.to_dict()}
