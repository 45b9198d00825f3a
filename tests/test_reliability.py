"""Reliability: every fault is injected for real and must cost neither work nor a traceback.

Sections follow issue 7: crashes and signals, deterministic resume, integrity, safe loading,
numerical faults, malformed input (hypothesis), failing disk writes. Subprocess tests run the
real CLI with one torch thread each, so an interrupted-and-resumed run can be compared bit for
bit with an uninterrupted one; no test depends on wall-clock time (they wait for files).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vaelens import checkpoint as ck
from vaelens import data as data_mod
from vaelens import train as train_mod
from vaelens.cli import main as cli_main
from vaelens.config import ModelConfig, RunConfig
from vaelens.errors import CheckpointError, DataError, TrainingDiverged
from vaelens.model import VAEModule

# One torch thread: a run's floating-point sums then do not depend on how the OS schedules threads.
ENV = dict(os.environ, VAELENS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# digits, 160 samples (144 for training): 36 steps of 4 per epoch, so a signal nearly always lands mid-epoch
CLI_TRAIN = ["--limit", "160", "--epochs", "4", "--batch-size", "4", "--hidden", "16", "--latent-dim", "2",
             "--seed", "5", "--checkpoint-every", "0", "--no-progress"]
TIMING = ("seconds", "samples_per_s")


def vaelens(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaelens", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kw)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaelens", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> str:
    """Poll until the run has a complete checkpoint; return its name."""
    latest = run / ck.CKPT_DIR / ck.LATEST
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.exists() and latest.read_text().strip():
            return latest.read_text().strip()
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before a checkpoint: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def one_error_line(stderr: str, command: str) -> str:
    """The CLI's contract for user errors: exactly one line, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"vaelens {command}: error: "), stderr
    return lines[0]


