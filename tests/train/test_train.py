"""``altpo-fast train`` end to end on CPU: a tiny Llama on the TOFU fixture's forget01/retain99 data.

Covers: a few steps run and the forget answers' log-probs fall relative to the alternates'
(measured with stock forwards, float64); the reference cache holds the starting model's log-probs
and is reused on a rerun; resume after SIGTERM reaches the uninterrupted run's weights bit for
bit; the output loads with AutoModelForCausalLM.from_pretrained.
"""

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from altpo.data.tofu import ChatFormat, build_altpo_data, load_alternates, load_tofu_split
from altpo.train import train
from altpo.train.config import TrainConfig
from helpers import ALTERNATES, FORGET_ROWS, RETAIN_ROWS, base_settings, sequence_logprob_float64


def _pair_data(tofu_dir, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    forget_all = load_tofu_split(tofu_dir, "forget01")
    alts = load_alternates(tofu_dir / ALTERNATES, forget_all)[:FORGET_ROWS]
    retain = load_tofu_split(tofu_dir, "retain99")[:RETAIN_ROWS]
    return build_altpo_data(tok, forget_all[:FORGET_ROWS], alts, retain, fmt=ChatFormat())


def _margins(model, data):
    """Per pair lp(alternate) - lp(forget answer) from stock forwards in float64, and the lps."""
    forget = [sequence_logprob_float64(model, s.input_ids, s.labels) for s in data.forget]
    alts = [sequence_logprob_float64(model, s.input_ids, s.labels) for s in data.alternates]
    return torch.tensor([a - forget[q] for a, q in zip(alts, data.pair_question)]), forget, alts


def test_training_forgets_and_reuses_the_reference_cache(tofu_dir, model_dir, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(**base_settings(tofu_dir, model_dir, out, max_steps=8, lr=1e-2))
    result = train(config)
    assert result.completed and result.steps_done == 8 and not result.reference_reused

    # metrics: every step logged; step 1 has policy == reference, so delta = 0 and the forget
    # part is (2/beta) * log 2 exactly in the math (fp32 rounding of the two packings aside)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert abs(records[0]["delta_mean"]) < 1e-3
    assert records[0]["forget_loss"] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-4)
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)

    # the cache holds the starting model's log-probs (independent stock forwards, float64)
    data = _pair_data(tofu_dir, model_dir)
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    margin_before, forget_before, alts_before = _margins(start, data)
    cache = load_file(str(out / "reference_logprobs.safetensors"))
    torch.testing.assert_close(cache["forget"].double(), torch.tensor(forget_before, dtype=torch.float64), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cache["alternates"].double(), torch.tensor(alts_before, dtype=torch.float64), rtol=1e-5, atol=1e-3)

    # the output is a model folder; after AltPO the alternates gained on the forget answers
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    margin_after, _, _ = _margins(trained, data)
    gain = margin_after - margin_before
    assert float(gain.mean()) > 8.0, gain
    assert float((gain > 0).double().mean()) >= 0.9, gain

    # a rerun reuses the cache without rewriting it, and reaches the same weights
    stamp = os.stat(out / "reference_logprobs.safetensors").st_mtime_ns
    again = train(TrainConfig(**{**config.to_dict(), "overwrite": True}))
    assert again.reference_reused and again.completed
    assert os.stat(out / "reference_logprobs.safetensors").st_mtime_ns == stamp
    rerun_records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rerun_records] == [r["loss"] for r in records]


def test_resume_after_sigterm_is_bit_exact(tofu_dir, model_dir, tmp_path):
    # bf16 weights with fp32 master weights: the checkpoint must carry the master copy exactly
    settings = dict(max_steps=5, dtype="bf16", master_weights="fp32", lr=1e-3, warmup_epochs=0.5)
    whole = train(TrainConfig(**base_settings(tofu_dir, model_dir, tmp_path / "whole", **settings)))
    assert whole.completed

    out = tmp_path / "split"
    config = TrainConfig(**base_settings(tofu_dir, model_dir, out, **settings))

    def stop_at_step_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(config, on_step=stop_at_step_2)
    assert first.interrupted == "SIGTERM" and not first.completed
    assert first.checkpoint is not None and first.checkpoint.name == f"step-{first.steps_done:08d}"
    assert 2 <= first.steps_done < 5
    assert not (out / "config.json").exists()  # no final model from an interrupted run

    rest = train(TrainConfig(**{**config.to_dict(), "resume": True}))
    assert rest.completed and rest.steps_done == 5

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(out) == losses(tmp_path / "whole")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_resident_reference_matches_the_cache(tofu_dir, model_dir, tmp_path):
    """A frozen copy of the model scoring each step gives the cached run's trajectory."""
    settings = dict(max_steps=3, lr=1e-2)
    cached = train(TrainConfig(**base_settings(tofu_dir, model_dir, tmp_path / "c", **settings)))
    resident = train(TrainConfig(**base_settings(tofu_dir, model_dir, tmp_path / "r",
                                                 reference="resident", **settings)))
    assert resident.reference_cache is None and not (tmp_path / "r" / "reference_logprobs.safetensors").exists()
    # step 1: the policy is the reference and both score the same packed rows: delta is exactly 0
    assert resident.history[0]["delta_mean"] == 0.0
    for a, b in zip(cached.history, resident.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa = load_file(str(tmp_path / "c" / "model.safetensors"))
    wb = load_file(str(tmp_path / "r" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
