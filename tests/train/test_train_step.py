"""Packed equals unpacked: the trainer's step against each sequence run alone through stock HF.

The reference runs transformers' own Llama forward (its SDPA attention, full logits) on every
sequence separately, takes float64 log-softmax, and writes AltPO's loss out by hand (docs/design.md
section 2). The step under test packs the same sequences into several micro-batches, runs the
backbone with packed attention and the fused loss with step-level normalisers.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from altpo.model.packed_attention import enable_packed_attention
from altpo.data.packing import ROLE_ALTERNATE, ROLE_FORGET, ROLE_RETAIN, PackUnit, pack_micro_batches
from altpo.train.step import PackedAltPOLoss, forward_backward, sequence_logprobs, step_normalisers

VOCAB = 96
BETA, ALPHA, GAMMA = 0.5, 2.0, 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny_step_model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def _units(seed):
    rng = random.Random(seed)

    def seq():
        prompt, answer = rng.randint(3, 12), rng.randint(2, 14)
        ids = [rng.randrange(VOCAB) for _ in range(prompt + answer)]
        return ids, [-100] * prompt + ids[prompt:]

    units = []
    for q in range(4):
        k = rng.randint(1, 3)
        seqs = [seq() for _ in range(k + 1)]
        refs = [(rng.uniform(-60, -20), rng.uniform(-60, -20)) for _ in range(k)]
        units.append(PackUnit(seqs, [ROLE_FORGET] + [ROLE_ALTERNATE] * k,
                              [(j, 0) for j in range(1, k + 1)], refs, key=q))
    for r in range(9):
        units.append(PackUnit([seq()], [ROLE_RETAIN], retain=[0] * rng.randint(1, 2), key=("r", r)))
    return units


def _reference_loss(model, units):
    """AltPO loss of ``units`` from per-sequence stock forwards, float64 log-softmax."""

    def logp(ids, labels):
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(labels[1:])
        mask = target != -100
        lp = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
        return (lp * mask).sum(), int(mask.sum())

    deltas, retain_sum, retain_tokens = [], 0.0, 0
    for u in units:
        lps = [logp(*s) for s in u.sequences]
        for (w, l), (rw, rl) in zip(u.pairs, u.ref_logps):
            deltas.append((lps[w][0] - rw) - (lps[l][0] - rl))
        for r in u.retain:
            retain_sum = retain_sum + lps[r][0]
            retain_tokens += lps[r][1]
    delta = torch.stack(deltas)
    forget = -(2.0 / BETA) * F.logsigmoid(BETA * delta).mean()
    retain = -retain_sum / retain_tokens
    return GAMMA * forget + ALPHA * retain, forget, retain


def test_packed_step_matches_unpacked_reference_loss_and_grads(model_dir):
    seed = 1234
    units = _units(seed)
    budget = max(u.num_tokens for u in units) + 8
    # forget groups with some retain rows, then retain rows alone (the retain-only loss path)
    mbs = pack_micro_batches(units[:7], budget) + pack_micro_batches(units[7:], budget)
    assert len(mbs) >= 3 and mbs[-1].num_pairs == 0

    ref_model = _load(model_dir)
    ref_loss, ref_forget, ref_retain = _reference_loss(ref_model, units)
    ref_loss.backward()
    ref_loss, ref_forget, ref_retain = (float(x.detach()) for x in (ref_loss, ref_forget, ref_retain))

    model = _load(model_dir)
    assert enable_packed_attention(model, "sdpa") == "sdpa"
    num_pairs, num_retain_tokens = step_normalisers(units)
    stats = forward_backward(PackedAltPOLoss(model, beta=BETA, alpha=ALPHA, gamma=GAMMA,
                                             loss_backend="torch"),
                             mbs, num_pairs=num_pairs, num_retain_tokens=num_retain_tokens)

    assert stats.loss == pytest.approx(ref_loss, rel=2e-5)
    assert stats.forget_loss == pytest.approx(ref_forget, rel=2e-5, abs=1e-6)
    assert stats.retain_loss == pytest.approx(ref_retain, rel=2e-5)
    assert stats.num_pairs == num_pairs and stats.num_micro_batches == len(mbs)
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        g, want = p.grad, ref_grads[name].grad
        scale = float(want.abs().max())
        assert scale > 0, name
        assert float((g - want).abs().max()) <= 2e-4 * scale + 1e-7, name


def test_micro_batch_split_does_not_change_the_step(model_dir):
    """The same step packed into 1 micro-batch and into many gives the same gradient."""
    units = _units(2345)
    num_pairs, num_retain_tokens = step_normalisers(units)
    grads = []
    for budget in (sum(u.num_tokens for u in units), max(u.num_tokens for u in units)):
        model = _load(model_dir)
        enable_packed_attention(model, "sdpa")
        forward_backward(PackedAltPOLoss(model, loss_backend="torch"),
                         pack_micro_batches(units, budget), num_pairs=num_pairs,
                         num_retain_tokens=num_retain_tokens)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))


def test_sequence_logprobs_match_stock_forward(model_dir):
    rng = random.Random(3456)
    seqs = []
    for _ in range(7):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 30))]
        cut = rng.randint(1, len(ids) - 1)
        seqs.append((ids, [-100] * cut + ids[cut:]))
    model = _load(model_dir)
    enable_packed_attention(model, "sdpa")
    got = sequence_logprobs(model, seqs, tokens_per_microbatch=64, loss_backend="torch")
    stock = _load(model_dir)
    with torch.no_grad():
        for i, (ids, labels) in enumerate(seqs):
            logits = stock(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            mask = target != -100
            want = (torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0] * mask).sum()
            assert float(got[i]) == pytest.approx(float(want), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("mode", ["layers", "offload"])
def test_activation_checkpointing_gives_the_same_step(model_dir, mode):
    """Recomputing each layer in backward (and parking its inputs on the CPU) changes no number."""
    from altpo.model.activation_checkpointing import enable_activation_checkpointing, offload_saved_tensors

    units = _units(4567)
    num_pairs, num_retain_tokens = step_normalisers(units)
    mbs = pack_micro_batches(units, max(u.num_tokens for u in units) + 8)
    results = []
    for checkpointing in ("none", mode):
        model = _load(model_dir)
        enable_packed_attention(model, "sdpa")
        model.train()
        if checkpointing != "none":
            enable_activation_checkpointing(model, checkpointing)
        context = (lambda: offload_saved_tensors(True, "cpu")) if checkpointing == "offload" else None
        stats = forward_backward(PackedAltPOLoss(model, loss_backend="torch"), mbs,
                                 num_pairs=num_pairs, num_retain_tokens=num_retain_tokens,
                                 forward_context=context)
        results.append((stats.loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-7)
