"""Mistakes a new user makes, each caught in under 2 seconds with a message that says what to do,
before any model loads; and what the commands print into a log file or a closed pipe."""

import fractions
import io
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import altpo.train.loop
from altpo.cli import main
from helpers import ALTERNATES, REPO_ROOT, base_settings

RETAIN90_LOGS = "eval_logs/tofu_Llama-3.2-1B-Instruct_retain90"


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(altpo.train.loop, "load_causal_lm", refuse)


def _argv(settings: dict) -> list[str]:
    argv = ["train"]
    for key, value in settings.items():
        if value is True:
            argv.append("--" + key.replace("_", "-"))
        elif value is not False and value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def _fails_fast(capsys, argv, *expected, limit=2.0):
    started = time.perf_counter()
    code = main(argv)
    took = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert took < limit, f"{took:.2f} s: {err}"
    return err


# ------------------------------------------------------------------------------------------------
# train: found before the model loads, each in under 2 s


def test_a_mistyped_model_folder_is_not_found_at_once(tofu_dir, model_dir, tmp_path, capsys,
                                                      no_model_load, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", model=model_dir.name[:-1] + "x")
    _fails_fast(capsys, _argv(settings), "folder not found", "not a hub id of the form owner/name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["data", "model"])
def test_the_hub_unreachable_fails_fast(tofu_dir, model_dir, tmp_path, capsys, no_model_load,
                                        monkeypatch, what):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "empty-home"))
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out")
    if what == "data":
        settings.pop("data")  # the default: the hub dataset locuslab/TOFU
        expected = ("hub cannot be reached", "--data locuslab/TOFU", "not in the local cache")
    else:
        settings["model"] = "someone/no-such-model"
        expected = ("hub cannot be reached", "--model someone/no-such-model")
    _fails_fast(capsys, _argv(settings), *expected)


def test_a_backend_the_device_cannot_run_is_refused_before_loading(tofu_dir, model_dir, tmp_path,
                                                                   capsys, no_model_load, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", loss_backend="triton")
    _fails_fast(capsys, _argv(settings), "--loss-backend triton cannot run on cpu")
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", attention="flash")
    _fails_fast(capsys, _argv(settings), "--attention flash is not available on cpu", "available: ")


def test_a_retain_split_that_holds_the_forget_questions_is_refused(tofu_dir, model_dir, tmp_path,
                                                                    capsys, no_model_load):
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", retain_split="full")
    _fails_fast(capsys, _argv(settings), "--retain-split full holds 40 of the 40 questions of "
                "--forget-split forget01", "--retain-split retain99", limit=4.0 if os.cpu_count() < 4 else 2.0)


def test_duplicate_forget_rows_are_blamed_on_the_split(tofu_dir, model_dir, tmp_path, capsys,
                                                       no_model_load):
    data = tmp_path / "data"
    data.mkdir()
    lines = (tofu_dir / "forget01.json").read_text().splitlines()
    (data / "forget01.json").write_text("\n".join(lines[:3] + [lines[1]] + lines[3:]) + "\n")
    shutil.copy(tofu_dir / "retain99.json", data / "retain99.json")
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", data=str(data))
    err = _fails_fast(capsys, _argv(settings), "the forget split repeats a row", "rows 2, 4",
                      "the alternates file is not the problem")
    assert "no alternate for" not in err


def test_non_utf8_files_are_named_with_their_line(tofu_dir, model_dir, tmp_path, capsys, no_model_load):
    lines = (tofu_dir / ALTERNATES).read_bytes().splitlines(keepends=True)
    bad = tmp_path / "alternates.jsonl"
    bad.write_bytes(b"".join(lines[:2] + [lines[2].replace(b"a", b"\xe9", 1)] + lines[3:]))
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", alternates=str(bad))
    _fails_fast(capsys, _argv(settings), f"alternates file {bad}, line 3, is not UTF-8", "save the file as UTF-8")

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tofu_dir / "forget01.json", data / "forget01.json")
    retain = (tofu_dir / "retain99.json").read_bytes().splitlines(keepends=True)
    (data / "retain99.json").write_bytes(b"".join(retain[:6] + [b"\xff\xfe" + retain[6]] + retain[7:]))
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", data=str(data))
    _fails_fast(capsys, _argv(settings), "retain99 split", "line 7, is not UTF-8")


