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
