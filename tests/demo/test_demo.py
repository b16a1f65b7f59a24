"""The offline demo: a small run end to end through the CLI, its files, and that it forgot.

The run's numbers are checked against independent recomputations: the probabilities from the
saved models with full float64 logits, and the forgetting conditions from the TOFU_EVAL.json files.
"""

import contextlib
import importlib.util
import io
import json
import math
import random
import sys

import pytest
import torch

from altpo.cli import main
from altpo.demo.run import (
    HEADLINE,
    OUTPUT_ENTRIES,
    forgetting_check,
    prepare_output,
    DemoError,
    format_report,
)
from altpo.eval.tofu import answer_probabilities
from altpo.model.tiny_finetune import _length_bucketed_batches, encode_rows
from helpers import REPO_ROOT

FORGETTING_KEYS = {"forget_Q_A_Prob_before", "forget_Q_A_Prob_after", "forget_ratio",
                   "retain_Q_A_Prob_before", "retain_Q_A_Prob_after", "retain_relative_change",
                   "forget_halved", "retain_within_10_percent", "held"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["demo", "--output", str(out), "--small", "--quiet", "--seed", "0"])
    return out, rc, stdout.getvalue()


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _eval(out, name):
    return json.loads((out / "eval" / name / "TOFU_EVAL.json").read_text())


def _row_probs(logs, metric):
    return [v["prob"] for v in logs[metric]["value_by_index"].values()]


