"""An output folder survives what a hostile user does to it: two runs at once, kills during saves
(stale temporaries), torn checkpoints and metrics lines, a full disk, a read-only folder, and
updates that make the weights or the gradient non-finite."""

import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import altpo.train.checkpoint as checkpoint_module
from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
from altpo.train.report import NonFiniteLossError
from helpers import base_settings


def _config(tofu_dir, model_dir, out, **overrides):
    return TrainConfig(**base_settings(tofu_dir, model_dir, out, **overrides))


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the check under test must come before it."""
    import altpo.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loop, "load_causal_lm", refuse)


# ------------------------------------------------------------------------------------------------
# locking


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_holder(tofu_dir, model_dir, tmp_path,
                                                                      monkeypatch):
    from altpo.train.output_lock import LOCK_NAME, acquire, release

    out = tmp_path / "run"
    out.mkdir()
    fd = acquire(out)  # as a running training process holds it
    try:
        assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        _no_model_load(monkeypatch)
        with pytest.raises(UserError, match=f"in use by another training run \\(pid {os.getpid()}"):
            train(_config(tofu_dir, model_dir, out))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        release(fd)


def test_the_lock_is_held_while_the_run_runs_and_released_when_it_ends(tofu_dir, model_dir, tmp_path):
    from altpo.train.output_lock import acquire, release

    out = tmp_path / "run"
    during = []

    def try_to_lock(record):
        try:
            release(acquire(out))
            during.append("free")
        except UserError as err:
            during.append(str(err))

    assert train(_config(tofu_dir, model_dir, out, max_steps=2), on_step=try_to_lock).completed
    assert len(during) == 2
    assert all(f"in use by another training run (pid {os.getpid()}" in d for d in during), during
    release(acquire(out))  # free again: the run let it go


# ------------------------------------------------------------------------------------------------
# durable checkpoints, fallback, stale temporaries, torn metrics


def test_checkpoint_files_and_folders_are_fsynced_around_the_rename(tofu_dir, model_dir, tmp_path,
                                                                   monkeypatch):
    """Watches the system calls themselves (``os.fsync`` on a descriptor, named through /proc), so
    a writer that skips them fails however it is written."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    out = tmp_path / "run"
    train(_config(tofu_dir, model_dir, out, max_steps=2, save_every=1))
    monkeypatch.undo()
    final = str(out / "checkpoints" / "step-00000001")
    at = events.index(("rename", final))
    before, after = [p for k, p in events[:at] if k == "fsync"], [p for k, p in events[at:] if k == "fsync"]
    tmp = [p for p in before if ".tmp-step-00000001" in p]
    assert any(p.endswith("model.safetensors") for p in tmp)
    assert any(p.endswith("trainer_state.safetensors") for p in tmp)
    assert any(p.endswith("manifest.json") for p in tmp)
    assert any(p.endswith(".tmp-step-00000001-" + str(os.getpid())) for p in tmp)  # the folder
    assert after[0] == str(out / "checkpoints")  # the parent, right after the rename