def metrics_without_timing(run: Path) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in ck.read_metrics(run)]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical best weights, last checkpoint and loss metrics."""
    for rel in (ck.WEIGHTS, f"{ck.CKPT_DIR}/ckpt-{_epochs(a):06d}-000000/{ck.WEIGHTS}"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{rel}: {k} differs"
    assert metrics_without_timing(a) == metrics_without_timing(b)


def _epochs(run: Path) -> int:
    return ck.load_config(run).train.epochs


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted CLI run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = vaelens("train", *CLI_TRAIN, "--out", run)
    assert r.returncode == 0, r.stderr
    return run


# --- 1. crashes and signals ---------------------------------------------------------------------

def test_sigkill_mid_training_then_resume_finishes_identically(tmp_path, reference_run):
    run = tmp_path / "run"
    proc = start("train", *CLI_TRAIN, "--out", run)
    wait_for_checkpoint(run, proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / ck.SUMMARY).exists()
    r = vaelens("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / ck.SUMMARY).read_text())["epochs_run"] == 4
    assert [m["epoch"] for m in ck.read_metrics(run)] == [1, 2, 3, 4]
    assert_same_run(reference_run, run)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_exits_and_resume_matches(tmp_path, reference_run, sig, code):
    run = tmp_path / "run"
    proc = start("train", *CLI_TRAIN, "--out", run)
    first = wait_for_checkpoint(run, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {sig.name}" in out and "checkpoint saved" in out and f"--resume {run}" in out
    saved = (run / ck.CKPT_DIR / ck.LATEST).read_text().strip()
    # usually a mid-epoch checkpoint written on the signal; the same one when the signal came as it was written
    assert saved >= first
    assert f"stopped by {sig.name} at epoch {int(saved[5:11]) + 1}" in out
    ck.load_checkpoint(run / ck.CKPT_DIR / saved)
    r = vaelens("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert_same_run(reference_run, run)


# --- 2. determinism (in-process, signal at an exact step) ---------------------------------------

STEPS = 7  # 108 training samples in batches of 16


@functools.lru_cache(maxsize=None)
def _small_cfg(likelihood="bernoulli", epochs=2):
    cfg = RunConfig().replace(model={"latent_dim": 2, "hidden": (16,), "likelihood": likelihood},
                              train={"epochs": epochs, "batch_size": 16, "seed": 11, "device": "cpu"},
                              data={"limit": 120})
    return train_mod.prepare(cfg, data_mod.load(cfg.data))


def _fit(run_dir, sigint_at_step=None, resume=False):
    """Train the small model; with `sigint_at_step`, SIGINT this process during that (1-based, global) step."""
    cfg, X, X_val = _small_cfg()
    count = [0]

    def signal_before_update(opt, args, kwargs):
        count[0] += 1
        if count[0] == sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered to the handler fit installed

    # torch's global optimizer hook: runs before every step's parameter update, whatever the loop does around it
    handle = register_optimizer_step_pre_hook(signal_before_update) if sigint_at_step is not None else None
    try:
        return train_mod.fit(cfg, X, X_val, run_dir=run_dir, resume=resume, handle_signals=True,
                             checkpoint_interval_s=3600)
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    return tmp_path_factory.mktemp("small") / "ref", tmp_path_factory.mktemp("small2") / "ref"


def test_two_identical_runs_give_identical_weights(small_reference):
    a, b = small_reference
    for run in (a, b):
        if not (run / ck.SUMMARY).exists():
            assert _fit(run).interrupted is None
    assert_same_run(a, b)


@pytest.mark.parametrize("step, expected", [(3, "ckpt-000000-000003"),            # mid-epoch
                                            (STEPS, "ckpt-000001-000000"),        # last step: epoch boundary
                                            (STEPS + 5, "ckpt-000001-000005")])   # mid-epoch, later epoch
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, small_reference, step, expected):
    ref = small_reference[0]
    if not (ref / ck.SUMMARY).exists():
        _fit(ref)
    run = tmp_path / "run"
    res = _fit(run, sigint_at_step=step)
    assert res.interrupted == "SIGINT"
    # the interval is an hour, so this checkpoint exists only because of the signal
    assert (run / ck.CKPT_DIR / ck.LATEST).read_text().strip() == expected
    assert _fit(run, resume=True).interrupted is None
    assert_same_run(ref, run)


# --- 3. integrity -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory, small_reference):
    ref = small_reference[0]
    if not (ref / ck.SUMMARY).exists():
        _fit(ref)
    return ref


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path):
    b = bytearray(p.read_bytes())
    b[-3] ^= 0xFF
    p.write_bytes(bytes(b))


def _edit_config(**change):
    def edit(p: Path):
        d = json.loads(p.read_text())
        for dotted, v in change.items():
            node, *path = d, *dotted.split(".")
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = v
        p.write_text(json.dumps(d))
    return edit


def _drop_checksums(damage):
    def edit(p: Path):
        (p.parent / ck.CHECKSUMS).unlink()
        damage(p)
    return edit


@pytest.mark.parametrize("name, damage, fragment", [
    (ck.WEIGHTS, _truncate, "do not match the checksum recorded when it was written (truncated or altered)"),
    (ck.WEIGHTS, _flip_byte, "do not match the checksum"),
    (ck.WEIGHTS, _drop_checksums(_truncate), "not a readable safetensors file"),
    (ck.WEIGHTS, Path.unlink, "missing (listed in checksums.json)"),
    (ck.CONFIG, _edit_config(version=99), "version: this vaelens reads config version 1, got 99"),
    (ck.CONFIG, _edit_config(**{"model.latent_dim": "2"}), "model.latent_dim: expected an integer, got '2'"),
    (ck.CONFIG, _edit_config(**{"train.colour": "red"}), "train: unknown key(s) colour"),
    (ck.CONFIG, lambda p: p.write_text('{"version": 1,'), "not valid JSON"),
    (ck.CONFIG, Path.unlink, "missing; is"),
])
def test_damaged_run_gives_one_line_naming_file(tmp_path, capsys, good_run, name, damage, fragment):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage(run / name)
    assert cli_main(["info", str(run)]) == 2
    err = one_error_line(capsys.readouterr().err, "info")
    assert str(run / name) in err and fragment in err


def test_damaged_weights_through_cli_subprocess(tmp_path, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _truncate(run / ck.WEIGHTS)
    r = vaelens("encode", run, "--out", tmp_path / "post.npz")
    assert r.returncode == 2
    assert str(run / ck.WEIGHTS) in one_error_line(r.stderr, "encode")
    assert not (tmp_path / "post.npz").exists()


def test_resume_falls_back_past_damaged_checkpoint(tmp_path, small_reference):
    ref = small_reference[0]
    if not (ref / ck.SUMMARY).exists():
        _fit(ref)
    run = tmp_path / "run"
    ck_root = run / ck.CKPT_DIR
    _fit(run, sigint_at_step=STEPS)                 # ckpt-000001-000000
    _fit(run, sigint_at_step=3, resume=True)        # ckpt-000001-000003, the newest
    assert sorted(p.name for p in ck_root.glob("ckpt-*")) == ["ckpt-000001-000000", "ckpt-000001-000003"]
    _truncate(ck_root / "ckpt-000001-000003" / ck.TRAINER_TENSORS)
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint\(s\): ckpt-000001-000003: .*trainer"):
        assert _fit(run, resume=True).interrupted is None
    assert (ck_root / "damaged-ckpt-000001-000003").is_dir()  # kept for inspection, never loaded again
    assert_same_run(ref, run)


def test_resume_with_no_usable_checkpoint_says_so(tmp_path, capsys, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    for folder in (run / ck.CKPT_DIR).glob("ckpt-*"):
        _retrack(folder, ck.TRAINER_META, b"{}")
    assert cli_main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = one_error_line(capsys.readouterr().err, "train")
    assert "no usable checkpoint to resume from" in err and "not a vaelens trainer state" in err


# --- 4. safe loading ----------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_pickle_payload_is_live(tmp_path):
    """The payload used below does run code when something unpickles it, so the tests can fail."""
    marker = tmp_path / "ran"
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert marker.exists()


def test_pickled_data_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    evil = np.array([_Payload(marker)], dtype=object)
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    np.savez(tmp_path / "evil_x.npz", X=evil)
    np.savez(tmp_path / "evil_y.npz", X=np.zeros((1, 3)), y=evil)
    for name in ("evil.npy", "evil_x.npz", "evil_y.npz"):
        with pytest.raises(DataError, match="pickled .* refuses"):
            data_mod.load_file(tmp_path / name)
    r = vaelens("train", "--data", tmp_path / "evil.npy", "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and "unpickling can run code" in one_error_line(r.stderr, "train")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def _retrack(folder: Path, name: str, payload: bytes):
    """Replace a file and record its new checksum, so only the loader's own format check stands in the way."""
    (folder / name).write_bytes(payload)
    sums = json.loads((folder / ck.CHECKSUMS).read_text())
    sums[name] = ck.sha256(folder / name)
    (folder / ck.CHECKSUMS).write_text(json.dumps(sums))


