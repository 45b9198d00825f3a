"""Issue 20 item 3: a worker killed under `torchrun --max-restarts=1` makes torchrun restart the group, and
vaelens continues the run from its newest complete checkpoint by itself (TORCHELASTIC_RESTART_COUNT > 0, no
flag added), ending with the uninterrupted run's weights bit for bit (two gloo ranks on CPU)."""

import json
import subprocess

import torch
from _helpers import torchrun_cmd

# A test hook, not part of vaelens: SIGKILL rank 1 from inside its optimizer step KILL_AT_STEP, on the first
# attempt only (torchrun numbers the attempts in TORCHELASTIC_RESTART_COUNT), so the kill lands at the same
# step every time, mid-epoch, where no checkpoint is written.
_KILL_AT_STEP = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
from vaelens.cli import main

count = [0]


def hook(opt, args, kwargs):
    count[0] += 1
    if (count[0] == int(os.environ["KILL_AT_STEP"]) and os.environ["RANK"] == "1"
            and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
        os.kill(os.getpid(), signal.SIGKILL)


register_optimizer_step_pre_hook(hook)
sys.exit(main(sys.argv[1:]))
"""

ARGS = ["train", "--epochs", "2", "--hidden", "32", "--latent-dim", "3", "--batch-size", "64", "--limit", "400",
        "--no-progress", "--checkpoint-every", "0"]


def test_killed_rank_is_restarted_and_the_run_ends_with_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "kill_at_step.py"
    script.write_text(_KILL_AT_STEP)
    run = tmp_path / "cut"
    # 360 training rows, 180 a rank, 32 a local batch: 6 steps an epoch; step 9 is the middle of epoch 2,
    # whose start (the end of epoch 1) is the newest checkpoint
    cmd, env = torchrun_cmd(*ARGS, "--out", run, script=script, KILL_AT_STEP="9")
    cmd[3:3] = ["--max-restarts=1", "--monitor-interval=0.1"]
    # (dist.setup keeps each attempt's rendezvous keys apart: without that this failed 3 runs in 4 here with
    # "Gloo connectFullMesh failed ... Connection refused", a restarted rank reading a killed one's address)
    ref_cmd, ref_env = torchrun_cmd(*ARGS, "--out", tmp_path / "ref")
    # both at once: much of each is waiting (imports, rendezvous, the restart), which overlaps
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
             for c, e in ((ref_cmd, ref_env), (cmd, env))]
    (ref_out, ref_err), (out, err) = (q.communicate(timeout=300) for q in procs)
    assert procs[0].returncode == 0, ref_out + ref_err
    p = subprocess.CompletedProcess(cmd, procs[1].returncode, out, err)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed at epoch 1 after torchrun restart 1" in p.stdout, p.stdout + p.stderr
    resumes = json.loads((run / "resumes.json").read_text())
    assert [(r["from_epoch"], r["from_step"], r["elastic_restart"]) for r in resumes] == [(1, 0, 1)]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the epoch cut short were written once, by the attempt that finished it
    keys = ("epoch", "train_loss", "val_loss")
    ref, cut = ([[json.loads(line)[k] for k in keys] for line in (d / "metrics.jsonl").read_text().splitlines()]
                for d in (tmp_path / "ref", run))
    assert ref == cut and len(ref) == 2


def test_restart_detection_continues_starts_again_or_refuses(tmp_path, monkeypatch):
    # What a restarted worker decides, in one process: torchrun's restart count in the environment, the same
    # command line as the first attempt
    import shutil

    from _helpers import cli

    from vaelens import checkpoint as ck

    tiny = ["train", "--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--limit", "200", "--no-progress",
            "--checkpoint-every", "0"]
    run = tmp_path / "run"
    cli(*tiny, "--out", run, check_rc=0)
    before = (run / ck.WEIGHTS).read_bytes()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # a checkpoint: continue from it (here the last one, so nothing is left to train), no refusal of --out
    p = cli(*tiny, "--out", run, check_rc=0)
    assert "resumed at epoch 2 after torchrun restart 1" in p.stdout
    assert (run / ck.WEIGHTS).read_bytes() == before
    # no checkpoint yet (the first attempt died before its first one): start the run again
    shutil.rmtree(run / ck.CKPT_DIR)
    (run / ck.SUMMARY).unlink()
    (run / ck.WEIGHTS).unlink()
    p = cli(*tiny, "--out", run, check_rc=0)
    assert "resumed" not in p.stdout and "epochs 2" in p.stdout
    # files vaelens did not write, or no --out to find the run by: refused in one line
    shutil.rmtree(run / ck.CKPT_DIR)
    (run / "notes.txt").write_text("mine")
    p = cli(*tiny, "--out", run, check_rc=2)
    assert "holds no checkpoint and files vaelens did not write" in p.stderr
    p = cli(*tiny, check_rc=2)
    assert "a restarted run needs the run directory named with --out" in p.stderr