def test_a_torn_checkpoint_is_skipped_for_the_previous_one(tofu_dir, model_dir, tmp_path, capsys):
    settings = dict(max_steps=4, save_every=1, keep_checkpoints=0)
    whole = train(_config(tofu_dir, model_dir, tmp_path / "whole", **settings))
    out = tmp_path / "torn"
    config = _config(tofu_dir, model_dir, out, quiet=False, **settings)

    def stop_in_step_3(record):  # SIGTERM during step 3's report: the run stops after step 3
        if record["step"] == 2:
            os.kill(os.getpid(), 15)

    first = train(config, on_step=stop_in_step_3)
    assert first.checkpoint.name == "step-00000003"
    state = first.checkpoint / "trainer_state.safetensors"
    with open(state, "r+b") as f:  # a kill or power loss that tore the newest checkpoint
        f.truncate(state.stat().st_size // 2)
    with open(out / "metrics.jsonl", "a") as f:  # and the last metrics line
        f.write('{"step": 4, "lo')
    capsys.readouterr()
    rest = train(TrainConfig(**{**config.to_dict(), "resume": True}))
    err = capsys.readouterr().err
    assert "step-00000003 fails its check" in err and "trainer_state.safetensors" in err
    assert "resuming from" in err and "step-00000002" in err
    assert rest.completed
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert whole.completed


def test_stale_temporaries_are_removed_at_start(tofu_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(_config(tofu_dir, model_dir, out, max_steps=2, save_every=1))
    stale = [out / "checkpoints" / ".tmp-step-00000009-99999", out / ".tmp-final-99999"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / ".reference_logprobs.safetensors.tmp-99999999").write_bytes(b"x")
    train(_config(tofu_dir, model_dir, out, max_steps=2, overwrite=True, quiet=False))
    assert "removed 3 unfinished save(s)" in capsys.readouterr().err
    assert not any(p.exists() for p in stale)
    assert not list(out.glob(".*.tmp-*"))


def test_a_full_disk_during_a_save_names_the_cause(tofu_dir, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = checkpoint_module.save_file
    calls = []

    def full_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", full_on_second)
    with pytest.raises(UserError, match="no space left on the disk while writing checkpoint step-00000002"):
        train(_config(tofu_dir, model_dir, out, max_steps=3, save_every=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]


# ------------------------------------------------------------------------------------------------
# early checks on the output folder


_READ_ONLY_CHILD = """
import json, os, sys, time
from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
import altpo.train.loop as loop

def refuse(*a, **k):
    raise AssertionError("the model was loaded before the check")

loop.load_causal_lm = refuse
assert not os.access(sys.argv[2], os.W_OK)  # the case under test: this process may not write
started = time.perf_counter()
try:
    train(TrainConfig(**json.loads(sys.argv[1])))
except UserError as err:
    print(json.dumps({"error": str(err), "seconds": time.perf_counter() - started}))
else:
    print(json.dumps({"error": None}))
"""


def _drop_file_capabilities():
    """In the child, before exec: remove from the bounding set the capabilities that let root write
    where the mode bits say no (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so that exec
    does not grant them back. The child stays root: it can still run the interpreter it needs."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_a_read_only_output_is_refused_before_the_model_loads(tofu_dir, model_dir, tmp_path):
    """chmod binds only a process without CAP_DAC_OVERRIDE: as root (CI) the run is a child process
    that drops that capability (and its relatives) first."""
    import subprocess
    import sys

    as_root = os.geteuid() == 0
    base = tmp_path
    out = base / "ro"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        settings = base_settings(tofu_dir, model_dir, out)
        result = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_CHILD, json.dumps(settings), str(out)],
            capture_output=True, text=True, timeout=120, cwd=str(base),
            env={**os.environ, "HOME": str(base), "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            preexec_fn=_drop_file_capabilities if as_root else None)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["error"] is not None and re.match(r"--output .* is not writable", report["error"])
        assert report["seconds"] < 2
        assert list(out.iterdir()) == []
    finally:
        out.chmod(stat.S_IRWXU)


def test_too_little_disk_space_is_refused_before_the_model_loads(tofu_dir, model_dir, tmp_path,
                                                                 monkeypatch):
    import altpo.train.preflight as preflight_module

    n = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    checkpoint, final = preflight_module.space_needed(n, 4, "fp32")
    assert checkpoint == n * 12 and final == n * 4  # fp32 weights + two fp32 Adam moments
    free = checkpoint + final - 1
    monkeypatch.setattr(preflight_module.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10 * free, 9 * free, free))
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=r"one checkpoint .* plus the final model .* need"):
        train(_config(tofu_dir, model_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# non-finite numbers


def test_non_finite_weights_are_never_saved(tofu_dir, model_dir, tmp_path, monkeypatch):
    """A finite loss and gradient, then an update that overflows the weights: no checkpoint."""
    import altpo.train.master_weights as mw

    real_step = mw.MixedPrecisionAdamW.step
    calls = []

    def step(self, lr, max_grad_norm):
        norm = real_step(self, lr, max_grad_norm)
        calls.append(norm)
        if len(calls) == 2:
            with torch.no_grad():
                self.params[0].view(-1)[0] = float("inf")  # the update overflowed
        return norm

    monkeypatch.setattr(mw.MixedPrecisionAdamW, "step", step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(_config(tofu_dir, model_dir, out, max_steps=4, save_every=1))
    message = str(err.value)
    assert "weights became non-finite after step 2" in message
    assert "last finite checkpoint is" in message and "step-00000001" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    saved = load_file(str(out / "checkpoints" / "step-00000001" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_a_non_finite_gradient_norm_is_named_as_such(tofu_dir, model_dir, tmp_path, monkeypatch):
    import altpo.train.master_weights as mw

    monkeypatch.setattr(mw, "global_grad_norm", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError) as err:
        train(_config(tofu_dir, model_dir, tmp_path / "run"))
    message = str(err.value)
    assert message.startswith("the gradient norm became non-finite at step 1")
    assert "the loss" in message and "was finite" in message
    assert "loss became non-finite" not in message


@pytest.mark.parametrize("flag, value, message", [
    ("lr", float("inf"), "must be a finite number, got inf"),
    ("epochs", float("inf"), "must be a finite number, got inf"),
    ("beta", float("nan"), "must be a finite number, got nan"),  # not "must be positive"
    ("warmup_epochs", float("inf"), "must be a finite number, got inf"),
    ("alpha", float("inf"), "must be a finite number, got inf"),
    ("alpha", -1.0, "must not be negative, got -1.0")])
def test_non_finite_or_negative_settings_are_refused(tofu_dir, model_dir, tmp_path, flag, value,
                                                     message):
    """Each case names the check that must fire: the whole message, not a prefix any check has."""
    with pytest.raises(UserError) as err:
        train(_config(tofu_dir, model_dir, tmp_path / "run", **{flag: value}))
    assert str(err.value) == f"--{flag.replace('_', '-')} {message}"
    assert not (tmp_path / "run").exists()


def test_a_cut_that_leaves_no_answer_tokens_is_refused(tofu_dir, model_dir, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=r"--max-length 1 leaves no answer tokens in 4 of 4 forget, "
                                        r"20 of 20 alternates, 24 of 24 retain sequences"):
        train(_config(tofu_dir, model_dir, tmp_path / "run", max_length=1))


# ------------------------------------------------------------------------------------------------
# the metrics history on --resume


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_cut_metrics_file_is_restored_from_the_checkpoint_on_resume(tofu_dir, model_dir, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    assert train(_config(tofu_dir, model_dir, out, max_steps=6, save_every=3)).completed
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert _steps(metrics) == [1, 2, 3, 4, 5, 6]
    metrics.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # cut inside step 2
    capsys.readouterr()
    assert train(_config(tofu_dir, model_dir, out, max_steps=6, save_every=3, resume=True,
                         quiet=False)).completed
    said = capsys.readouterr()
    said = said.out + said.err
    assert "lacks the records of steps 2-3 (cut or damaged); restoring them from step-00000003" in said
    assert _steps(metrics) == [1, 2, 3, 4, 5, 6]
    assert metrics.read_text().splitlines()[:3] == lines[:3]  # the first run's records, unchanged


def test_a_cut_metrics_file_without_a_copy_is_refused_with_the_ways_on(tofu_dir, model_dir, tmp_path,
                                                                       capsys, monkeypatch):
    out = tmp_path / "run"
    assert train(_config(tofu_dir, model_dir, out, max_steps=6, save_every=3)).completed
    ckpt = out / "checkpoints" / "step-00000003"
    (ckpt / "metrics.jsonl").unlink()  # a checkpoint from before checkpoints kept the history
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["metrics.jsonl"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:10])
    resume = _config(tofu_dir, model_dir, out, max_steps=6, save_every=3, resume=True, quiet=False)
    with pytest.raises(UserError, match=r"metrics.jsonl lacks the records of steps 2-3 up to the "
                                        r"checkpoint at step 3 .*no copy.*move it aside.*--overwrite"):
        train(resume)
    assert metrics.read_text() == lines[0] + "\n" + lines[1][:10]  # left as it was
    metrics.rename(out / "metrics.cut.jsonl")
    capsys.readouterr()
    assert train(resume).completed
    said = capsys.readouterr()
    assert "the history starts at step 4" in said.out + said.err
    assert _steps(metrics) == [4, 5, 6]


def test_records_after_the_checkpoint_are_dropped_with_a_message(tofu_dir, model_dir, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    assert train(_config(tofu_dir, model_dir, out, max_steps=5, save_every=2)).completed
    capsys.readouterr()
    assert train(_config(tofu_dir, model_dir, out, max_steps=5, save_every=2, resume=True,
                         quiet=False)).completed
    said = capsys.readouterr()
    assert ("1 record(s) of metrics.jsonl after step 4 (steps 5) are dropped: those steps are "
            "trained again") in said.out + said.err
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5]
