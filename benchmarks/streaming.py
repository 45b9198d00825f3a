"""Streaming benchmark (issue 20): train on a table larger than a memory budget, and compare paths.

1. Generates BIG.npy, a float32 table of --rows x --features (default 4M x 64 = 1 GB) from a linear-Gaussian
   model, written in chunks (the generator never holds it).
2. Peak RSS of `vaelens train --data BIG.npy` (auto: streamed, as the table exceeds 512 MiB), measured with
   /usr/bin/time -v when present, else getrusage(RUSAGE_CHILDREN).ru_maxrss; checked against --budget-gb;
   then of `vaelens encode` of the same table with the trained run (chunked output).
3. Samples/s of the streaming path against the in-memory path on the same data that fits (the first
   --fit-rows rows), same model and batch; the steady epoch (the last one) of each, runs interleaved.
4. A 2-process run (torchrun, gloo) streaming the same fitting file: samples/s over both ranks.
5. A multi-node rehearsal: two torchrun agents (--nnodes=2, one process each, c10d rendezvous on
   127.0.0.1) train one epoch, then resume to two.

    python benchmarks/streaming.py                      # 4M x 64 (1 GB); several minutes on 2 cores
    python benchmarks/streaming.py --rows 1000000 --fit-rows 250000 --budget-gb 0.7   # a quick run

Writes docs/results/streaming-<date>.json (--json) and prints a table. A 20 GB table: --rows 80000000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--likelihood", "gaussian", "--standardize", "--hidden", "64", "--latent-dim", "8",
         "--batch-size", "1024", "--lr", "3e-3", "--no-progress", "--checkpoint-every", "3600"]


def write_table(path: Path, rows: int, features: int, seed: int = 0, chunk: int = 1 << 18) -> None:
    """x = W z + noise, z ~ N(0, I_8), written chunk by chunk after a .npy header."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(8, features)).astype(np.float32)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, features)})
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            z = rng.normal(size=(n, 8)).astype(np.float32)
            f.write((z @ W + 0.3 * rng.normal(size=(n, features)).astype(np.float32)).tobytes())


def env() -> dict:
    # one thread a process unless OMP_NUM_THREADS says otherwise: torchrun gives its workers one, and on a
    # shared machine intra-op threads make single-process figures swing by 3x between runs
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), VAELENS_OFFLINE="1",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def peak_rss_run(cmd: list) -> tuple:
    """(peak RSS in GB, seconds, stdout) of a command; raises on failure."""
    t0 = time.perf_counter()
    if shutil.which("time") and Path("/usr/bin/time").exists():
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env())
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        rss = int(m.group(1)) / 1e6 if m else float("nan")
    else:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        p = subprocess.run(cmd, capture_output=True, text=True, env=env())
        rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr[-3000:]}")
    return rss, time.perf_counter() - t0, p.stdout


