"""`vaelens encode`: every sample's mu and sigma (and reparameterized z) to .npz, .csv or .parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VaelensError
from ..io import atomic_write, prepare_output
from . import _common as common
from .render import Result

NAME = "encode"
SUFFIXES = (".npz", ".csv", ".parquet")


def add_parser(subparsers):
    p = common.add_parser(subparsers, NAME, help="write every sample's mu and sigma (and reparameterized z) to a file",
                          description="Encode the data (default: the run's own) and write every sample's posterior "
                                      "mean mu and std sigma.\nA binarized run encodes the data binarized once with "
                                      "--seed, as the model saw it in training.",
                          epilog="examples:\n  vaelens encode runs/digits-... --out posterior.npz\n"
                                 "  vaelens encode RUN --data test.csv --out post.csv --samples 10\n")
    common.add_run_args(p)
    p.add_argument("--out", type=Path, required=True, help="output .npz, .csv or .parquet")
    p.add_argument("--samples", type=int, default=0, help="also write K reparameterized z per sample")
    p.add_argument("--seed", type=int, default=0, help="seed for the z samples (and a binarized run's binarization)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


@dataclass
class EncodeResult(Result):
    path: Path
    n: int
    latent_dim: int
    samples: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), "n": self.n, "latent_dim": self.latent_dim, "samples": self.samples}

    def lines(self):
        return [f"wrote {self.path}: mu and sigma of {self.n} samples x {self.latent_dim} dimensions"
                + (f", {self.samples} z samples each" if self.samples else "")]


def run(args) -> EncodeResult:
    suffix = args.out.suffix.lower()
    if suffix not in SUFFIXES:
        raise VaelensError(f"{args.out}: output must end in .npz, .csv or .parquet")
    if args.samples < 0:
        raise VaelensError(f"--samples must be >= 0, got {args.samples}")
    if suffix == ".parquet":
        common.require_pyarrow()
    common.check_output(args.out, args.force)
    vae, ds = common.load_run_and_data(args)
    X = ds.X
    post = vae.encode(X, seed=args.seed)
    cols = {"index": np.arange(ds.n)}
    if ds.y is not None:
        cols["label"] = ds.labels()  # as written in the file: 5, 8, 11, 14 stay 5, 8, 11, 14
    z = vae.sample_latent(X, args.samples, seed=args.seed) if args.samples else None  # (K, n, d)
    d = post.mu.shape[1]
    out = prepare_output(args.out, force=True)  # checked above; this creates its folder
    if suffix == ".npz":
        arrays = dict(cols, mu=post.mu, sigma=post.sigma)
        if z is not None:
            arrays["z"] = np.transpose(z, (1, 0, 2))  # (n, K, d)
        atomic_write(out, lambda f: np.savez(f, **arrays))
    else:
        table = dict(cols)
        table.update({f"mu_{j}": post.mu[:, j] for j in range(d)})
        table.update({f"sigma_{j}": post.sigma[:, j] for j in range(d)})
        for k in range(0 if z is None else z.shape[0]):
            table.update({f"z{k}_{j}": z[k, :, j] for j in range(d)})
        common.write_table(out, table)
    return EncodeResult(out, ds.n, d, args.samples)