def test_pickled_weights_and_trainer_state_are_refused(tmp_path, good_run):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _retrack(run, ck.WEIGHTS, pickle.dumps(_Payload(marker)))
    from vaelens.api import VAE

    with pytest.raises(CheckpointError, match="not a readable safetensors file.*never unpickles"):
        VAE.load(run)
    torch_file = tmp_path / "state.pt"
    torch.save({"state": _Payload(marker)}, torch_file)  # what torch.load(weights_only=False) would execute
    for folder in (run / ck.CKPT_DIR).glob("ckpt-*"):
        _retrack(folder, ck.TRAINER_TENSORS, torch_file.read_bytes())
        _retrack(folder, ck.WEIGHTS, pickle.dumps(_Payload(marker)))
    cfg, X, X_val = _small_cfg()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train_mod.fit(cfg, X, X_val, run_dir=run, resume=True)
    assert not marker.exists()


def test_no_unpickling_call_in_the_package():
    """Weights through safetensors, state through JSON: no module may call a loader that unpickles."""
    import re

    for f in Path(data_mod.__file__).parent.rglob("*.py"):
        text = f.read_text()
        for banned in ("pickle.load", "allow_pickle=True", "weights_only=False", "import pickle", "joblib"):
            assert banned not in text, f"{f}: {banned}"
        for call in re.finditer(r"\b(np|numpy)\.load\(|\btorch\.load\(", text):
            args = text[call.end():call.end() + 120]
            assert "allow_pickle=False" in args or "weights_only=True" in args, f"{f}: {call.group(0)}{args}"


# --- 5. numerical faults ------------------------------------------------------------------------