def last_epoch(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vaelens(*args) -> list:
    return [sys.executable, "-m", "vaelens", *map(str, args)]


def torchrun(*args, nproc=2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "vaelens", *map(str, args)]


def multinode(work: Path, data: Path, epochs_first: int = 1) -> dict:
    """Two agents, one process each, c10d rendezvous on localhost: train, then resume (both agents again)."""
    run = work / "multinode"

    def agents(*args):
        port, procs = free_port(), []
        for node in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=vaelens-bench",
                   f"--node-rank={node}", "--max-restarts=1", "-m", "vaelens", *map(str, args)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
        outs = [p.communicate(timeout=1800) for p in procs]
        for p, (out, err) in zip(procs, outs):
            if p.returncode != 0:
                raise SystemExit(f"multi-node agent failed:\n{out}\n{err[-3000:]}")
        return outs[0][0] + outs[1][0]

    t0 = time.perf_counter()
    agents("train", "--data", data, "--stream", "on", *MODEL, "--epochs", epochs_first, "--out", run)
    out = agents("train", "--resume", run, "--epochs", epochs_first + 1, "--no-progress")
    summary = json.loads((run / "summary.json").read_text())
    return {"world_size": summary["world_size"], "epochs_run": summary["epochs_run"],
            "resumed": "resumed at epoch" in out, "seconds": round(time.perf_counter() - t0, 1),
            "val_loss": last_epoch(run)["val_loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--fit-rows", type=int, default=500_000, help="rows of the table that fits (throughput)")
    ap.add_argument("--budget-gb", type=float, default=0.7)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the big run")
    ap.add_argument("--work", type=Path, help="folder for the tables and runs (default: a temporary one)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: big, speed, ddp, multinode")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / f"streaming-{time.strftime('%Y-%m-%d')}.json")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    work = a.work or Path(tempfile.mkdtemp(prefix="vaelens-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"host": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "rows": a.rows, "features": a.features, "table_gb": round(4 * a.rows * a.features / 1e9, 3),
           "budget_gb": a.budget_gb, "model": " ".join(MODEL)}
    big, small = work / "big.npy", work / "fits.npy"
    if "big" not in skip:
        write_table(big, a.rows, a.features)
        rss, secs, _ = peak_rss_run(vaelens("train", "--data", big, *MODEL, "--epochs", a.epochs, "--out", work / "big"))
        rec = last_epoch(work / "big")
        res["big"] = {"peak_rss_gb": round(rss, 3), "under_budget": rss < a.budget_gb, "seconds": round(secs, 1),
                      "samples_per_s": round(rec["samples_per_s"]), "val_loss": rec["val_loss"]}
        print(f"big: {res['table_gb']} GB table, peak RSS {rss:.3f} GB (budget {a.budget_gb}), {secs:.0f} s", flush=True)
        rss, secs, _ = peak_rss_run(vaelens("encode", work / "big", "--data", big, "--out", work / "big-post.npz"))
        res["encode"] = {"peak_rss_gb": round(rss, 3), "seconds": round(secs, 1),
                         "output_gb": round((work / "big-post.npz").stat().st_size / 1e9, 3)}
        print(f"encode: peak RSS {rss:.3f} GB, {secs:.0f} s", flush=True)
    write_table(small, a.fit_rows, a.features, seed=1)
    if "speed" not in skip:
        speed = {"stream": [], "memory": []}
        for rep in range(2):  # interleaved, so a change in the machine's load hits both
            for mode, name in (("on", "stream"), ("off", "memory")):
                out = work / f"speed-{name}-{rep}"
                rss, _, _ = peak_rss_run(vaelens("train", "--data", small, "--stream", mode, *MODEL, "--epochs", 2,
                                                 "--out", out))
                speed[name].append((last_epoch(out)["samples_per_s"], rss))
        best = {k: max(v)[0] for k, v in speed.items()}
        res["speed"] = {"rows": a.fit_rows, "stream_samples_per_s": round(best["stream"]),
                        "memory_samples_per_s": round(best["memory"]),
                        "ratio": round(best["stream"] / best["memory"], 3),
                        "stream_peak_rss_gb": round(max(r for _, r in speed["stream"]), 3),
                        "memory_peak_rss_gb": round(max(r for _, r in speed["memory"]), 3),
                        "all": {k: [round(s) for s, _ in v] for k, v in speed.items()}}
        print(f"speed: streaming {best['stream']:.0f}/s, in memory {best['memory']:.0f}/s "
              f"(ratio {res['speed']['ratio']})", flush=True)
    if "ddp" not in skip:
        out = work / "ddp"
        rss, secs, _ = peak_rss_run(torchrun("train", "--data", small, "--stream", "on", *MODEL, "--epochs", 2,
                                             "--out", out))
        res["ddp"] = {"processes": 2, "samples_per_s": round(last_epoch(out)["samples_per_s"]), "seconds": round(secs, 1)}
        print(f"2 processes: {res['ddp']['samples_per_s']}/s", flush=True)
    if "multinode" not in skip:
        res["multinode"] = multinode(work, small)
        print(f"multi-node rehearsal: {res['multinode']}", flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
