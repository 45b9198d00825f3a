"""`evaluate` on data read in chunks (issue 20 item 2): memory independent of the row count.

The same figures as `vaelens.evaluate.evaluate`, accumulated chunk by chunk in float64 (`shards.Moments`):
means and standard errors of the ELBO terms and of log p(x), the per-dimension KL, and the activity
(the running variance of mu). Per-row values equal the in-memory ones bit for bit:

* log p(x): each row draws from the generator of its global row number (`row_offset`);
* ELBO terms: one seeded generator runs through all chunks, as through all of `elbo_terms`' batches;
* chunks are whole multiples of the in-memory batches (ELBO, encoder, IWAE), so every call sees the same
  rows. Where that multiple would be too large (a batch that shares few factors with the others, e.g. the
  IWAE's 163 rows for k = 50), chunks align with the ELBO's batches (whose draws depend on them) and the
  others they can, and the rest equal the in-memory values to float32 rounding (summation order).

I(x; z) and KL(q(z) || p(z)) need every row's q(z|x) at once; a stream computes them on a seeded subsample
of `aggregate_rows` rows (all rows when n is no larger, then equal to the in-memory figures), and says so.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from . import evaluate as ev
from .model import VAEModule, seeded
from .shards import Moments

STREAM_CHUNK = 8192  # rows per chunk, rounded to whole batches (see `chunk_rows`)
AGGREGATE_ROWS = 10_000  # rows whose q(z|x) are kept for I(x; z) and the aggregate KL
_MAX_CHUNK = 1 << 16  # largest chunk when aligning with every batch size


def chunk_rows(module: VAEModule, n: int, iw_samples: int, elbo_samples: int) -> int:
    """Rows per chunk: about STREAM_CHUNK, a multiple of the ELBO's batch (its draws follow the batches), and
    of the encoder's and the IWAE's batches (they change only float32 rounding) while that stays within
    `_MAX_CHUNK` rows."""
    step = ev.elbo_batch(module, elbo_samples)  # at most 4096
    for b in (4096, ev.iwae_batch(module, n, iw_samples) if iw_samples else 1):
        if math.lcm(step, b) <= _MAX_CHUNK:
            step = math.lcm(step, b)
    return step * max(1, STREAM_CHUNK // step)


def evaluate_stream(module: VAEModule, read: Callable[[int, int, int], np.ndarray], n: int, features: int,
                    iw_samples: int = 5000, *, elbo_samples: int = 10, aggregate_draws: Optional[int] = 2000,
                    aggregate_rows: int = AGGREGATE_ROWS, active_threshold: float = ev.ACTIVE_THRESHOLD,
                    seed: int = 0, progress: bool = False, distributed: bool = False,
                    on_chunk: Optional[Callable[[int, dict], None]] = None) -> dict:
    """The summary of `Evaluation.to_dict()` for n rows that `read(lo, hi, chunk)` gives in the model's units.

    `on_chunk(lo, values)` (optional) receives each chunk's per-row ``elbo``, ``rec``, ``kl`` and
    ``log_likelihood`` (n_chunk,). Under torchrun (`distributed`) every rank reads every chunk and the
    chunk's log p(x) rows are shared between the ranks, as `evaluate` shares them.
    """
    chunk = chunk_rows(module, n, iw_samples, elbo_samples)
    b_iwae = ev.iwae_batch(module, n, iw_samples) if iw_samples else 1
    rng = np.random.default_rng(seed)
    keep = np.arange(n) if n <= aggregate_rows else np.sort(rng.choice(n, aggregate_rows, replace=False))
    full = module.cfg.posterior == "full"
    acc = {k: Moments() for k in ("elbo", "rec", "kl", "kl_dim", "log_likelihood", "mu")}
    kept = {"mu": [], "sigma": [], "L": []}
    bar = tqdm(total=n, desc="evaluate", unit="sample", dynamic_ncols=True) if progress else None
    device = next(module.parameters()).device
    # one generator through every chunk's ELBO draws; IWAE and encoding draw nothing from it
    with seeded(seed, device):
        for c, lo in enumerate(range(0, n, chunk)):
            x = ev.to_tensor(module, read(lo, min(n, lo + chunk), c))                   # (b, p)
            t = ev.elbo_terms(module, x, n_samples=elbo_samples, seed=None)
            vals = {k: t[k] for k in ("elbo", "rec", "kl")}
            if iw_samples:
                vals["log_likelihood"] = ev.iwae_log_likelihood(
                    module, x, iw_samples, batch_size=b_iwae, seed=seed, distributed=distributed, row_offset=lo)
            enc = ev.encode_all(module, x, tril=full)                                   # mu, sigma (b, d)[, L]
            for k, v in dict(vals, kl_dim=t["kl_dim"], mu=enc[0]).items():
                acc[k].add(v.reshape(len(x), -1))
            rows = keep[(keep >= lo) & (keep < lo + len(x))] - lo
            for k, v in zip(("mu", "sigma", "L"), enc):
                kept[k].append(v[rows])
            if on_chunk is not None:
                on_chunk(lo, vals)
            ev._trim_heap()  # each chunk's temporaries back to the system, else the heap fragments (see evaluate)
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    return _summary(module, acc, kept, n, features, iw_samples, aggregate_draws, active_threshold, seed, chunk)


def _summary(module, acc, kept, n, features, iw_samples, aggregate_draws, threshold, seed, chunk) -> dict:
    """`Evaluation.to_dict()`'s keys from the running moments, and the subsample's aggregate figures."""
    se = lambda m: float(math.sqrt(m.m2[0] / (n - 1)) / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    activity = acc["mu"].m2 / n                                                 # (d,): Var_x(mu), as np.var
    L = np.concatenate(kept["L"]) if kept["L"] else None
    mu, sigma = np.concatenate(kept["mu"]), np.concatenate(kept["sigma"])      # (m, d)
    agg = ev.aggregate_posterior_stats(mu, sigma, aggregate_draws, seed, scale_tril=L, prior=ev.prior_of(module))
    ll = acc["log_likelihood"]
    nll = None if not iw_samples else float(-ll.mean[0])
    return {
        "n": n, "features": features, "latent_dim": int(activity.shape[0]),
        "elbo": float(acc["elbo"].mean[0]), "elbo_se": se(acc["elbo"]),
        "rec": float(acc["rec"].mean[0]), "kl": float(acc["kl"].mean[0]),
        "kl_per_dim": [float(v) for v in acc["kl_dim"].mean],
        "iw_samples": iw_samples,
        "log_likelihood": None if not iw_samples else float(ll.mean[0]),
        "log_likelihood_se": None if not iw_samples else se(ll),
        "nll": nll,
        "bits_per_dim": None if nll is None else float(ev.bits_per_dim(nll, features)),
        "active_units": int((activity > threshold).sum()), "active_threshold": threshold,
        "activity": [float(v) for v in activity],
        "mutual_information": agg["mutual_information"], "mutual_information_se": agg["mutual_information_se"],
        "mutual_information_max": math.log(len(mu)),
        "aggregate_kl": agg["aggregate_kl"], "aggregate_kl_se": agg["aggregate_kl_se"],
        "aggregate_draws": agg["draws"],
        "streamed": {"chunk_rows": chunk, "aggregate_rows": int(len(mu))},
    }
