"""Hidden keys in packed attention (``--numerics open-unlearning`` with pad = eos).

open-unlearning's collator sets ``attention_mask = input_ids != pad_token_id`` with pad = eos, so
every in-sequence eos is masked as a key. The reference here is transformers' own padded forward
with that mask (eager and sdpa attention); the packed forward with the key mask must equal it in
logits, per-sequence answer log-probs and gradients, and without the mask it must differ.
"""

import copy

import pytest
import torch

from altpo.data.packing import build_micro_batch, sequence_units, with_key_mask
from altpo.model.packed_attention import enable_packed_attention, packed_attention_kwargs
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer
from altpo.train.step import last_hidden_states

TEXTS = [
    "Who wrote the novel about the lighthouse keeper?",
    "The novel was written by Basil Mahfouz Al-Kuwaiti in 1998.",
    "What genre does the author mostly write in?",
    "She writes mostly historical fiction set around old harbours.",
    "You are a helpful assistant.",
]
QA = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3]), (TEXTS[0], TEXTS[3])]


@pytest.fixture(scope="module")
def setup():
    tok = build_tiny_tokenizer(TEXTS * 20, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=1)
    seqs = []
    for q, a in QA:
        text = tok.apply_chat_template([{"role": "system", "content": TEXTS[4]},
                                        {"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        answer = tok(a + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        seqs.append((prompt + answer, [-100] * len(prompt) + answer))
    eos = tok.eos_token_id
    for ids, _ in seqs:  # the eot closing the system turn, the user turn and the answer
        assert sum(t == eos for t in ids) >= 3 and ids[-1] == eos and ids[0] != eos
    return tok, model, seqs


def _reference(model, seqs, eos, attn):
    """transformers' padded forward, padded with eos and masked ``ids != eos`` (its collator)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(attn)
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), eos)
    for i, (x, _) in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
    logits = ref(input_ids=ids, attention_mask=(ids != eos).long()).logits
    rows = [logits[i, :len(x)] for i, (x, _) in enumerate(seqs)]
    return ref, rows


def _answer_logps(rows, seqs):
    """Per sequence: the summed log-prob of its answer tokens (labels shifted by one)."""
    out = []
    for logits, (_, labels) in zip(rows, seqs):
        y = torch.tensor(labels[1:])
        keep = y != -100
        out.append(torch.log_softmax(logits[:-1][keep].double(), -1).gather(-1, y[keep, None]).sum())
    return torch.stack(out)


def _packed(model, seqs, masked_id):
    mb = with_key_mask(build_micro_batch(sequence_units(seqs)), masked_id)
    logits = model.lm_head(last_hidden_states(model, mb))
    bounds = torch.tensor((0,) + mb.seq_lens).cumsum(0).tolist()
    return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_key_mask_equals_padded_forward_with_eos_masked(setup, attn):
    tok, model, seqs = setup
    eos = tok.eos_token_id
    ref, ref_rows = _reference(model, seqs, eos, attn)
    ref_logps = _answer_logps(ref_rows, seqs)
    ref_logps.sum().backward()

    ours = copy.deepcopy(model)
    assert enable_packed_attention(ours, "sdpa") == "sdpa"
    rows = _packed(ours, seqs, eos)
    for a, b in zip(rows, ref_rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    logps = _answer_logps(rows, seqs)
    torch.testing.assert_close(logps, ref_logps, rtol=1e-6, atol=1e-5)
    logps.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)

    # without the mask the in-sequence eot tokens are attended to: a different result
    plain = _answer_logps(_packed(ours, seqs, None), seqs)
    assert (plain - ref_logps).abs().max() > 1e-3


def test_a_query_with_every_key_hidden_gives_zero_not_nan(setup):
    tok, model, seqs = setup
    eos = tok.eos_token_id
    ours = copy.deepcopy(model)
    enable_packed_attention(ours, "sdpa")
    ids, labels = seqs[0]
    leading = [([eos, eos] + ids, [-100, -100] + labels)]  # the first two queries see no key
    mb = with_key_mask(build_micro_batch(sequence_units(leading)), eos)
    hidden = last_hidden_states(ours, mb)
    assert torch.isfinite(hidden).all()
    # transformers' sdpa attention gives such a query a zero attention output too (its eager
    # attention spreads it over the masked keys instead); no other token depends on it
    _, ref_rows = _reference(model, leading, eos, "sdpa")
    torch.testing.assert_close(_packed(ours, leading, eos)[0], ref_rows[0], rtol=1e-5, atol=1e-5)
    # the later tokens never see the hidden ones, so they equal the sequence without them
    rest = last_hidden_states(ours, with_key_mask(build_micro_batch(sequence_units([seqs[0]])), eos))
    torch.testing.assert_close(hidden[2:], rest, rtol=1e-5, atol=1e-5)


def test_varlen_backends_refuse_a_key_mask():
    from altpo.model import packed_attention as pa

    q = torch.zeros(1, 2, 4, 8)
    kw = packed_attention_kwargs([4], "cpu")
    with pytest.raises(ValueError, match="cannot hide single keys"):
        pa._packed_attention_forward(None, q, q, q, None, _backend="flash",
                                     packed_key_mask=torch.ones(4, dtype=torch.bool), **kw)
