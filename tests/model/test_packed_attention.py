"""Packed attention: a packed row must give exactly what its sequences give when run alone.

The reference is transformers' stock Llama (its own SDPA attention) run on each sequence
separately, loaded from the same saved folder as the model under test.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from altpo.model import packed_attention as pa
from altpo.model.packed_attention import (
    enable_packed_attention,
    packed_attention_kwargs,
    packed_position_ids,
)

VOCAB = 128
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped kv heads, as in Llama-3
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load(path):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _random_lengths(gen, total, n):
    # n positive lengths summing to total, drawn at random (including a length-1 sequence)
    cuts = sorted(torch.randperm(total - 2, generator=gen)[: n - 2].add(1).tolist())
    bounds = [0] + cuts + [total - 1]
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])] + [1]
    assert sum(lens) == total and min(lens) >= 1
    return lens


def _separate(model, ids, lens):
    outs, start = [], 0
    for n in lens:
        out = model.model(input_ids=ids[None, start : start + n], use_cache=False)
        outs.append(out.last_hidden_state[0])
        start += n
    return torch.cat(outs)


def _packed(model, ids, lens, **extra):
    kw = packed_attention_kwargs(lens, ids.device)
    kw.update(extra)
    pos = packed_position_ids(lens, ids.device)
    return model.model(input_ids=ids[None], position_ids=pos[None], **kw).last_hidden_state[0]


def test_packed_row_matches_each_sequence_alone_hidden_and_grads(model_dir):
    gen = torch.Generator().manual_seed(20240601)
    reference = _load(model_dir)
    model = _load(model_dir)
    assert enable_packed_attention(model, "auto") == "sdpa"  # CPU
    assert model.config._attn_implementation == "altpo_packed_sdpa"

    lens = _random_lengths(gen, 4096, 7)
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=gen)
    probe = torch.randn(sum(lens), 32, generator=gen)

    hidden = _packed(model, ids, lens)
    expected = _separate(reference, ids, lens)
    torch.testing.assert_close(hidden, expected, **TOL)

    (hidden * probe).sum().backward()
    (expected * probe).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name == "lm_head.weight":  # the backbone's hidden states do not reach the head
            assert p.grad is None and q.grad is None
            continue
        scale = q.grad.abs().max().clamp_min(1.0)
        err = (p.grad - q.grad).abs().max() / scale
        assert err < 1e-5, f"{name}: gradient differs by {err:.3g} (relative to max |grad|)"


def test_stock_attention_on_packed_row_leaks_across_sequences(model_dir):
    # Shows the equality test above can fail: without block-diagonal attention the second
    # sequence sees the first.
    torch.manual_seed(7)
    lens = [37, 51, 12]
    ids = torch.randint(0, VOCAB, (sum(lens),))
    pos = packed_position_ids(lens, "cpu")
    stock = _load(model_dir)
    with torch.no_grad():
        expected = _separate(stock, ids, lens)
        # stock transformers with its default key/value cache skips packed-sequence detection
        leaked = stock.model(input_ids=ids[None], position_ids=pos[None]).last_hidden_state[0]
        model = _load(model_dir)
        enable_packed_attention(model, "sdpa")
        # the same path told the whole row is one sequence
        one_segment = _packed(
            model, ids, lens, packed_seq_lens=(sum(lens),),
            cu_seq_lens_q=torch.tensor([0, sum(lens)], dtype=torch.int32),
        )
        good = _packed(model, ids, lens)
    later = slice(lens[0], None)
    assert (leaked[later] - expected[later]).abs().max() > 1e-2
    assert (one_segment[later] - expected[later]).abs().max() > 1e-2
    torch.testing.assert_close(good, expected, **TOL)
    # the first sequence sees nothing before it either way
    torch.testing.assert_close(one_segment[: lens[0]], expected[: lens[0]], **TOL)


def test_segments_derived_from_position_ids_without_kwargs(model_dir):
    torch.manual_seed(11)
    lens = [5, 40, 1, 23]
    ids = torch.randint(0, VOCAB, (sum(lens),))
    model = _load(model_dir)
    enable_packed_attention(model, "sdpa")
    with torch.no_grad():
        pos = packed_position_ids(lens, "cpu")
        got = model.model(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state[0]
        expected = _separate(_load(model_dir), ids, lens)
    torch.testing.assert_close(got, expected, **TOL)


def test_padded_batch_still_works_after_enabling(model_dir):
    torch.manual_seed(3)
    lens = [19, 6, 13]
    width = max(lens)
    ids = torch.randint(0, VOCAB, (len(lens), width))
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1  # right padding
    stock = _load(model_dir)
    model = _load(model_dir)
    enable_packed_attention(model)
    with torch.no_grad():
        got = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for i, n in enumerate(lens):
            alone = stock.model(input_ids=ids[i : i + 1, :n], use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(got[i, :n], alone, **TOL)
        # unpadded rows, no mask at all
        full = model.model(input_ids=ids, use_cache=False).last_hidden_state
        full_stock = stock.model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(full, full_stock, **TOL)


def test_gradient_checkpointing_gives_same_grads(model_dir):
    torch.manual_seed(5)
    lens = [30, 64, 9, 17]
    ids = torch.randint(0, VOCAB, (sum(lens),))
    probe = torch.randn(sum(lens), 32)
    plain, ckpt = _load(model_dir), _load(model_dir)
    for m in (plain, ckpt):
        enable_packed_attention(m, "sdpa")
        m.train()
    # renamed in newer transformers; the GPU image's older one has only the first name
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable({"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    (_packed(plain, ids, lens) * probe).sum().backward()
    (_packed(ckpt, ids, lens) * probe).sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def test_kwargs_contents_hand_computed():
    kw = packed_attention_kwargs([3, 1, 4], "cpu")
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 4, 8]
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 4
    assert kw["packed_seq_lens"] == (3, 1, 4)
    assert kw["use_cache"] is False
    assert packed_position_ids(torch.tensor([3, 1, 4]), "cpu").tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("bad", [[], [3, 0], [2, -1], [1.5]])
def test_bad_seq_lens(bad):
    with pytest.raises(ValueError, match="seq_lens"):
        packed_attention_kwargs(bad, "cpu")


def test_unavailable_or_unknown_backend_is_a_clear_error(model_dir):
    model = _load(model_dir)
    for name in ("flash", "torch-varlen"):
        with pytest.raises(ValueError, match=f"{name}.*unavailable.*CUDA"):
            enable_packed_attention(model, name)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        enable_packed_attention(model, "xformers")


def test_mismatched_lengths_rejected(model_dir):
    model = _load(model_dir)
    enable_packed_attention(model, "sdpa")
    ids = torch.randint(0, VOCAB, (10,))
    kw = packed_attention_kwargs([4, 5], "cpu")
    with pytest.raises(ValueError, match="sum to 9 but the row has 10"):
        model.model(input_ids=ids[None], position_ids=torch.arange(10)[None], **kw)


def _attention_float64(q, k, v, lens, scale):
    """Block-diagonal causal attention in float64 by explicit loops; q [T,Hq,D], k/v [T,Hkv,D]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        for h in range(q.shape[1]):
            qs, ks, vs = q[start:start + n, h], k[start:start + n, h // rep], v[start:start + n, h // rep]
            s = qs @ ks.T * scale
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            out[start:start + n, h] = s.softmax(-1) @ vs
        start += n
    return out


def _fake_kernel(lens, window_style):
    # stands in for the CUDA kernels so the layout and argument plumbing run on CPU
    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert q.dim() == 3 and torch.equal(cu_q, cu_k)
        got_lens = torch.diff(cu_q.long()).tolist()
        assert got_lens == list(lens) and max_q == max(lens)
        if window_style == "flash":
            assert kw["causal"] is True
            scale = kw["softmax_scale"]
        elif window_style == "window":
            assert tuple(kw["window_size"]) == (-1, 0)
            scale = kw["scale"]
            assert kw.get("enable_gqa") or q.shape[1] == k.shape[1]
        else:
            assert kw["is_causal"] is True and "scale" not in kw
            assert q.shape[1] == k.shape[1]  # old signature: kv heads repeated by the caller
            scale = q.shape[-1] ** -0.5
        return _attention_float64(q, k, v, got_lens, scale).to(q.dtype)

    return fake


@pytest.mark.parametrize("style", ["flash", "window", "is_causal"])
def test_varlen_argument_plumbing_against_float64(monkeypatch, style):
    torch.manual_seed(17)
    lens = (9, 1, 22)
    total, hq, hkv, d = sum(lens), 4, 2, 8
    query = torch.randn(1, hq, total, d)
    key = torch.randn(1, hkv, total, d)
    value = torch.randn(1, hkv, total, d)
    kw = packed_attention_kwargs(lens, "cpu")
    fake = _fake_kernel(lens, style)
    if style == "flash":
        monkeypatch.setattr(pa, "_flash_attn_varlen", lambda: fake)
        out = pa._flash_varlen(query, key, value, kw["cu_seq_lens_q"], kw["max_length_q"], d**-0.5, 0.0)
    else:
        if style == "window":
            def sig(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                    scale=None, window_size=(-1, -1), enable_gqa=False):
                return fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            scale=scale, window_size=window_size, enable_gqa=enable_gqa)
        else:
            def sig(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
                return fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
        monkeypatch.setattr(pa, "_torch_varlen", lambda: sig)
        pa._torch_varlen_params.cache_clear()
        try:
            out = pa._torch_varlen_call(query, key, value, kw["cu_seq_lens_q"], kw["max_length_q"], d**-0.5, 0.0)
        finally:
            pa._torch_varlen_params.cache_clear()
    expected = _attention_float64(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), lens, d**-0.5)
    assert out.shape == (1, total, hq, d)
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-6)
    # the segment SDPA path agrees with the same float64 reference
    seg = pa._segment_sdpa(query, key, value, lens, d**-0.5, 0.0)
    torch.testing.assert_close(seg[0].double(), expected, rtol=1e-5, atol=1e-6)
