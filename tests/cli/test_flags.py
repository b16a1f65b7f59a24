"""One vocabulary of flags across commands: --overwrite, the --dtype values, --max-length; old
spellings still work with a one-line note; a misspelled flag gets a did-you-mean and the
command's own usage."""

import pytest

from altpo.cli import main


@pytest.mark.parametrize("argv, usage, hint", [
    (["train", "--learning-rate", "1e-3"], "usage: altpo-fast train", "did you mean --lr?"),
    (["train", "--batchsize", "3"], "usage: altpo-fast train", "did you mean --batch-size?"),
    (["plan", "--model", "llama-3.2-1b", "--gpu-memmory", "16GiB"], "usage: altpo-fast plan",
     "did you mean --gpu-memory?"),
    (["demo", "--overwirte"], "usage: altpo-fast demo", "did you mean --overwrite?"),
])
def test_a_misspelled_flag_gets_a_suggestion_and_the_commands_usage(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and hint in err
    assert "usage: altpo-fast [-h]" not in err  # not the top-level usage


def test_every_command_that_replaces_output_spells_it_overwrite(capsys):
    from altpo.cli import build_parser

    parser = build_parser()
    for name in ("train", "eval", "generate-alternates", "demo"):
        text = parser.commands[name].format_help()
        assert "--overwrite" in text, name
        assert "--force" not in text, name  # the old spelling is accepted, not advertised


def test_old_spellings_are_accepted_with_a_note(capsys):
    assert main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "16GiB", "--max-seq-len", "256"]) == 0
    assert "--max-seq-len is now --max-length" in capsys.readouterr().err
    from altpo.cli.flags import dtype_value

    assert dtype_value("bfloat16") == "bf16" and dtype_value("fp32") == "fp32"
    assert "--dtype bfloat16 is now --dtype bf16" in capsys.readouterr().err


def test_dtype_values_are_spelled_alike_in_every_command():
    from altpo.cli import build_parser

    parser = build_parser()
    for name in ("train", "plan", "eval", "generate-alternates"):
        action = next(a for a in parser.commands[name]._actions if "--dtype" in a.option_strings)
        assert set(action.choices) <= {"auto", "bf16", "fp16", "fp32"}, (name, action.choices)


def test_train_help_shows_the_methods_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    beta = out[out.index("\n  --beta X"):out.index("\n  --alpha X")]
    assert "(default:" not in beta and "altpo 0.5" in beta


@pytest.mark.parametrize("command, settings", [
    ("eval", "altpo.cli.eval:EvalSettings"),
    ("generate-alternates", "altpo.cli.generate_alternates:AlternatesSettings"),
    ("plan", "altpo.cli.plan:PlanSettings"),
])
def test_each_commands_flags_are_its_settings_dataclass(command, settings):
    import dataclasses
    import importlib

    from altpo.cli import build_parser

    module, name = settings.split(":")
    cls = getattr(importlib.import_module(module), name)
    shown = {s for a in build_parser().commands[command]._actions if a.help != "==SUPPRESS=="
             for s in a.option_strings} - {"-h", "--help"}
    assert shown == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}


def test_train_flags_are_the_config_settings_and_read_back():
    from altpo.cli import build_parser
    from altpo.cli.train import config_from_args
    from altpo.train.config import FIELDS

    parser = build_parser().commands["train"]
    shown = {s for a in parser._actions for s in a.option_strings if a.help != "==SUPPRESS=="}
    assert {"--" + n.replace("_", "-") for n in FIELDS} <= shown
    config = config_from_args(parser.parse_args(["--lr", "2e-4", "--resume", "--max-length", "64"]))
    assert (config.lr, config.resume, config.max_length) == (2e-4, True, 64)


@pytest.mark.parametrize("argv, dest, value, note", [
    (["generate-alternates", "--model", "m", "--data", "d", "--output", "o", "--force"],
     "overwrite", True, "--force is now --overwrite"),
    (["eval", "--model", "m", "--data", "d", "--output", "o", "--dtype", "float32"],
     "dtype", "fp32", "--dtype float32 is now --dtype fp32"),
    (["plan", "--model", "m", "--checkpointing", "layers"], "gradient_checkpointing", "on",
     "--checkpointing is now --gradient-checkpointing"),
    (["plan", "--model", "m", "--optimizer-in-backward", "no"], "optimizer_in_backward", "off",
     "--optimizer-in-backward no is now --optimizer-in-backward off"),
    (["train", "--dtype", "bfloat16"], "dtype", "bf16", "--dtype bfloat16 is now --dtype bf16"),
])
def test_old_spellings_reach_the_new_setting_with_a_note(argv, dest, value, note, capsys):
    from altpo.cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert note in capsys.readouterr().err


def test_the_same_concept_has_the_same_default_in_every_command():
    from altpo.cli import build_parser

    parser = build_parser()
    for flag, default in (("--master-weights", "auto"), ("--dtype", "auto"), ("--threads", None)):
        for name, command in parser.commands.items():
            action = next((a for a in command._actions if flag in a.option_strings), None)
            if action is None or name == "train":  # train: defaults come from its config
                continue
            if flag == "--threads" and name == "demo":  # tiny models: one thread, said in its help
                continue
            assert action.default == default, (name, flag)


def test_threads_default_is_the_cpus_this_process_may_use_per_local_process(monkeypatch):
    import os

    from altpo.cli.flags import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1


def test_threads_flag_sets_torchs_threads(monkeypatch):
    import torch

    from altpo.cli.flags import apply_threads

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert apply_threads(3) == 3 and seen == [3]
    with pytest.raises(Exception, match="--threads must be at least 1, got 0"):
        apply_threads(0)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["plan", "--help"], ["eval", "--help"],
                                  ["generate-alternates", "--help"], ["demo", "--help"]])
def test_help_loads_neither_torch_nor_transformers(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom altpo.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("HEAVY []"), out[-300:]
