"""`vaelens encode`: every sample's mu and sigma (and reparameterized z) to .npz, .csv or .parquet.

A full-covariance run (--posterior full) also writes each q(z|x)'s Cholesky factor L, Sigma = L L^T:
`scale_tril` (n, d, d) in .npz, and in a table the lower triangle row by row as columns
``scale_tril_{a}_{b}`` for b <= a (L[a, b]; the entries above the diagonal are 0). ``sigma`` is the
marginal std sqrt(diag Sigma) for both families. A diagonal run's files are as they always were.

Data that `vaelens train` would stream (`vaelens.stream.choose`: a .npy/.parquet file over 512 MiB, or a
folder/glob of shards over it) is encoded chunk by chunk and written with `vaelens.chunked.RowWriter`, memory
independent of the row count; under torchrun each rank encodes its consecutive chunks and rank 0 assembles
the parts in order (docs/streaming.md). Other data is encoded at once, by rank 0 alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import data as data_mod
from ..errors import VaelensError
from ..io import atomic_write, prepare_output
from . import _common as common
from .render import Result

if TYPE_CHECKING:
    from ..shards import ShardSet

NAME = "encode"
DISTRIBUTED = True  # streamed data: every rank encodes its chunks; data in memory: rank 0 alone
STREAM_CHUNK = 8192  # rows encoded at a time when streaming: a multiple of VAE.encode's batch (4096)
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
    from .. import dist, stream
    from ..api import VAE

    suffix = args.out.suffix.lower()
    if suffix not in SUFFIXES:
        raise VaelensError(f"{args.out}: output must end in .npz, .csv or .parquet")
    if args.samples < 0:
        raise VaelensError(f"--samples must be >= 0, got {args.samples}")
    if args.refine < 0:
        raise VaelensError(f"--refine must be >= 0 (Adam steps), got {args.refine}")
    if suffix == ".parquet":
        common.require_pyarrow()
    if dist.env_info().is_main:  # rank 0 writes the file; another rank checking after it wrote would refuse
        common.check_output(args.out, args.force)
    vae = VAE.load(args.run)
    cfg = vae.config_.replace(data=common.data_config(args, base=vae.config_.data))
    src = stream.choose(cfg) if args.split == "train" else None
    if src is not None and stream.streams(cfg, src):
        return _encode_streamed(args, vae, src)
    if not dist.env_info().is_main:  # under torchrun, data in memory is encoded by rank 0 alone
        return EncodeResult(args.out, 0, 0, args.samples)
    ds = data_mod.load(cfg.data, args.split) if src is None else src.to_dataset()
    common.show_notes(ds)
    X = ds.X
    post = vae.encode(X, seed=args.seed, refine=args.refine)
    cols = {"index": np.arange(ds.n)}
    if ds.y is not None:
        cols["label"] = ds.labels()  # as written in the file: 5, 8, 11, 14 stay 5, 8, 11, 14
    z = _samples(vae, X, post, args) if args.samples else None               # (K, n, d)
    d = post.mu.shape[1]
    out = prepare_output(args.out, force=True)  # checked above; this creates its folder
    if suffix == ".npz":
        arrays = _arrays(cols, post, z)
        atomic_write(out, lambda f: np.savez(f, **arrays))
    else:
        common.write_table(out, _table(cols, post, z))
    return EncodeResult(out, ds.n, d, args.samples, args.refine, post.scale_tril is not None)


def _arrays(cols: dict, post, z) -> dict:
    """The .npz arrays: the columns, mu, sigma (n, d), scale_tril (n, d, d) of a full run, z (n, K, d)."""
    arrays = dict(cols, mu=post.mu, sigma=post.sigma)
    if post.scale_tril is not None:
        arrays["scale_tril"] = post.scale_tril                           # (n, d, d): Sigma = L L^T
    if z is not None:
        arrays["z"] = np.transpose(z, (1, 0, 2))  # (n, K, d)
    return arrays


def _table(cols: dict, post, z) -> dict:
    """The table's columns: the columns, mu_j, sigma_j, the lower triangle of L, z{k}_j."""
    d = post.mu.shape[1]
    table = dict(cols)
    table.update({f"mu_{j}": post.mu[:, j] for j in range(d)})
    table.update({f"sigma_{j}": post.sigma[:, j] for j in range(d)})
    if post.scale_tril is not None:  # the lower triangle, row by row: L[a, b] for b <= a
        table.update({f"scale_tril_{a}_{b}": post.scale_tril[:, a, b] for a in range(d) for b in range(a + 1)})
    for k in range(0 if z is None else z.shape[0]):
        table.update({f"z{k}_{j}": z[k, :, j] for j in range(d)})
    return table


def _encode_streamed(args, vae, src: ShardSet) -> EncodeResult:
    """Encode STREAM_CHUNK rows at a time, each rank its consecutive chunks, into `chunked.RowWriter` parts
    that rank 0 assembles. Chunk c's draws (binarization, z) use the seed (--seed, c), so the output does not
    depend on the number of ranks; mu and sigma of a run that is not binarized equal the in-memory ones."""
    import torch

    from .. import chunked, dist, shards

    info = dist.env_info()
    dist.setup(torch.device("cpu"))
    shards.scan(src, vae.config_.model.likelihood)  # bad rows named by shard file and row, before any output
    out = prepare_output(args.out, force=True)
    writer = chunked.RowWriter(out, info.rank, info.world_size)
    post = None
    for c in chunked.chunk_range(src.n, STREAM_CHUNK, info.rank, info.world_size):
        lo = c * STREAM_CHUNK
        X = src.read(lo, min(src.n, lo + STREAM_CHUNK))
        seed = int(np.random.SeedSequence([args.seed, c]).generate_state(1)[0])
        post = vae.encode(X, seed=seed, refine=args.refine)
        z = _samples(vae, X, post, args, seed) if args.samples else None
        cols = {"index": np.arange(lo, lo + len(X))}
        writer.write(_arrays(cols, post, z) if out.suffix.lower() == ".npz" else _table(cols, post, z))
    writer.finish()
    d = vae.config_.model.latent_dim
    return EncodeResult(out, src.n, d, args.samples, args.refine, vae.config_.model.posterior == "full")


def _samples(vae, X, post, args, seed=None) -> np.ndarray:
    """K reparameterized z per sample, (K, n, d): the encoder's own draws, or mu + sigma * eps (mu + L eps
    for the full family) from the refined posterior with eps seeded by --seed."""
    if not args.refine:
        return vae.sample_latent(X, args.samples, seed=args.seed if seed is None else seed)
    eps = np.random.default_rng(args.seed if seed is None else seed).standard_normal((args.samples, *post.mu.shape)).astype(np.float32)
    if post.scale_tril is not None:
        return post.mu + np.einsum("nab,knb->kna", post.scale_tril, eps)
    return post.mu + post.sigma * eps
