"""AdamW with host-memory states (both update placements) against the on-device optimizer.

Random bf16 and fp32 parameters of odd shapes (one larger than a chunk), random gradients, three
steps with clipping: the offloaded optimizer must give the weights MixedPrecisionAdamW gives in
fp32-master mode (bf16) and torch's AdamW gives (fp32), and its state must round-trip.
"""

import pytest
import torch
from safetensors.torch import load_file

from altpo.train import train
from altpo.train.config import TrainConfig
from altpo.train.master_weights import MixedPrecisionAdamW, NonFiniteGradientError
from altpo.train.optimizer_offload import OffloadedAdamW
from train_fixtures import base_settings, build_model_folder

SHAPES = [(37, 13), (5,), (3, 7, 11)]
CHUNK = 97  # smaller than the first parameter: several chunks per tensor


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g) * (0.5 + step)).to(dtype) for s in SHAPES]


def _run(opt, params, dtype, steps=3, lrs=(1e-2, 5e-3, 2e-3)):
    norms = []
    for step in range(steps):
        for p, g in zip(params, _grads(step, dtype)):
            p.grad = g.clone()
        norms.append(opt.step(lrs[step], max_grad_norm=1.0))
    return norms


@pytest.mark.parametrize("update", ["cpu", "stream"])
def test_offloaded_bf16_matches_fp32_master_adamw(update):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref_params, off_params = _params(torch.bfloat16), _params(torch.bfloat16)
    ref = MixedPrecisionAdamW([(f"p{i}", p) for i, p in enumerate(ref_params)], master_weights="fp32",
                              chunk_numel=CHUNK, **kw)
    off = OffloadedAdamW([(f"p{i}", p) for i, p in enumerate(off_params)], master_weights="fp32",
                         update=update, chunk_numel=CHUNK, **kw)
    assert off.mode == "fp32"
    n_ref, n_off = _run(ref, ref_params, torch.bfloat16), _run(off, off_params, torch.bfloat16)
    assert n_off == pytest.approx(n_ref, rel=1e-6)
    start = _params(torch.bfloat16)
    for a, b, s in zip(ref_params, off_params, start):
        assert not torch.equal(a, s)
        assert torch.equal(a, b)  # the same fp32 arithmetic rounds to the same bf16 weights
    sa, sb = ref.state_tensors(), off.state_tensors()
    for key in sb:
        torch.testing.assert_close(sb[key].float(), sa[key].float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("update", ["cpu", "stream"])
def test_offloaded_fp32_matches_torch_adamw_and_resumes(update):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref_params, off_params = _params(torch.float32), _params(torch.float32)
    groups = [{"params": [p for p in ref_params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in ref_params if p.dim() < 2], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    off = OffloadedAdamW([(f"p{i}", p) for i, p in enumerate(off_params)], update=update,
                         chunk_numel=CHUNK, **kw)
    for step, lr in enumerate((1e-2, 5e-3)):
        grads = _grads(step, torch.float32)
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        coef = min(1.0, 1.0 / (float(norm) + 1e-6))
        for p, g in zip(ref_params, grads):
            p.grad = g * coef
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        for p, g in zip(off_params, grads):
            p.grad = g.clone()
        off.step(lr, max_grad_norm=1.0)
    for a, b in zip(ref_params, off_params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    # state round trip: a fresh optimizer loaded with the state takes the same next step
    again = [torch.nn.Parameter(p.detach().clone()) for p in off_params]
    other = OffloadedAdamW([(f"p{i}", p) for i, p in enumerate(again)], update=update,
                           chunk_numel=CHUNK, **kw)
    other.load_state_tensors(off.state_tensors())
    for params, opt in ((off_params, off), (again, other)):
        for p, g in zip(params, _grads(7, torch.float32)):
            p.grad = g
        opt.step(1e-3, max_grad_norm=1.0)
    for a, b in zip(off_params, again):
        assert torch.equal(a, b)


def test_non_finite_gradient_changes_nothing():
    params = _params(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    off = OffloadedAdamW([(f"p{i}", p) for i, p in enumerate(params)], lr=1e-2)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteGradientError):
        off.step(1e-2, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("update,parallel", [("cpu", "ddp"), ("stream", "ddp"), ("cpu", "fsdp")])
def test_training_with_offloaded_states_matches_on_device_states(tofu_dir, tmp_path, update, parallel):
    model_dir = build_model_folder(tofu_dir, tmp_path / "model")
    runs = {}
    for name, extra in (("device", {}), ("host", {"optimizer_offload": "cpu", "offload_update": update,
                                                      "parallel": parallel})):
        out = tmp_path / name
        assert train(TrainConfig(**base_settings(tofu_dir, model_dir, out, max_steps=2, **extra))).completed
        runs[name] = load_file(str(out / "model.safetensors"))
    start = load_file(str(model_dir / "model.safetensors"))
    for key, w in runs["device"].items():
        assert not torch.equal(w, start[key])
        torch.testing.assert_close(runs["host"][key], w, rtol=1e-5, atol=1e-6)
