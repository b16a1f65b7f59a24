"""``altpo-fast train --method NAME`` on CPU: a tiny Llama on the TOFU fixture's forget01/retain99 data.

For every method: the first step's loss parts equal an independent float64 computation from stock
forwards on the same rows (at step 1 the policy is the reference), the run finishes, and the
forget answers lose probability. Plus the settings checks and the open-unlearning presets.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from altpo.data.idk import read_idk_answers, sample_idk_answers
from altpo.data.step_sampling import StepSampler
from altpo.data.tofu import ChatFormat, build_altpo_data, load_tofu_split
from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import PRESETS, TrainConfig
from helpers import FORGET_ROWS, RETAIN_ROWS, base_settings, sequence_logprob_float64

# a small retain weight: the tiny model is barely trained, so a strong retain NLL term would raise
# every answer's probability, the forget answers' included, and hide the forget term's effect
HPARAMS = {"npo": dict(beta=0.5, alpha=0.2), "simnpo": dict(beta=0.2, delta=0.5, gamma=1.0, alpha=0.2),
           "graddiff": dict(alpha=0.2), "gradascent": dict(), "idkdpo": dict(beta=0.5, alpha=0.2)}


def _settings(tofu_dir, model_dir, out, method, **kw):
    s = base_settings(tofu_dir, model_dir, out, method=method, batch_size=3, max_steps=4, lr=1e-2,
                      **HPARAMS[method], **kw)
    s.pop("alternates")
    return s


def _first_step_expected(tofu_dir, model_dir, method, config):
    """The first step's forget and retain loss from stock float64 forwards on its rows."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    forget = load_tofu_split(tofu_dir, "forget01")[:FORGET_ROWS]
    retain = load_tofu_split(tofu_dir, "retain99")[:RETAIN_ROWS]
    if method == "idkdpo":
        chosen = sample_idk_answers(read_idk_answers(tofu_dir / "idontknow.jsonl"), 40, config.seed)
        chosen = chosen[:FORGET_ROWS]
    else:
        chosen = [[r["answer"]] for r in forget]
    data = build_altpo_data(tok, forget, chosen, retain, fmt=ChatFormat())
    rows = StepSampler(data.num_pairs, len(data.retain), config.batch_size, config.seed,
                       data.pair_question).rows(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def lp(seq):
        return sequence_logprob_float64(model, seq.input_ids, seq.labels)

    def n(seq):
        return sum(1 for x in seq.labels[1:] if x != -100)

    answers = [data.forget[data.pair_question[p]] for p in rows.step_pairs]
    b = len(answers)
    hp = config
    if method == "npo":  # policy == reference: every log-ratio is 0
        forget_loss = 2 / hp.beta * math.log(2)
    elif method == "idkdpo":
        forget_loss = 2 / hp.beta * math.log(2)
    elif method == "simnpo":
        forget_loss = sum(-2 / hp.beta * F.logsigmoid(torch.tensor(-hp.beta * lp(a) / n(a) - hp.beta * hp.delta,
                                                                   dtype=torch.float64)).item()
                          for a in answers) / b
    else:
        forget_loss = sum(lp(a) for a in answers) / sum(n(a) for a in answers)
    retain_rows = [data.retain[r] for r in rows.step_retain]
    retain_loss = -sum(lp(r) for r in retain_rows) / sum(n(r) for r in retain_rows)
    return forget_loss, retain_loss, data, rows


@pytest.mark.parametrize("method", ["npo", "simnpo", "graddiff", "gradascent", "idkdpo"])
def test_method_trains_from_the_expected_first_loss(tofu_dir, model_dir, tmp_path, method):
    out = tmp_path / method
    config = TrainConfig(**_settings(tofu_dir, model_dir, out, method)).validate()
    result = train(config)
    assert result.completed and result.steps_done == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    forget_loss, retain_loss, data, rows = _first_step_expected(tofu_dir, model_dir, method, config)
    assert records[0]["forget_loss"] == pytest.approx(forget_loss, rel=1e-4, abs=1e-5)
    if config.alpha > 0:
        assert records[0]["retain_loss"] == pytest.approx(retain_loss, rel=1e-4)
    assert records[0]["loss"] == pytest.approx(config.gamma * forget_loss + config.alpha *
                                               (retain_loss if config.alpha > 0 else 0.0), rel=1e-4)
    assert (out / "reference_logprobs.safetensors").exists() == (method in ("npo", "idkdpo"))

    # the forget answers of the trained rows lost probability
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    seqs = data.forget
    before = [sequence_logprob_float64(start, s.input_ids, s.labels) for s in seqs]
    after = [sequence_logprob_float64(trained, s.input_ids, s.labels) for s in seqs]
    assert sum(after) < sum(before) - 1.0, (before, after)


@pytest.mark.parametrize("change, message", [
    (dict(method="npo", alternates="x.jsonl"), "does not use --alternates"),
    (dict(method="graddiff", beta=0.3), "has no setting beta .*; drop --beta$"),
    (dict(method="simnpo", alpha=-1.0), "alpha must not be negative"),
    (dict(method="npo", idk_answers="idk.txt"), "--idk-answers is for --method idkdpo only"),
    (dict(method="dpo"), "--alternates is required with --method dpo"),
    (dict(method="nop"), "did you mean 'npo'"),
])
def test_method_settings_are_checked(tmp_path, change, message):
    s = dict(model="m", output=str(tmp_path / "o"), **change)
    with pytest.raises(UserError, match=message):
        TrainConfig(**s).validate()


def test_method_defaults_fill_in():
    c = TrainConfig(model="m", output="o", method="simnpo").validate()
    assert (c.beta, c.alpha, c.gamma, c.delta) == (4.5, 1.0, 0.125, 0.0)
    c = TrainConfig(model="m", output="o", alternates="a", beta=0.3).validate()
    assert (c.method, c.beta, c.alpha, c.gamma, c.delta) == ("altpo", 0.3, 2.0, 1.0, None)


@pytest.mark.parametrize("name, method, values", [
    ("tofu-llama-3.2-1b-forget10-npo", "npo", dict(beta=0.1, alpha=1.0, gamma=1.0)),
    ("tofu-llama-3.2-1b-forget10-simnpo", "simnpo", dict(beta=4.5, delta=0.0, alpha=1.0, gamma=0.125)),
    ("tofu-llama-3.2-1b-forget10-idkdpo", "idkdpo", dict(beta=0.1, alpha=1.0, gamma=1.0)),
    ("tofu-llama-3.2-1b-forget10-graddiff", "graddiff", dict(alpha=1.0, gamma=1.0)),
])
def test_open_unlearning_presets(name, method, values):
    """open-unlearning's published values (configs/trainer/*.yaml, experiment/unlearn/tofu)."""
    p = PRESETS[name]
    assert p["method"] == method and all(p[k] == v for k, v in values.items())
    assert (p["lr"], p["epochs"], p["warmup_epochs"], p["weight_decay"], p["batch_size"]) == (1e-5, 10.0, 1.0, 0.01, 32)
    assert p["model"] == "open-unlearning/tofu_Llama-3.2-1B-Instruct_full" and p["forget_split"] == "forget10"
    TrainConfig(**p, output="o").validate()
