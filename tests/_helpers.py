"""Helpers shared by several test modules: a small training config on digits, and torchrun."""

import contextlib
import io
import os
import socket
import subprocess
import sys

import numpy as np

from vaelens import data, train
from vaelens.config import ModelConfig, RunConfig, TrainConfig


def small_cfg(**train_kw):
    t = dict(epochs=3, batch_size=64, seed=1)
    t.update(train_kw)
    return RunConfig(model=ModelConfig(latent_dim=3, hidden=(32,)), train=TrainConfig(**t))


def prepared(cfg, n=400):
    ds = data.load_digits()
    ds = ds.subset(np.arange(n))
    return train.prepare(cfg, ds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args, nproc=2, script=None, **env):
    """(argv, environment) of `torchrun --nproc_per_node=nproc -m vaelens ARGS` (or of `torchrun SCRIPT ARGS`),
    one thread per process, with `env` added to the environment."""
    target = [str(script)] if script is not None else ["-m", "vaelens"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *target, *map(str, args)]
    return cmd, dict(os.environ, VAELENS_OFFLINE="1", OMP_NUM_THREADS="1", **env)


def torchrun(*args, nproc=2):
    """`torchrun --nproc_per_node=nproc -m vaelens ARGS`, one thread per process; asserts it succeeded."""
    cmd, env = torchrun_cmd(*args, nproc=nproc)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def cli(*args, cwd=None, check_rc=None, in_process=True) -> subprocess.CompletedProcess:
    """`vaelens ARGS` with its exit status, stdout and stderr.

    In-process by default (`vaelens.cli.main` with the standard streams captured): a fresh Python
    with torch, scikit-learn and matplotlib costs 2-4 s of imports per call, which dozens of CLI
    tests would pay again and again. `in_process=False` runs `python -m vaelens` for the tests whose
    subject is the process itself (the entry point, signals, exit status seen by a shell).
    """
    args = [str(a) for a in args]
    if not in_process:
        p = subprocess.run([sys.executable, "-m", "vaelens", *args], capture_output=True, text=True, cwd=cwd,
                           env=dict(os.environ, VAELENS_OFFLINE="1"), timeout=300)
    else:
        from vaelens.cli import main

        out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
        try:
            if cwd is not None:
                os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(args)
                except SystemExit as e:  # argparse's usage errors and --help
                    rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            os.chdir(here)
        p = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p