@pytest.mark.parametrize("flag, value, expected", [
    ("epochs", "inf", "--epochs must be a finite number"),
    ("lr", "inf", "--lr must be a finite number"),
    ("lr", "nan", "--lr must be a finite number"),
    ("beta", "nan", "--beta must be a finite number"),
    ("gamma", "inf", "--gamma must be a finite number"),
    ("warmup_epochs", "inf", "--warmup-epochs must be a finite number"),
    ("alpha", "-0.5", "--alpha must not be negative"),
])
def test_non_finite_numbers_are_refused(tofu_dir, model_dir, tmp_path, capsys, flag, value, expected):
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", **{flag: value})
    _fails_fast(capsys, _argv(settings), expected)


def test_an_unknown_yaml_key_suggests_the_setting(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-5\nnum_train_epochs: 3\n")
    _fails_fast(capsys, ["train", "--config", str(cfg), "--print-config"],
                "unknown setting 'learning_rate' (did you mean lr?)")


# ------------------------------------------------------------------------------------------------
# eval and generate-alternates


def test_eval_refuses_retain_logs_of_another_forget_split(tofu_dir, model_dir, tmp_path, capsys):
    logs = tofu_dir / RETAIN90_LOGS
    _fails_fast(capsys, ["eval", "--model", str(model_dir), "--data", str(tofu_dir), "--forget-split",
                         "forget01", "--retain-logs", str(logs), "--output", str(tmp_path / "ev")],
                "truth ratios for 400 forget questions (the size of forget10)",
                "--forget-split forget01 has 40")


def _pickle_model(model_dir, folder):
    """A model folder whose weights are a pickle holding more than tensors."""
    shutil.copytree(model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    return folder


def test_a_pickled_model_is_a_clear_error_in_eval_and_generate_alternates(tofu_dir, model_dir,
                                                                          tmp_path, capsys):
    bad = _pickle_model(model_dir, tmp_path / "pickled")
    for argv in (["eval", "--model", str(bad), "--data", str(tofu_dir), "--forget-split", "forget01",
                  "--metrics", "forget", "--max-rows", "2", "--device", "cpu", "--output",
                  str(tmp_path / "ev")],
                 ["generate-alternates", "--model", str(bad), "--data", str(tofu_dir),
                  "--forget-split", "forget01", "--max-rows", "2", "--device", "cpu", "--output",
                  str(tmp_path / "alt.jsonl")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert f"cannot load the model from {bad}" in err, err


# ------------------------------------------------------------------------------------------------
# output into a log file, and into a closed pipe


def test_a_log_gets_plain_lines_and_only_our_progress(tofu_dir, model_dir, tmp_path, capsys):
    rows = [x for x in (tofu_dir / ALTERNATES).read_text().splitlines() if x.strip()]
    doubled = tmp_path / "alternates.jsonl"
    doubled.write_text("\n".join(rows[:6] + rows[:2] + rows[6:]) + "\n")  # two rows given twice
    settings = base_settings(tofu_dir, model_dir, tmp_path / "out", quiet=False, max_steps=2,
                             alternates=str(doubled))
    assert main(_argv(settings)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert "step 1/2: loss" in err and "step 2/2: loss" in err
    assert "2 of 22 rows repeat an earlier alternate of the same question" in err
    assert len(err.splitlines()) < 30


class _ClosedPipe(io.TextIOBase):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        return os.open(os.devnull, os.O_WRONLY)


def test_plan_into_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "16GiB", "--json"])
    assert code == 141


def test_plan_json_piped_into_head_has_no_traceback():
    cmd = (f"{sys.executable} -m altpo.cli plan --model llama-3.2-1b --gpu-memory 16GiB --json "
           "| head -c 1 >/dev/null")
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
