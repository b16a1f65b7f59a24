"""Alternate-answer generation: K rows per question, resume after an interruption, --overwrite,
rejection of samples that repeat the true answer."""

import json

import pytest

from altpo.eval import alternates as G
from altpo.cli import main as cli_main
from altpo.data.tofu import load_alternates
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

PAIRS = [
    ("Who wrote 'The Glass Orchard'?", "It was written by Amara Okafor."),
    ("Where was Lionel Brandt born?", "Lionel Brandt was born in Graz, Austria."),
    ("What genre does Mei Tanaka write?", "Mei Tanaka writes historical fiction."),
    ("What did Tomas Reyes's father do?", "His father was a marine biologist."),
    ("Which award did Ines Duarte win?", "Ines Duarte won the Northern Quill Prize."),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [t for qa in PAIRS for t in qa] + [G.ALTERNATE_PROMPT]
    tok = build_tiny_tokenizer(texts, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, intermediate_size=64, seed=3)
    path = tmp_path_factory.mktemp("tiny_alt")
    save_tiny_model(model, tok, path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tiny, out, **kw):
    _, model, tok = tiny
    opts = dict(k=3, seed=7, batch_size=6, max_new_tokens=6, progress=False)
    opts.update(kw)
    return G.generate_alternates(model, tok, PAIRS, output_path=out, **opts)


def test_writes_k_rows_per_question_and_resumes_identically(tiny, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    report = _run(tiny, full)
    rows = _rows(full)
    assert report.written_rows == len(rows) == 3 * len(PAIRS)
    assert all(set(r) == {"question", "answer", "alternate"} for r in rows)
    for q, a in PAIRS:
        mine = [r for r in rows if r["question"] == q]
        assert len(mine) == 3 and all(r["answer"] == a for r in mine)
        assert all(not G.is_rejected(r["alternate"], a) for r in mine)
    # the trainer's loader reads the file as written
    loaded = load_alternates(full, [{"question": q, "answer": a} for q, a in PAIRS])
    assert [len(x) for x in loaded] == [3] * len(PAIRS)

    # interrupt a second run after its first batch (2 questions), then resume it
    part = tmp_path / "part.jsonl"
    calls = {"n": 0}
    real = G._sample_texts

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "_sample_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, part)
    assert len(_rows(part)) == 6  # whole lines of the finished batch only
    monkeypatch.setattr(G, "_sample_texts", real)
    resumed = _run(tiny, part)
    assert resumed.resumed_questions == 2 and resumed.written_rows == 9
    # a resumed run writes what an uninterrupted one writes
    assert part.read_text() == full.read_text()
    # running again with everything done writes nothing
    again = _run(tiny, part)
    assert again.written_rows == 0 and again.resumed_questions == len(PAIRS)


def test_refuses_other_settings_unless_forced(tiny, tmp_path):
    out = tmp_path / "alts.jsonl"
    _run(tiny, out)
    with pytest.raises(G.AlternatesOutputExists, match="seed"):
        _run(tiny, out, seed=8)
    report = _run(tiny, out, seed=8, k=2, force=True)
    assert report.written_rows == len(_rows(out)) == 2 * len(PAIRS)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"question": "q", "answer": "a", "alternate": "b"}\n')
    with pytest.raises(G.AlternatesOutputExists, match="force"):
        _run(tiny, foreign)


def test_rejects_repeats_of_the_true_answer_and_resamples(tiny, tmp_path, monkeypatch):
    answers = dict(PAIRS)
    calls = []

    def fake(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        texts = []
        for p in prompts:
            text = tokenizer.decode(p)
            q = next(q for q in answers if q in text)
            # the first round repeats the answer (case and punctuation changed) for every question
            # but the last; from the second round on, the last question still gets repeats
            if len(calls) == 1 or q == PAIRS[-1][0]:
                texts.append("  " + answers[q].upper().rstrip(".") + " !")
            else:
                texts.append(f"A changed answer number {len(calls)}.")
        return texts

    monkeypatch.setattr(G, "_sample_texts", fake)
    out = tmp_path / "alts.jsonl"
    report = _run(tiny, out, k=2, batch_size=100, max_retries=2)
    rows = _rows(out)
    assert calls == [10, 10, 2]  # every slot rejected once, then only the last question's two
    assert all(r["alternate"] == "A changed answer number 2." for r in rows)
    assert len(rows) == 2 * (len(PAIRS) - 1)
    assert report.short == [(PAIRS[-1][0], 0)]
    assert report.resampled == 12
    assert G.is_rejected("", "x") and G.is_rejected("Paris!", "paris") and not G.is_rejected("Rome", "Paris")


def test_cli_generate_alternates(tiny, tmp_path, capsys):
    model_dir = tiny[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget01.json").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS))
    out = tmp_path / "alts.jsonl"
    argv = ["generate-alternates", "--model", str(model_dir), "--data", str(data), "--forget-split", "forget01",
            "--k", "2", "--seed", "0", "--output", str(out), "--max-new-tokens", "4", "--max-rows", "3", "--quiet"]
    assert cli_main(argv) == 0
    assert len(_rows(out)) == 6
    said = capsys.readouterr()
    assert "6 alternates written" in said.out
    assert "Loading weights" not in said.err and "it/s]" not in said.err  # --quiet: no bar at all
    changed = [a if a != "0" else "1" for a in argv]
    assert cli_main(changed) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(changed + ["--overwrite"]) == 0
    # the old spelling still works, with a one-line note
    assert cli_main([a if a != "1" else "2" for a in changed] + ["--force"]) == 0
    assert "--force is now --overwrite" in capsys.readouterr().err
    assert cli_main([*argv[:2], str(tmp_path / "nope"), *argv[3:]]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main([*argv[:4], str(tmp_path / "nope"), *argv[5:]]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_third_party_bars_even_on_a_terminal(tiny, tmp_path, capsys, monkeypatch, quiet):
    import altpo.progress

    monkeypatch.setattr(altpo.progress, "interactive", lambda: True)   # as if stderr were a terminal
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget01.json").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS))
    argv = ["generate-alternates", "--model", str(tiny[0]), "--data", str(data), "--forget-split", "forget01",
            "--k", "2", "--seed", "0", "--output", str(tmp_path / "alts.jsonl"), "--max-new-tokens", "4",
            "--max-rows", "2"] + (["--quiet"] if quiet else [])
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    if quiet:
        assert err == ""
    else:   # the same run without --quiet draws transformers' loading bar and ours
        assert "Loading weights" in err and "alternates" in err
