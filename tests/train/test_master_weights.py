"""Exact bf16 updates: fp32 master weights and Kahan-compensated bf16 against a float64 AdamW."""

import math

import pytest
import torch

from altpo.train.master_weights import MixedPrecisionAdamW, NonFiniteGradientError

LR, WD, BETAS, EPS, MAX_NORM = 1e-4, 0.01, (0.9, 0.999), 1e-8, 1.0
SHAPES = {"w1": (24, 16), "w2": (16,), "w3": (8, 24)}


def _adamw_float64(init, grads, steps):
    """AdamW (decoupled decay, bias correction, global-norm clipping) written out in float64."""
    p = {n: t.double().clone() for n, t in init.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    for t in range(1, steps + 1):
        g = {n: x.double() for n, x in grads[t - 1].items()}
        norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        coef = min(1.0, MAX_NORM / (norm + 1e-6))
        for n in p:
            gn = g[n] * coef
            m[n] = BETAS[0] * m[n] + (1 - BETAS[0]) * gn
            v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * gn * gn
            mhat = m[n] / (1 - BETAS[0] ** t)
            vhat = v[n] / (1 - BETAS[1] ** t)
            decay = WD if p[n].dim() >= 2 else 0.0
            p[n] = p[n] - LR * decay * p[n] - LR * mhat / (vhat.sqrt() + EPS)
    return p


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    # weights near 1: a bf16 step there is 2^-7, so 1e-4 updates vanish without compensation
    return {n: (1.0 + 0.5 * torch.rand(s, generator=g)).to(torch.bfloat16) for n, s in SHAPES.items()}


def _grads(seed, steps):
    g = torch.Generator().manual_seed(seed + 1)
    # a steady drift plus noise (so the weights move), norms around 1 (clipping on some steps)
    # rounded to bf16 here, as the model's gradients are, so the reference sees the same values
    return [{n: ((0.5 + torch.randn(s, generator=g)) * 0.15 * (1 + 0.5 * math.sin(i)))
             .to(torch.bfloat16).float() for n, s in SHAPES.items()} for i in range(steps)]


def _run(mode, init, grads, steps, start=None, chunk=1 << 24):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = MixedPrecisionAdamW(params.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                              master_weights=mode, chunk_numel=chunk)
    if start is not None:
        opt.load_state_tensors(start)
    for g in grads[:steps]:
        for n, p in params.items():
            p.grad = g[n].to(p.dtype)
        opt.step(LR, MAX_NORM)
    return params, opt


@pytest.mark.parametrize("mode", ["fp32", "kahan"])
def test_low_precision_weights_follow_float64_adamw(mode):
    seed = 4141
    steps = 150
    init, grads = _params(seed), _grads(seed, steps)
    ref = _adamw_float64(init, grads, steps)
    moved = max(float((ref[n] - init[n].double()).abs().max()) for n in init)
    assert moved > 5e-3  # the weights really moved, by less than one bf16 step per update

    params, opt = _run(mode, init, grads, steps)
    exact = dict(zip(opt.names, opt.exact_weights()))
    err = max(float((exact[n].double() - ref[n]).abs().max()) for n in init)
    if mode == "fp32":
        # torch's AdamW multiplies by (1 - lr*wd) rounded to fp32: ~1e-7 off per step, systematic
        assert err < 3e-5
        for n, p in params.items():  # the bf16 weight is the master rounded
            assert torch.equal(p.data, exact[n].to(torch.bfloat16))
    else:
        # the remainder is itself kept in bf16, so each step adds a random ~1e-6..1e-5 error:
        # a random walk far below one bf16 step (7.8e-3) and the ~1e-2 the weights moved
        assert err < 4e-4
    # the bf16 weights themselves are within one rounding of the exact values
    for n, p in params.items():
        assert float((p.data.double() - ref[n]).abs().max()) <= 2 ** -7 * 1.51

    plain, _ = _run("none", init, grads, steps)
    plain_err = max(float((plain[n].data.double() - ref[n]).abs().max()) for n in init)
    assert plain_err > 20 * err  # without compensation most updates round away


@pytest.mark.parametrize("mode", ["fp32", "kahan", "none"])
@pytest.mark.parametrize("chunk", [1 << 24, 37])
def test_state_round_trip_continues_bit_for_bit(mode, chunk):
    init, grads = _params(7), _grads(7, 40)
    whole, _ = _run(mode, init, grads, 40, chunk=chunk)
    first, opt = _run(mode, init, grads, 25, chunk=chunk)
    state = {k: v.clone() for k, v in opt.state_tensors().items()}
    # one tensor per parameter, in the parameter's shape, whatever the chunking
    for key, value in state.items():
        name = key.split(".")[1] if key.count(".") >= 1 else key
        if name in SHAPES and not key.endswith(".step"):
            assert tuple(value.shape) == SHAPES[name], key
    midway = {n: p.data.clone() for n, p in first.items()}
    resumed, _ = _run(mode, midway, grads[25:], 15, start=state, chunk=chunk)
    for n in init:
        assert torch.equal(resumed[n].data, whole[n].data), n


@pytest.mark.parametrize("mode", ["fp32", "kahan"])
def test_chunked_update_equals_whole_tensor_update(mode):
    """Chunks of 37 elements (no shape is a multiple) give the whole-tensor result."""
    init, grads = _params(11), _grads(11, 30)
    whole, opt_whole = _run(mode, init, grads, 30)
    chunked, opt_chunked = _run(mode, init, grads, 30, chunk=37)
    for a, b in zip(opt_whole.exact_weights(), opt_chunked.exact_weights()):
        # only the clipping norm's summation order differs
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)
    for n in init:
        assert float((chunked[n].data.float() - whole[n].data.float()).abs().max()) <= 2 ** -7


def test_non_finite_gradient_applies_nothing():
    init = _params(3)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = MixedPrecisionAdamW(params.items(), lr=LR, weight_decay=WD, master_weights="fp32")
    for n, p in params.items():
        p.grad = torch.randn_like(p)
    params["w2"].grad[3] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step(LR, MAX_NORM)
    for n, p in params.items():
        assert torch.equal(p.data, init[n]) and p.grad is None


def test_fp32_weights_use_plain_adamw():
    params = {"w": torch.nn.Parameter(torch.randn(4, 4))}
    opt = MixedPrecisionAdamW(params.items(), lr=LR, master_weights="kahan")
    assert opt.mode == "none"
