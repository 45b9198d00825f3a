"""`vaelens sample`: decode draws from the prior p(z) (N(0, I), the learned mixture or the VampPrior:
`VAE.generate`) to a PNG grid (image runs), CSV or .npy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VaelensError
from ..io import atomic_write, prepare_output
from . import _common as common
from .info import prior_text
from .render import Result

NAME = "sample"
SUFFIXES = (".png", ".csv", ".npy")


def add_parser(subparsers):
    p = common.add_parser(subparsers, NAME, help="decode draws from the prior: a PNG grid for images, CSV for tables",
                          epilog="example:\n  vaelens sample runs/digits-... -n 64 --out samples.png\n")
    p.add_argument("run", type=Path)
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--out", type=Path, required=True, help=".png (image runs), .csv or .npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


@dataclass
class SampleResult(Result):
    path: Path
    n: int
    prior: str = "N(0, I)"  # p(z) in words (`info.prior_text`)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "n": self.n}

    def lines(self):
        return [f"wrote {self.path}: {self.n} samples decoded from z ~ {self.prior}"]


def run(args) -> SampleResult:
    from ..api import VAE
    from ..plots import save_image_grid

    if args.n < 1:
        raise VaelensError(f"-n must be >= 1, got {args.n}")
    suffix = args.out.suffix.lower()
    if suffix not in SUFFIXES:
        raise VaelensError(f"{args.out}: output must end in .png, .csv or .npy")
    common.check_output(args.out, args.force)
    vae = VAE.load(args.run)
    shape = vae.config_.model.image_shape
    if suffix == ".png" and shape is None:
        raise VaelensError(f"{args.run}: a table model has no images; write --out samples.csv instead")
    x = vae.generate(args.n, seed=args.seed)
    out = prepare_output(args.out, force=True)  # checked above; this creates its folder
    if suffix == ".png":
        atomic_write(out, lambda f: save_image_grid(f, x, shape))
    elif suffix == ".npy":
        atomic_write(out, lambda f: np.save(f, x))
    else:
        common.write_table(out, {f"x_{j}": x[:, j] for j in range(x.shape[1])})
    return SampleResult(out, args.n, prior_text(vae.config_.model))
