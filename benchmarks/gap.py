"""`vaelens gap` on 1,000 MNIST test images for the 784-400-400-50 model: the time budget of issue #18.

Target: at most 5 minutes on 2 CPU cores for the whole command (true posterior by importance
sampling with k draws per image, q* by `--steps` Adam steps, the ELBOs on 200 fresh draws), memory
bounded by chunking (`vaelens.evaluate.ROWS_PER_CALL` (z, x) pairs per decoder call). Without
--run it first trains a short model (ELBO, --train-epochs epochs, not timed against the budget):

    python benchmarks/gap.py --data-dir /work/shared/data/mnist                   # train 5 epochs, then time
    python benchmarks/gap.py --data-dir /work/shared/data/mnist --run runs/mnist  # reuse a run

Prints the host, the settings, the wall time and peak RSS of the gap command and its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_nll import machine  # noqa: E402  (the host line every benchmark prints)

from vaelens.cli import main as vaelens  # noqa: E402

BUDGET_S = 300


def train(data_dir: str, out: Path, epochs: int) -> None:
    rc = vaelens(["train", "--data", "mnist", "--data-dir", data_dir, "--hidden", "400,400", "--latent-dim", "50",
                  "--epochs", str(epochs), "--out", str(out), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"training failed with exit status {rc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("VAELENS_DATA_DIR"),
                    help="folder with the MNIST IDX files (default $VAELENS_DATA_DIR)")
    ap.add_argument("--run", type=Path, help="a trained 784-400-400-50 MNIST run (default: train one)")
    ap.add_argument("--train-epochs", type=int, default=5, help="epochs of the short model trained without --run")
    ap.add_argument("--n", type=int, default=1000, help="test images")
    ap.add_argument("--k", type=int, default=1000, help="importance samples per image")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps for q*")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, help="also write the gap command's JSON and the timing here")
    args = ap.parse_args(argv)
    if not args.data_dir:
        ap.error("no MNIST folder: pass --data-dir or set VAELENS_DATA_DIR")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "mnist"
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                train(args.data_dir, run, args.train_epochs)
            print(f"trained {run} ({args.train_epochs} epochs) in {time.perf_counter() - t0:.0f} s")
        out = Path(tmp) / "gap.json"
        cmd = ["gap", str(run), "--data", "mnist", "--data-dir", args.data_dir, "--split", "test",
               "--n", str(args.n), "--k", str(args.k), "--steps", str(args.steps), "--json", str(out)]
        print("$ vaelens " + " ".join(cmd))
        t0, c0 = time.perf_counter(), time.process_time()
        rc = vaelens(cmd)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux -> GiB
        result = json.loads(out.read_text()) if rc == 0 else None
    verdict = "within" if wall <= BUDGET_S else "OVER"
    # On a shared machine the wall time is what the other processes leave; the CPU time is this
    # command's own work, and CPU time / threads is what it would take with the cores to itself.
    print(f"gap on {args.n} images, k = {args.k}, steps = {args.steps}: {wall:.0f} s wall ({verdict} the "
          f"{BUDGET_S} s budget), {cpu:.0f} CPU s ({cpu / args.threads:.0f} s on {args.threads} free cores), "
          f"peak RSS {rss:.2f} GiB (the whole process), exit {rc}; load average {os.getloadavg()[0]:.1f} at the end")
    if args.out is not None and result is not None:
        args.out.write_text(json.dumps({"machine": machine(), "wall_s": wall, "cpu_s": cpu, "peak_rss_gib": rss,
                                        "n": args.n, "k": args.k, "steps": args.steps, "gap": result}, indent=1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
