"""Two evals into one folder, an eval killed mid-way, an eval into a folder a training run holds:
the results are whole or absent, never one eval's numbers under another's name, and each set
records what model, data and command made it."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import altpo.eval.output as output_module
from altpo.cli import main as cli_main
from altpo.eval.output import EVAL_LOCK, PROVENANCE_NAME
from altpo.train.output_lock import LOCK_NAME, acquire, release
from helpers import REPO_ROOT, TOFU_FIXTURE, save_tiny_tofu_model, tiny_tofu_tokenizer


def _model(folder: Path, seed: int) -> Path:
    tok = tiny_tofu_tokenizer(("forget10_perturbed", "holdout10"), 2, vocab_size=300)
    return save_tiny_tofu_model(tok, folder, seed, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_safety_models")
    return _model(root / "a", seed=1), _model(root / "b", seed=2)


def _argv(model, out, *extra):
    return ["eval", "--model", str(model), "--data", str(TOFU_FIXTURE), "--forget-split", "forget10",
            "--output", str(out), "--metrics", "forget", "--max-rows", "2", "--max-new-tokens", "2",
            "--quiet", *extra]


def _no_model_load(monkeypatch):
    import altpo.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_model_and_tokenizer",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def test_a_second_eval_into_a_locked_folder_is_refused_naming_the_holder(models, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "evals"
    out.mkdir()
    fd = acquire(out, EVAL_LOCK, "eval")  # as a running eval holds it
    try:
        _no_model_load(monkeypatch)
        assert cli_main(_argv(models[0], out)) == 2
        assert f"is in use by another eval (pid {os.getpid()}" in capsys.readouterr().err
        assert not (out / "TOFU_EVAL.json").exists()
    finally:
        release(fd)


def test_an_eval_that_finished_while_this_one_waited_is_not_overwritten(models, tmp_path, capsys,
                                                                        monkeypatch):
    """Both passed the early check; the first wrote its results before the second took the lock."""
    out = tmp_path / "evals"
    assert cli_main(_argv(models[0], tmp_path / "first")) == 0
    first = {n: (tmp_path / "first" / n).read_bytes()
             for n in ("TOFU_EVAL.json", "TOFU_SUMMARY.json", PROVENANCE_NAME)}
    real_lock = output_module.lock_output

    def lock_after_the_other_wrote(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in first.items():
            (folder / name).write_bytes(data)
        return real_lock(folder)

    monkeypatch.setattr(output_module, "lock_output", lock_after_the_other_wrote)
    _no_model_load(monkeypatch)
    assert cli_main(_argv(models[1], out)) == 2
    assert "TOFU_EVAL.json already exists" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in first} == first


def test_results_are_fsynced_under_unique_names_and_record_what_made_them(models, tmp_path,
                                                                          monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "evals"
    assert cli_main(_argv(models[0], out)) == 0
    assert cli_main(_argv(models[0], out, "--overwrite")) == 0
    monkeypatch.undo()
    renames = [e for e in events if e[0] == "replace" and Path(e[2]).parent == out]
    assert sorted({Path(b).name for _, _, b in renames}) == sorted(
        ["TOFU_EVAL.json", "TOFU_SUMMARY.json", PROVENANCE_NAME])
    temporaries = [a for _, a, _ in renames]
    assert len(set(temporaries)) == len(temporaries) == 6  # no two writes share a temporary name
    for at, (_, tmp, final) in ((events.index(e), e) for e in renames):
        assert ("fsync", tmp) in events[:at]  # the file's data, before the rename
        assert ("fsync", str(out)) in events[at:]  # the folder, after it

    record = json.loads((out / PROVENANCE_NAME).read_text())
    for name in ("TOFU_EVAL.json", "TOFU_SUMMARY.json"):
        assert record["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert record["model"] == str(models[0].resolve())
    assert record["data"] == str(TOFU_FIXTURE.resolve())
    assert record["settings"]["forget_split"] == "forget10" and record["settings"]["max_rows"] == 2
    assert record["tool"].startswith("altpo-fast ") and "--overwrite" in record["command"]

    # the weights fingerprint tells two models apart, and is the same for the same weights
    assert cli_main(_argv(models[1], tmp_path / "b")) == 0
    other = json.loads((tmp_path / "b" / PROVENANCE_NAME).read_text())["model_weights_sha256"]
    assert len(record["model_weights_sha256"]) == 64 and other != record["model_weights_sha256"]
    assert cli_main(_argv(models[0], tmp_path / "a2")) == 0
    assert json.loads((tmp_path / "a2" / PROVENANCE_NAME).read_text())["model_weights_sha256"] == \
        record["model_weights_sha256"]


def test_an_eval_killed_between_its_files_is_named_and_redone(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "evals"
    real_write = output_module.write_atomic

    def killed_after_the_first_file(path, text):
        real_write(path, text)
        if path.name == "TOFU_EVAL.json":
            (out / ".TOFU_SUMMARY.json.tmp-0badc0de-99999999").write_text("{")  # what a kill leaves
            raise KeyboardInterrupt

    monkeypatch.setattr(output_module, "write_atomic", killed_after_the_first_file)
    assert cli_main(_argv(models[0], out)) != 0  # the CLI reports the interruption
    monkeypatch.undo()
    assert (out / "TOFU_EVAL.json").exists() and not (out / PROVENANCE_NAME).exists()
    assert cli_main(_argv(models[0], out)) == 2
    assert "is from an eval that did not finish" in capsys.readouterr().err
    assert cli_main(_argv(models[0], out, "--overwrite")) == 0
    assert not list(out.glob(".TOFU_*.tmp-*"))
    assert output_module.provenance_problem(out) is None


def test_sigkill_during_an_eval_then_a_rerun(models, tmp_path):
    out = tmp_path / "evals"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "altpo.cli", *_argv(models[0], out)], env=env,
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # it holds the lock: it is past its checks, mid-eval
            lock = out / EVAL_LOCK
            if lock.exists() and lock.read_text().split()[:1] == [str(child.pid)]:
                break
            assert child.poll() is None, "the eval ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the eval never took its lock")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert not (out / "TOFU_EVAL.json").exists()
    assert cli_main(_argv(models[0], out)) == 0  # the kernel released the lock
    assert output_module.provenance_problem(out) is None


@pytest.mark.parametrize("flag", ["--output", "--model"])
def test_an_eval_into_or_of_a_folder_that_a_training_run_holds_is_refused(models, tmp_path, capsys,
                                                                         monkeypatch, flag):
    run = tmp_path / "run"
    run.mkdir()
    if flag == "--model":
        for p in models[0].iterdir():
            (run / p.name).write_bytes(p.read_bytes())
    fd = acquire(run)  # as a training run holds it
    try:
        _no_model_load(monkeypatch)
        argv = (_argv(models[0], run) if flag == "--output" else _argv(run, tmp_path / "evals"))
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} {run} is in use by a training run (pid {os.getpid()}" in err
        assert not (run / "TOFU_EVAL.json").exists() and not (tmp_path / "evals").exists()
    finally:
        release(fd)


def test_an_eval_output_that_is_a_file_is_refused(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "evals.json"
    out.write_text("keep")
    _no_model_load(monkeypatch)
    assert cli_main(_argv(models[0], out)) == 2
    assert "exists and is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep"


def test_quiet_eval_shows_no_loading_bar(models, tmp_path, capsys):
    assert cli_main(_argv(models[0], tmp_path / "evals")) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err, err