def test_demo_writes_every_file_and_is_quiet(demo_run):
    out, rc, stdout = demo_run
    assert rc == 0 and stdout == ""
    for name in OUTPUT_ENTRIES:
        if name in ("unlearned_models", "demo_compare.png"):  # --compare only
            continue
        assert (out / name).exists(), name
    for name in ("retain_model", "before", "after"):
        assert (out / "eval" / name / "TOFU_EVAL.json").is_file()
        assert (out / "eval" / name / "TOFU_SUMMARY.json").is_file()
    for model in ("full_model", "retain_model", "unlearned_model"):
        assert (out / model / "config.json").is_file() and (out / model / "model.safetensors").is_file()
    assert not (out / "unlearned_model" / "checkpoints").exists()
    png = (out / "demo_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_summary_has_the_metrics_before_and_after(demo_run):
    out, _, _ = demo_run
    summary = json.loads((out / "demo_summary.json").read_text())
    for side in ("before", "after", "retain_model"):
        for name in HEADLINE:
            assert name in summary[side], (side, name)
    for side in ("before", "after"):
        for name in ("forget_quality", "model_utility", "forget_Q_A_Prob", "retain_Q_A_Prob"):
            value = summary[side][name]
            assert isinstance(value, float) and math.isfinite(value), (side, name)
    assert set(summary["forgetting"]) == FORGETTING_KEYS
    assert summary["curves"]["finetune_full_loss"] and summary["curves"]["unlearning"]
    steps = [p["step"] for p in summary["curves"]["probabilities"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 4
    # the summary reports what the eval files hold
    for side, name in (("before", "before"), ("after", "after"), ("retain_model", "retain_model")):
        logs = _eval(out, name)
        for metric in ("forget_Q_A_Prob", "retain_Q_A_Prob", "model_utility"):
            assert summary[side][metric] == logs[metric]["agg_value"]


def test_forgetting_held_by_the_eval_files(demo_run):
    out, _, _ = demo_run
    before, after = _eval(out, "before"), _eval(out, "after")
    # recomputed here from the per-question values, not taken from the summary
    f0, f1 = (sum(_row_probs(x, "forget_Q_A_Prob")) / len(_row_probs(x, "forget_Q_A_Prob"))
              for x in (before, after))
    r0, r1 = (sum(_row_probs(x, "retain_Q_A_Prob")) / len(_row_probs(x, "retain_Q_A_Prob"))
              for x in (before, after))
    assert f0 > 0.8, "the full model should have memorised the forget answers"
    assert f1 <= 0.5 * f0
    assert abs(r1 - r0) / r0 <= 0.10
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["forgetting"]["held"] is True
    assert summary["forgetting"]["forget_ratio"] == pytest.approx(f1 / f0, rel=1e-9)


def _float64_probabilities(folder, rows):
    """Q_A_Prob per row from full float64 logits of the saved model (independent of the kernels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).double().eval()
    probs = []
    with torch.no_grad():
        for ids, labels in encode_rows(tok, rows):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != -100
            lp = torch.log_softmax(logits[keep], -1).gather(1, target[keep, None]).squeeze(1)
            probs.append(math.exp(lp.mean().item()))
    return probs


def test_probabilities_match_a_float64_recomputation(demo_run):
    out, _, _ = demo_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forget = _read_jsonl(out / "data" / "forget10_perturbed.json")
    summary = json.loads((out / "demo_summary.json").read_text())
    for folder, side, point in (("full_model", "before", 0), ("unlearned_model", "after", -1)):
        reference = _float64_probabilities(out / folder, forget)
        assert summary[side]["forget_Q_A_Prob"] == pytest.approx(sum(reference) / len(reference), rel=1e-4)
        model = AutoModelForCausalLM.from_pretrained(str(out / folder))
        ours = answer_probabilities(model, AutoTokenizer.from_pretrained(str(out / folder)), forget)
        assert ours == pytest.approx(reference, rel=1e-4, abs=1e-7)
        curve = summary["curves"]["probabilities"][point]
        assert curve["forget_Q_A_Prob"] == pytest.approx(sum(reference) / len(reference), rel=1e-4)


def test_alternates_cover_every_forget_question_and_differ_from_it(demo_run):
    out, _, _ = demo_run
    forget = {r["question"]: r["answer"] for r in _read_jsonl(out / "data" / "forget10.json")}
    alternates = _read_jsonl(out / "alternates.jsonl")
    assert {r["question"] for r in alternates} == set(forget)
    for row in alternates:
        assert row["answer"] == forget[row["question"]]
        assert row["alternate"].strip() and row["alternate"].strip() != row["answer"].strip()


def _documented_table(command_part: str) -> list[str]:
    """The before/after table of the docs/demo.md output block whose command contains
    ``command_part`` (the lines a user compares their own run with)."""
    spec = importlib.util.spec_from_file_location("refresh_docs", REPO_ROOT / "scripts" / "refresh_docs.py")
    refresh_docs = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("refresh_docs", refresh_docs)  # dataclasses look their module up there
    spec.loader.exec_module(refresh_docs)
    blocks = [b for b in refresh_docs.find_blocks(command_part) if b.path.name == "demo.md"]
    assert blocks, f"docs/demo.md has no output block for a command with {command_part!r}"
    lines = blocks[0].body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    end = next(i for i, line in enumerate(lines) if line.startswith("forgetting "))
    return lines[start:end]


def _table_numbers(lines: list[str]) -> list[float]:
    return [float(tok) for line in lines for tok in line.split()[1:]
            if tok.replace(".", "", 1).replace("-", "", 1).isdigit()]


def test_the_documented_small_seed0_table_is_what_the_code_gives(demo_run):
    """docs/demo.md shows `altpo-fast demo --small` at seed 0; this run is the same command, so
    its table must read the same (refresh with scripts/refresh_docs.py --only demo)."""
    out, _, _ = demo_run
    documented = _documented_table("--small")
    summary = json.loads((out / "demo_summary.json").read_text())
    ours = format_report(summary).splitlines()[: len(documented)]
    assert [line.split()[:1] for line in ours] == [line.split()[:1] for line in documented]
    assert _table_numbers(ours) == pytest.approx(_table_numbers(documented), rel=1e-3, abs=1e-4)


def test_refuses_a_non_empty_output_and_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert main(["demo", "--output", str(tmp_path / "notes.txt"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path / "new"), "--threads", "0"]) == 2
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_force_replaces_only_the_demo_entries(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "demo_summary.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "old.json").write_text("{}")
    with pytest.raises(DemoError):
        prepare_output(tmp_path, force=False)
    prepare_output(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_forgetting_check_on_hand_numbers():
    ok = forgetting_check({"forget_Q_A_Prob": 0.9, "retain_Q_A_Prob": 0.8},
                          {"forget_Q_A_Prob": 0.3, "retain_Q_A_Prob": 0.76})
    assert ok["forget_ratio"] == pytest.approx(1 / 3) and ok["retain_relative_change"] == pytest.approx(-0.05)
    assert ok["held"] and ok["forget_halved"] and ok["retain_within_10_percent"]
    weak = forgetting_check({"forget_Q_A_Prob": 0.9, "retain_Q_A_Prob": 0.8},
                            {"forget_Q_A_Prob": 0.5, "retain_Q_A_Prob": 0.8})
    assert not weak["forget_halved"] and weak["retain_within_10_percent"] and not weak["held"]
    broken = forgetting_check({"forget_Q_A_Prob": 0.9, "retain_Q_A_Prob": 0.8},
                              {"forget_Q_A_Prob": 0.1, "retain_Q_A_Prob": 0.6})
    assert broken["forget_halved"] and not broken["retain_within_10_percent"] and not broken["held"]


def test_length_bucketed_batches_cover_each_row_once():
    rng = random.Random(7)
    n, batch_size = 203, 16
    encoded = [([0] * rng.randint(5, 150), []) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    batches = _length_bucketed_batches(order, encoded, batch_size, random.Random(1))
    assert len(batches) == math.ceil(n / batch_size)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    # within a batch lengths are close: padding far below what random batches would need
    waste = sum(max(len(encoded[i][0]) for i in b) * len(b) - sum(len(encoded[i][0]) for i in b)
                for b in batches)
    total = sum(len(e[0]) for e in encoded)
    assert waste < 0.1 * total