def test_nonfinite_kl_stops_with_epoch_step_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    from vaelens import model as model_mod

    real, calls = model_mod.kl_divergence, [0]

    def kl_blows_up_in_epoch_2(q, p):
        out = real(q, p)
        if not torch.is_grad_enabled():  # validation (under inference_mode): however many batches it takes
            return out
        calls[0] += 1
        return out * float("inf") if calls[0] == STEPS + 3 else out  # epoch 2's third training step

    monkeypatch.setattr(model_mod, "kl_divergence", kl_blows_up_in_epoch_2)
    cfg, X, X_val = _small_cfg()
    with pytest.raises(TrainingDiverged) as e:
        train_mod.fit(cfg, X, X_val, run_dir=tmp_path / "run", checkpoint_interval_s=0)
    msg = str(e.value)
    assert "epoch 2, step 3" in msg and "(KL term)" in msg and "lower learning rate" in msg
    assert "The last good checkpoint" in msg and "ckpt-000001-000000, is kept" in msg
    monkeypatch.undo()
    # the last good checkpoint and the run's weights still load
    ck.load_checkpoint(tmp_path / "run" / ck.CKPT_DIR / "ckpt-000001-000000")
    ck.load_model(tmp_path / "run")


def test_infinite_data_past_validation_names_reconstruction_and_step(tmp_path):
    cfg, X, X_val = _small_cfg(likelihood="gaussian")
    X = X.copy()
    X[40, 5] = np.inf  # prepare() would refuse this; fit() is handed it directly
    g = torch.Generator().manual_seed(train_mod._epoch_seed(cfg.train.seed, 0, 0))
    step = int((torch.randperm(len(X), generator=g) == 40).nonzero()) // cfg.train.batch_size + 1
    # inf also reaches the encoder, so the KL term may be named beside the reconstruction term
    with pytest.raises(TrainingDiverged, match=rf"epoch 1, step {step}: the loss became non-finite "
                                               r"\(reconstruction( and KL)? term\)\. .*No checkpoint had been written yet"):
        train_mod.fit(cfg, X, X_val, run_dir=tmp_path / "run")


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nonfinite_gradient_is_named(monkeypatch, grad_clip):
    # a finite loss whose gradient is NaN: a hook poisons one weight's gradient during backward,
    # on both paths (the plain finiteness check, and clipping)
    cfg, X, X_val = _small_cfg()
    cfg = cfg.replace(train={"grad_clip": grad_clip})
    init = VAEModule.__init__

    def poisoned_init(self, model_cfg):
        init(self, model_cfg)
        self.decoder.first.weight.register_hook(lambda g: torch.full_like(g, float("nan")))

    monkeypatch.setattr(VAEModule, "__init__", poisoned_init)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1: the gradient became non-finite "
                                               r"\(both loss terms were finite\)"):
        train_mod.fit(cfg, X, X_val)


def test_nonfinite_gradient_on_the_last_step_is_named_before_anything_is_saved(monkeypatch, tmp_path):
    # Without --grad-clip the gradient is not checked each step; a NaN gradient in the very last step has
    # no next loss to show in, so the end-of-epoch weight check must name it, and no save may keep it.
    cfg, X, X_val = _small_cfg(epochs=1)
    init, calls = VAEModule.__init__, [0]

    def poison_last_step(g):
        calls[0] += 1
        return torch.full_like(g, float("nan")) if calls[0] == STEPS else g

    def poisoned_init(self, model_cfg):
        init(self, model_cfg)
        self.decoder.first.weight.register_hook(poison_last_step)

    monkeypatch.setattr(VAEModule, "__init__", poisoned_init)
    with pytest.raises(TrainingDiverged, match=rf"epoch 1, step {STEPS}: the gradient became non-finite "
                                               r"\(both loss terms were finite\)\. No checkpoint had been written"):
        train_mod.fit(cfg, X, X_val, run_dir=tmp_path / "run", checkpoint_interval_s=0)
    assert not (tmp_path / "run" / ck.WEIGHTS).exists() and not ck.checkpoint_candidates(tmp_path / "run")


def test_huge_learning_rate_through_cli(tmp_path, capsys, table_data):
    np.save(tmp_path / "t.npy", table_data)
    rc = cli_main(["train", "--data", str(tmp_path / "t.npy"), "--likelihood", "gaussian", "--lr", "1e30",
                   "--epochs", "3", "--hidden", "16", "--latent-dim", "2", "--out", str(tmp_path / "run"),
                   "--checkpoint-every", "0", "--no-progress"])
    assert rc == 2
    err = one_error_line(capsys.readouterr().err, "train")
    assert "training diverged at epoch" in err and "step" in err and "term" in err and "--grad-clip" in err


