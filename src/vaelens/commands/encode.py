"""`vaelens encode`: every sample's mu and sigma (and reparameterized z) to .npz, .csv or .parquet.

A full-covariance run (--posterior full) also writes each q(z|x)'s Cholesky factor L, Sigma = L L^T:
`scale_tril` (n, d, d) in .npz, and in a table the lower triangle row by row as columns
``scale_tril_{a}_{b}`` for b <= a (L[a, b]; the entries above the diagonal are 0). ``sigma`` is the
marginal std sqrt(diag Sigma) for both families. A diagonal run's files are as they always were.
"""

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
                                      "mean mu and std sigma.\nA full-covariance run (--posterior full) also writes "
                                      "the Cholesky factor L of each covariance L L^T: scale_tril (n, d, d) in .npz, "
                                      "columns scale_tril_A_B (L[A, B], B <= A) in a table; sigma is the marginal "
                                      "std.\nA binarized run encodes the data binarized once with "
                                      "--seed, as the model saw it in training.",
                          epilog="examples:\n  vaelens encode runs/digits-... --out posterior.npz\n"
                                 "  vaelens encode RUN --data test.csv --out post.csv --samples 10\n")
    common.add_run_args(p)
    p.add_argument("--out", type=Path, required=True, help="output .npz, .csv or .parquet")
    p.add_argument("--samples", type=int, default=0, help="also write K reparameterized z per sample")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="write the refined (semi-amortized) posterior instead: each sample's Gaussian improved by "
                        "N Adam steps on its own ELBO for the fixed decoder, from the encoder's output "
                        "(towards q*, see 'vaelens gap'); --samples then draws from it")
    p.add_argument("--seed", type=int, default=0, help="seed for the z samples (and a binarized run's binarization)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


@dataclass
class EncodeResult(Result):
    path: Path
    n: int
    latent_dim: int
    samples: int
    refine: int = 0
    full: bool = False

    def to_dict(self) -> dict:
        out = {"path": str(self.path), "n": self.n, "latent_dim": self.latent_dim, "samples": self.samples,
               "refine": self.refine}
        return dict(out, scale_tril=True) if self.full else out

    def lines(self):
        what = "mu, sigma and scale_tril" if self.full else "mu and sigma"
        what = f"refined ({self.refine} steps) {what}" if self.refine else what
        return [f"wrote {self.path}: {what} of {self.n} samples x {self.latent_dim} dimensions"
                + (f", {self.samples} z samples each" if self.samples else "")]


def run(args) -> EncodeResult:
    suffix = args.out.suffix.lower()
    if suffix not in SUFFIXES:
        raise VaelensError(f"{args.out}: output must end in .npz, .csv or .parquet")
    if args.samples < 0:
        raise VaelensError(f"--samples must be >= 0, got {args.samples}")
    if args.refine < 0:
        raise VaelensError(f"--refine must be >= 0 (Adam steps), got {args.refine}")
    if suffix == ".parquet":
        common.require_pyarrow()
    common.check_output(args.out, args.force)
    vae, ds = common.load_run_and_data(args)
    X = ds.X
    post = vae.encode(X, seed=args.seed, refine=args.refine)
    cols = {"index": np.arange(ds.n)}
    if ds.y is not None:
        cols["label"] = ds.labels()  # as written in the file: 5, 8, 11, 14 stay 5, 8, 11, 14
    z = _samples(vae, X, post, args) if args.samples else None               # (K, n, d)
    d = post.mu.shape[1]
    out = prepare_output(args.out, force=True)  # checked above; this creates its folder
    if suffix == ".npz":
        arrays = dict(cols, mu=post.mu, sigma=post.sigma)
        if post.scale_tril is not None:
            arrays["scale_tril"] = post.scale_tril                           # (n, d, d): Sigma = L L^T
        if z is not None:
            arrays["z"] = np.transpose(z, (1, 0, 2))  # (n, K, d)
        atomic_write(out, lambda f: np.savez(f, **arrays))
    else:
        table = dict(cols)
        table.update({f"mu_{j}": post.mu[:, j] for j in range(d)})
        table.update({f"sigma_{j}": post.sigma[:, j] for j in range(d)})
        if post.scale_tril is not None:  # the lower triangle, row by row: L[a, b] for b <= a
            table.update({f"scale_tril_{a}_{b}": post.scale_tril[:, a, b] for a in range(d) for b in range(a + 1)})
        for k in range(0 if z is None else z.shape[0]):
            table.update({f"z{k}_{j}": z[k, :, j] for j in range(d)})
        common.write_table(out, table)
    return EncodeResult(out, ds.n, d, args.samples, args.refine, post.scale_tril is not None)


def _samples(vae, X, post, args) -> np.ndarray:
    """K reparameterized z per sample, (K, n, d): the encoder's own draws, or mu + sigma * eps (mu + L eps
    for the full family) from the refined posterior with eps seeded by --seed."""
    if not args.refine:
        return vae.sample_latent(X, args.samples, seed=args.seed)
    eps = np.random.default_rng(args.seed).standard_normal((args.samples, *post.mu.shape)).astype(np.float32)
    if post.scale_tril is not None:
        return post.mu + np.einsum("nab,knb->kna", post.scale_tril, eps)
    return post.mu + post.sigma * eps
