"""One backbone-and-head helper for every caller: the trainer (altpo.train.step), the drop-in HF
helpers (altpo_kernels.hf) and evaluation (altpo.eval.scoring).

A logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is folded into the hidden
states, so each caller's log-probs match the model's own logits; final-logit soft-capping and a
biased lm_head are refused by all three with the same error. References are float64 log-softmaxes
of the stock forward's logits, with random (not the default) weights.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from altpo_kernels.hf import UnsupportedHeadError, batch_answer_logprobs, lm_head

from altpo.eval.scoring import Scorer
from altpo.data.tofu import IGNORE_INDEX, ChatFormat, encode_qa
from altpo.model.packed_attention import enable_packed_attention
from altpo.model.tiny_llama import build_tiny_tokenizer
from altpo.train.step import backbone, last_hidden_states, output_weight, sequence_logprobs

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _cohere(vocab=VOCAB):
    cfg = CohereConfig(**{**SHAPE, "vocab_size": vocab}, logit_scale=0.37, tie_word_embeddings=True)
    return _randomise(CohereForCausalLM(cfg), 11)


def _granite(vocab=VOCAB):
    cfg = GraniteConfig(**{**SHAPE, "vocab_size": vocab}, logits_scaling=3.0, tie_word_embeddings=False)
    return _randomise(GraniteForCausalLM(cfg), 12)


def _gemma2():
    cfg = Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=30.0)
    return _randomise(Gemma2ForCausalLM(cfg), 13)


def _biased_llama():
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))
    model.lm_head = torch.nn.Linear(SHAPE["hidden_size"], VOCAB, bias=True)
    return _randomise(model, 14)


def _reference_logprobs(model, ids, labels):
    """Summed float64 log-probs of labels[1:] from the stock forward of a float64 copy."""
    double = _copy_double(model)
    with torch.no_grad():
        logits = double(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    return lp[keep]


def _copy_double(model):
    double = type(model)(model.config).double().eval()
    double.load_state_dict(model.state_dict())
    return double


def _sequences(seed, n=4):
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randint(6, 20))]
        cut = rng.randint(1, len(ids) - 2)
        seqs.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return seqs


@pytest.mark.parametrize("make, scale", [(_cohere, 0.37), (_granite, 1 / 3.0)])
def test_lm_head_reads_the_logit_scale(make, scale):
    head = lm_head(make())
    assert head.scale == pytest.approx(scale)
    assert head.weight.shape == (VOCAB, SHAPE["hidden_size"])


@pytest.mark.parametrize("make", [_cohere, _granite])
def test_hf_batch_logprobs_fold_in_the_logit_scale(make):
    model = make()
    seqs = _sequences(21)
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, (x, y) in enumerate(seqs):
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    with torch.no_grad():
        got = batch_answer_logprobs(model, ids, mask, labels, backend="torch").logps
    for r, (x, y) in enumerate(seqs):
        want = _reference_logprobs(model, x, y).sum()
        assert float(got[r]) == pytest.approx(float(want), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("make", [_cohere, _granite])
def test_trainer_logprobs_fold_in_the_logit_scale(make):
    model = make()
    seqs = _sequences(22)
    enable_packed_attention(model, "sdpa")
    with torch.no_grad():
        got = sequence_logprobs(model, seqs, tokens_per_microbatch=64, loss_backend="torch")
    for i, (ids, labels) in enumerate(seqs):
        want = _reference_logprobs(make(), ids, labels).sum()
        assert float(got[i]) == pytest.approx(float(want), rel=1e-5, abs=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    words = "who wrote the book about rivers she did in spring a poet from Lima".split()
    return build_tiny_tokenizer([" ".join(random.Random(s).sample(words, 8)) for s in range(40)],
                                vocab_size=VOCAB)


@pytest.mark.parametrize("make", [_cohere, _granite])
def test_eval_scores_fold_in_the_logit_scale(make, tokenizer):
    model = make(len(tokenizer))
    pairs = [("who wrote the book about rivers", "a poet from Lima"), ("she did in spring", "the book")]
    stats = Scorer(model, tokenizer, batch_size=2, fmt=ChatFormat(), progress=False,
                   backend="torch").score(pairs, "test", vocab=True)
    for (q, a), s in zip(pairs, stats):
        e = encode_qa(tokenizer, q, a, fmt=ChatFormat())
        want = _reference_logprobs(model, e.input_ids, e.labels)
        torch.testing.assert_close(torch.from_numpy(s.token_logprobs), want, rtol=1e-5, atol=1e-5)
        # argmax over the scaled logits: a positive scale keeps the order
        with torch.no_grad():
            logits = _copy_double(model)(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        keep = torch.tensor(e.labels[1:]) != IGNORE_INDEX
        assert s.argmax.tolist() == logits[keep].argmax(-1).tolist()
        entropy_term = (torch.softmax(logits[keep], -1) * torch.log_softmax(logits[keep], -1)).sum(-1)
        torch.testing.assert_close(torch.from_numpy(s.vocab_mean), entropy_term, rtol=1e-4, atol=1e-5)


def _call_sites(model, tokenizer):
    """Each caller's entry point: the trainer's helpers, the HF helper, evaluation's scorer."""
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4]])
    return {
        "train.step.output_weight": lambda: output_weight(model),
        "train.step.backbone": lambda: backbone(model),
        "train.step.last_hidden_states": lambda: last_hidden_states(model, None),
        "altpo_kernels.hf.batch_answer_logprobs":
            lambda: batch_answer_logprobs(model, ids, torch.ones_like(ids), labels),
        "eval.scoring.Scorer": lambda: Scorer(model, tokenizer, batch_size=1, fmt=ChatFormat(),
                                              progress=False, backend="torch"),
    }


@pytest.mark.parametrize("make, names", [
    (_gemma2, ("Gemma2ForCausalLM", "config.final_logit_softcapping = 30.0", "soft-caps")),
    (_biased_llama, ("LlamaForCausalLM", "lm_head has a bias")),
])
def test_every_caller_refuses_a_head_the_fused_log_probs_do_not_reproduce(make, names, tokenizer):
    model = make()
    messages = set()
    for site, call in _call_sites(model, tokenizer).items():
        with pytest.raises(UnsupportedHeadError) as err:
            call()
        for name in names:
            assert name in str(err.value), (site, str(err.value))
        messages.add(str(err.value))
    assert len(messages) == 1  # the same refusal, word for word, everywhere


def test_a_transposed_head_is_refused():
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(SHAPE["hidden_size"], VOCAB))
    with pytest.raises(UnsupportedHeadError, match=r"shape \(32, 96\).*\[vocab, hidden = 32\]"):
        output_weight(model)