@pytest.mark.parametrize("prior", ["normal", "mog", "vamp"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_full_covariance_and_mixture_priors_never_give_nan_for_extreme_inputs(prior, likelihood):
    # the full family's off-diagonal entries are capped like sigma, so L L^T stays inside float32; the
    # mixture priors' Monte Carlo KL (one draw) may be negative for a row, but it is never NaN
    torch.manual_seed(0)
    m = VAEModule(ModelConfig(input_dim=12, latent_dim=3, hidden=(16,), likelihood=likelihood,
                              posterior="full", prior=prior)).eval()
    with torch.no_grad():
        m.encoder.tril_head.weight.normal_()  # it starts at zero: give the off-diagonal entries something to cap
    x = torch.randn(64, 12)
    with torch.inference_mode():
        for scale in (1e30, -1e30, 1e-30, 0.0):
            xi = x * scale if likelihood == "gaussian" else (x * scale).clamp(0, 1)
            L = m.encoder(xi).scale_tril
            assert torch.isfinite(L).all() and (L.diagonal(dim1=-2, dim2=-1) > 0).all()
            t = m.terms(xi)
            assert not torch.isnan(t.kl).any() and not torch.isnan(t.elbo).any()
            assert not torch.isnan(t.kl_dim).any()


@pytest.mark.parametrize("likelihood", ["bernoulli", "cbernoulli", "gaussian"])
def test_sigma_kl_and_likelihood_finite_or_signed_for_extreme_inputs(likelihood):
    torch.manual_seed(0)
    m = VAEModule(ModelConfig(input_dim=12, latent_dim=3, hidden=(16,), likelihood=likelihood)).eval()
    x = torch.randn(64, 12)
    with torch.inference_mode():
        for scale in (1e30, -1e30, 1e-30, 0.0):
            qz = m.encoder(x * scale)
            # sigma = min(softplus(.), SIGMA_MAX) + floor: finite and at least the floor however large the input
            assert torch.isfinite(qz.mean).all() and torch.isfinite(qz.stddev).all()
            assert (qz.stddev >= m.encoder.sigma_floor * (1 - 1e-6)).all()
            t = m.terms(x * scale if likelihood == "gaussian" else (x * scale).clamp(0, 1))
            # the true KL for |mu| ~ 1e31 is ~1e62, beyond float32: +inf is the honest answer, NaN never is
            assert not torch.isnan(t.kl).any() and (t.kl >= -1e-5).all()
            assert not torch.isnan(t.elbo).any()
        for z in (1e30, -1e30):
            px = m.decoder(torch.full((8, 3), z))
            target = torch.rand(8, 12)
            lp = px.log_prob(target)
            if likelihood == "gaussian":
                assert not torch.isnan(lp).any()  # (x - 1e31)^2 overflows float32: -inf, not NaN
            else:
                assert torch.isfinite(lp).all()  # logits-based: finite however extreme the logits
        px = m.decoder(torch.full((8, 3), 1e6))
        assert torch.isfinite(px.log_prob(torch.rand(8, 12))).all()


# --- 6. malformed input -------------------------------------------------------------------------

def _check_loader(path: Path):
    """A loader either returns finite float32 (n, p) data or raises one DataError line naming the file."""
    try:
        ds = data_mod.load_file(path)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None
    assert ds.X.dtype == np.float32 and ds.X.ndim == 2 and ds.X.shape[0] >= 1 and ds.X.shape[1] >= 1
    assert np.isfinite(ds.X).all()
    return ds


_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                    st.sampled_from([1e300, -1e300, 3.5e38, 1e-320, 0.0]))
_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
_dtypes = st.sampled_from(["f8", "f4", "f2", "i8", "u1", "?", "c8", "U3", "M8[D]", "V4"])
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(arr=hnp.arrays(np.float64, _shapes, elements=_values), dtype=_dtypes, fmt=st.sampled_from(["npy", "npz"]))
def test_fuzzed_arrays_into_loaders(tmp_path_factory, arr, dtype, fmt):
    d = tmp_path_factory.mktemp("fz")
    with np.errstate(all="ignore"):
        try:
            a = arr.astype(dtype)
        except (ValueError, TypeError, OverflowError):
            a = arr
    path = d / f"x.{fmt}"
    np.save(path, a) if fmt == "npy" else np.savez(path, X=a)
    ds = _check_loader(path)
    if ds is not None:
        assert a.ndim in (2, 3, 4) and a.dtype.kind in "biuf" and np.isfinite(a).all()


_cell = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                  st.sampled_from(["", " ", "nan", "inf", "-Infinity", "1e400", "abc", '"1,2"', "\ufeff1", "0x10"]),
                  st.text(max_size=4))


