"""A run that cannot unlearn anything is refused before training, and alternates that train
nothing are dropped with counts: an alternate that repeats its forget answer has Δ = 0 by
construction, so the forget loss would stay at 4·ln 2 on every step of a run that ends "finished"."""

import json
import re
from pathlib import Path

import pytest

from altpo.data.tofu import load_alternates, load_tofu_split
from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
from helpers import ALTERNATES, FORGET_ROWS, TOFU_FIXTURE, base_settings


def _rows() -> list[dict]:
    return [json.loads(line) for line in (TOFU_FIXTURE / ALTERNATES).read_text().splitlines() if line.strip()]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_model_load(monkeypatch):
    import altpo.train.loop as loop

    monkeypatch.setattr(loop, "load_causal_lm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def _config(tofu_dir, model_dir, out, **overrides):
    return TrainConfig(**base_settings(tofu_dir, model_dir, out, **overrides))


def test_alternates_that_all_repeat_the_answer_are_refused_before_the_model_loads(
        tofu_dir, model_dir, tmp_path, monkeypatch):
    forget = load_tofu_split(tofu_dir, "forget01")
    path = _write(tmp_path / "same.jsonl",
                  [{"question": r["question"], "answer": r["answer"], "alternate": r["answer"]}
                   for r in forget])
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=r"no usable alternate for 40 of 40 forget questions \(40 of "
                                        r"them had only alternates that repeat the forget answer"):
        train(_config(tofu_dir, model_dir, tmp_path / "run", alternates=str(path)))
    assert not (tmp_path / "run").exists()


def test_alternates_that_repeat_the_answer_are_dropped_and_counted(tofu_dir, model_dir, tmp_path,
                                                                  capsys):
    forget = load_tofu_split(tofu_dir, "forget01")
    rows = _rows()
    extra = []
    for r in forget[:FORGET_ROWS]:  # per question: the answer itself, and it shouted
        extra.append({"question": r["question"], "answer": r["answer"], "alternate": r["answer"]})
        extra.append({"question": r["question"], "answer": r["answer"],
                      "alternate": r["answer"].upper() + "!!"})
    path = _write(tmp_path / "some.jsonl", rows + extra)
    loaded = load_alternates(path, forget)
    original = load_alternates(TOFU_FIXTURE / ALTERNATES, forget)
    assert loaded == original  # exactly the eight repeats are gone
    result = train(_config(tofu_dir, model_dir, tmp_path / "run", alternates=str(path), quiet=False,
                           max_steps=1))
    assert result.completed
    err = capsys.readouterr()
    assert (f"dropped 8 of {len(rows) + 8} alternates that repeat their forget answer (4 question(s))"
            in err.out + err.err)


def test_a_cut_that_makes_every_alternate_its_answer_is_refused(tofu_dir, model_dir, tmp_path):
    from transformers import AutoTokenizer

    from altpo.data.data_checks import check_answer_tokens
    from altpo.data.tofu import build_altpo_data, truncation_report

    forget = load_tofu_split(tofu_dir, "forget01")[:1]
    # its alternate is the answer plus a tail: a cut inside the answer makes the two the same
    alternates = [[forget[0]["answer"] + " And that is all."]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    whole = build_altpo_data(tokenizer, forget, alternates, [], max_length=None)
    prompt = whole.forget[0].labels.index(next(x for x in whole.forget[0].labels if x != -100))
    assert whole.forget[0].num_answer_tokens > 8 and whole.same_tokens == 0
    check_answer_tokens(whole, 4096)  # uncut, the pair differs: accepted

    cut = build_altpo_data(tokenizer, forget, alternates, [], max_length=prompt + 8)
    assert cut.alternates[0].input_ids == cut.forget[0].input_ids  # the case under test
    with pytest.raises(UserError, match=f"--max-length {prompt + 8} cuts every alternate to the same "
                                        r"tokens as its forget answer.*unlearn nothing"):
        check_answer_tokens(cut, prompt + 8)

    two = build_altpo_data(tokenizer, forget, [alternates[0] + ["Nobody knows who that is."]], [],
                           max_length=prompt + 8)
    check_answer_tokens(two, prompt + 8)  # one pair still differs: trains, with a note
    assert "cuts 1 of 2 alternates to the same tokens as their forget answer" in truncation_report(
        two, prompt + 8)


@pytest.mark.parametrize("char, name", [("\x00", "U+0000 (NUL)"),
                                        ("\u202e", "U+202E (RIGHT-TO-LEFT OVERRIDE)")])
def test_hidden_control_characters_in_alternates_are_refused(tofu_dir, tmp_path, char, name):
    forget = load_tofu_split(tofu_dir, "forget01")
    rows = _rows()
    rows[2] = {**rows[2], "alternate": "He was born in " + char + "Paris."}
    path = _write(tmp_path / "ctrl.jsonl", rows)
    with pytest.raises(UserError, match=f"row 3: the alternate holds the control character "
                                        f"{re.escape(name)}"):
        load_alternates(path, forget)