@FUZZ
@given(rows=st.lists(st.lists(_cell, min_size=0, max_size=4), min_size=0, max_size=5),
       header=st.booleans(), gz=st.booleans())
def test_fuzzed_csv_into_loader(tmp_path_factory, rows, header, gz):
    import gzip

    text = ("a,b,c\n" if header else "") + "".join(",".join(r) + "\n" for r in rows)
    path = tmp_path_factory.mktemp("fz") / ("t.csv.gz" if gz else "t.csv")
    path.write_bytes(gzip.compress(text.encode("utf-8", "surrogatepass")) if gz else
                     text.encode("utf-8", "surrogatepass"))
    _check_loader(path)


@FUZZ
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".npy", ".npz", ".csv", ".csv.gz", ".parquet"]),
       prefix=st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"PK\x03\x04", b"\x1f\x8b", b"PAR1"]))
def test_random_bytes_into_loaders(tmp_path_factory, blob, suffix, prefix):
    path = tmp_path_factory.mktemp("fz") / f"f{suffix}"
    path.write_bytes(prefix + blob)
    _check_loader(path)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 -> float32, then refused
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arr=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 4)),
                      elements=st.floats(allow_nan=True, allow_infinity=True)),
       kind=st.sampled_from(["parquet", "array"]))
def test_fuzzed_tables_and_arrays_through_validation(tmp_path_factory, arr, kind):
    """Parquet files and in-memory arrays (the estimator's path) get the same finite-or-DataError contract."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaelens.api import VAE

    if kind == "parquet":
        path = tmp_path_factory.mktemp("fz") / "t.parquet"
        pq.write_table(pa.table({f"c{j}": arr[:, j] for j in range(arr.shape[1])}), path)
        _check_loader(path)
        return
    vae = VAE(latent_dim=2, hidden=(4,), likelihood="gaussian")
    try:
        vae.fit(arr, epochs=1)
    except DataError as e:
        assert "\n" not in str(e)
        with np.errstate(over="ignore"):
            assert not np.isfinite(arr.astype(np.float32)).all(), str(e)
    except TrainingDiverged as e:  # finite but huge unstandardized values: named, not a crash
        assert "\n" not in str(e) and "diverged at epoch 1" in str(e)
        assert np.abs(arr).max() > 1e3


def _bad_file(tmp: Path, kind: str) -> Path:
    cases = {
        "ragged.csv": "a,b\n1,2\n3\n",
        "nan.csv": "1,2\nnan,4\n",
        "empty.csv": "",
        "text.csv": "x,y\n1,hello\n",
    }
    path = tmp / kind
    if kind in cases:
        path.write_text(cases[kind])
    elif kind == "inf.npy":
        np.save(path, np.array([[1.0, np.inf]]))
    elif kind == "huge.npy":
        np.save(path, np.array([[1.0, 1e300]]))
    elif kind == "1d.npy":
        np.save(path, np.arange(5.0))
    elif kind == "strings.npy":
        np.save(path, np.array([["a", "b"]]))
    elif kind == "truncated.npy":
        np.save(path, np.zeros((50, 4)))
        path.write_bytes(path.read_bytes()[:100])
    return path


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ragged.csv", "nan.csv", "empty.csv", "text.csv", "inf.npy", "huge.npy", "1d.npy",
                             "strings.npy", "truncated.npy"]))
def test_malformed_files_through_cli(tmp_path_factory, kind):
    tmp = tmp_path_factory.mktemp("cli")
    path = _bad_file(tmp, kind)
    r = vaelens("train", "--data", path, "--epochs", "1", "--out", tmp / "run")
    assert r.returncode == 2
    assert str(path) in one_error_line(r.stderr, "train")
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("kind", ["ragged.csv", "nan.csv", "empty.csv", "text.csv", "inf.npy", "huge.npy", "1d.npy",
                                  "strings.npy", "truncated.npy"])
def test_malformed_files_in_process_messages(tmp_path, capsys, kind):
    path = _bad_file(tmp_path, kind)
    assert cli_main(["train", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys.readouterr().err, "train")
    assert str(path) in err
    if kind == "huge.npy":
        assert "too large for float32" in err


def test_existing_outputs_are_never_overwritten_without_force(tmp_path, good_run, capsys):
    out = tmp_path / "mine.npz"
    out.write_bytes(b"precious")
    r = vaelens("encode", good_run, "--out", out)
    assert r.returncode == 2 and "--force" in one_error_line(r.stderr, "encode")
    assert out.read_bytes() == b"precious"
    assert cli_main(["sample", str(good_run), "-n", "4", "--out", str(out.with_suffix(".npy"))]) == 0
    assert cli_main(["sample", str(good_run), "-n", "4", "--out", str(out.with_suffix(".npy"))]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err, "sample")
    assert cli_main(["encode", str(good_run), "--out", str(out), "--force"]) == 0
    assert np.load(out)["mu"].shape[1] == 2


def test_existing_run_directory_is_refused_unless_force(tmp_path, capsys, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    small = ["--limit", "60", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress"]
    assert cli_main(["train", *small, "--out", str(run)]) == 2
    assert "--resume" in one_error_line(capsys.readouterr().err, "train")
    # --force with data that fails to load must not cost the old run
    bad = _bad_file(tmp_path, "nan.csv")
    assert cli_main(["train", "--data", str(bad), *small, "--out", str(run), "--force"]) == 2
    capsys.readouterr()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a folder of the user's is not deleted even with --force, and a file is not a run directory
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli_main(["train", *small, "--out", str(mine), "--force"]) == 2
    assert "not a vaelens run directory" in one_error_line(capsys.readouterr().err, "train")
    assert (mine / "notes.txt").read_text() == "keep"
    assert cli_main(["train", *small, "--out", str(mine / "notes.txt"), "--force"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "train")
    assert cli_main(["train", *small, "--out", str(run), "--force"]) == 0  # replaced when asked to
    assert ck.load_config(run).train.epochs == 1


# --- 7. disk failures ---------------------------------------------------------------------------

def test_failed_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch, small_reference):
    ref = small_reference[0]
    if not (ref / ck.SUMMARY).exists():
        _fit(ref)
    run = tmp_path / "run"
    real_replace, state = os.replace, {"fail": False}

    def replace(src, dst):
        if state["fail"] and "ckpt-000002" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cfg, X, X_val = _small_cfg()
    with pytest.raises(CheckpointError) as e:
        train_mod.fit(cfg, X, X_val, run_dir=run, checkpoint_interval_s=0,
                      on_epoch=lambda rec: state.update(fail=rec["epoch"] >= 1))
    msg = str(e.value)
    assert "could not write (No space left on device)" in msg and "ckpt-000002-000000" in msg
    assert "the last complete checkpoint is" in msg and "ckpt-000001-000000" in msg
    ck_root = run / ck.CKPT_DIR
    assert ck_root.joinpath(ck.LATEST).read_text().strip() == "ckpt-000001-000000"
    assert sorted(p.name for p in ck_root.iterdir()) == [ck.LATEST, "ckpt-000001-000000"]  # half-written one gone
    assert not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    ck.load_checkpoint(ck_root / "ckpt-000001-000000")
    assert _fit(run, resume=True).interrupted is None  # once there is space again, nothing was lost
    assert_same_run(ref, run)


def test_file_size_limit_during_training_via_cli(tmp_path, good_run):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse to grow files past 6 kB (EFBIG)."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = sorted(p.name for p in (run / ck.CKPT_DIR).iterdir())
    latest = (run / ck.CKPT_DIR / ck.LATEST).read_text().strip()
    weights = (run / ck.WEIGHTS).read_bytes()
    assert len(weights) > 6000  # so the limit bites on the first weights file
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # noqa: E731
    r = vaelens("train", "--resume", run, "--epochs", "4", "--checkpoint-every", "0", "--no-progress",
                preexec_fn=limit)
    assert r.returncode == 2
    err = one_error_line(r.stderr, "train")
    assert "could not write (File too large)" in err and "the last complete checkpoint is" in err
    assert sorted(p.name for p in (run / ck.CKPT_DIR).iterdir()) == before
    assert (run / ck.CKPT_DIR / ck.LATEST).read_text().strip() == latest
    assert (run / ck.WEIGHTS).read_bytes() == weights
    ck.load_checkpoint(run / ck.CKPT_DIR / latest)
    assert cli_main(["info", str(run)]) == 0
