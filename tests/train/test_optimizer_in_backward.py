"""The optimizer step inside backward reaches the weights of the accumulate-then-step path.

Both paths start from the same tiny Llama and run 3 AltPO steps of several micro-batches each:
the reference is ``forward_backward`` followed by ``MixedPrecisionAdamW.step`` (its own tests
check it against torch's AdamW), the path under test is ``optimizer_step_in_backward``. Checked
with clipping active (a max norm far below the measured norm), without clipping, in fp32 and in
bf16 with fp32 master weights and with Kahan buffers, with layer checkpointing and offloaded
checkpoints; plus the trainer's resume with the setting on.
"""

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from altpo.model.activation_checkpointing import enable_activation_checkpointing, offload_saved_tensors
from altpo.train.master_weights import MixedPrecisionAdamW, NonFiniteGradientError
from altpo.train.optimizer_in_backward import optimizer_step_in_backward
from altpo.model.packed_attention import enable_packed_attention
from altpo.data.packing import ROLE_ALTERNATE, ROLE_FORGET, ROLE_RETAIN, PackUnit, pack_micro_batches
from altpo.train.step import PackedAltPOLoss, forward_backward, step_normalisers

VOCAB = 80
LR = 3e-3


def _model_folder(path, tied):
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("tiny_oib_tied"), True)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("tiny_oib_untied"), False)


def _units(rng):
    def seq():
        prompt, answer = rng.randint(3, 10), rng.randint(2, 12)
        ids = [rng.randrange(VOCAB) for _ in range(prompt + answer)]
        return ids, [-100] * prompt + ids[prompt:]

    units = []
    for q in range(3):
        k = rng.randint(1, 2)
        refs = [(rng.uniform(-50, -20), rng.uniform(-50, -20)) for _ in range(k)]
        units.append(PackUnit([seq() for _ in range(k + 1)], [ROLE_FORGET] + [ROLE_ALTERNATE] * k,
                              [(j, 0) for j in range(1, k + 1)], refs, key=q))
    for r in range(4):
        units.append(PackUnit([seq()], [ROLE_RETAIN], retain=[0], key=("r", r)))
    return units


def _run(model_dir, steps_units, *, in_backward, dtype, master, max_norm, checkpointing="none"):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    enable_packed_attention(model, "sdpa")
    model.train()
    if checkpointing != "none":
        enable_activation_checkpointing(model, checkpointing)
    context = (lambda: offload_saved_tensors(True, "cpu")) if checkpointing == "offload" else None
    loss_module = PackedAltPOLoss(model, loss_backend="torch")
    opt = MixedPrecisionAdamW(model.named_parameters(), lr=LR, master_weights=master)
    norms = []
    for units in steps_units:
        num_pairs, num_retain = step_normalisers(units)
        mbs = pack_micro_batches(units, max(u.num_tokens for u in units) + 4)
        assert len(mbs) >= 2
        if in_backward:
            stats = optimizer_step_in_backward(loss_module, opt, mbs, num_pairs=num_pairs,
                                               num_retain_tokens=num_retain, lr=LR,
                                               max_grad_norm=max_norm, forward_context=context)
        else:
            stats = forward_backward(loss_module, mbs, num_pairs=num_pairs,
                                     num_retain_tokens=num_retain, forward_context=context)
            stats.grad_norm = opt.step(LR, max_norm)
        norms.append(stats.grad_norm)
        assert all(p.grad is None for p in model.parameters())
    return opt.exact_weights(), norms


def _three_steps(folder, dtype, master, checkpointing, clipping):
    rng = random.Random(9091)
    steps_units = [_units(rng) for _ in range(3)]
    # the tiny model's step gradients have norms of 10-40: a max norm of 1 clips every step
    max_norm = 1.0 if clipping else 0.0
    base, base_norms = _run(folder, steps_units, in_backward=False, dtype=dtype, master=master,
                            max_norm=max_norm, checkpointing=checkpointing)
    assert all(n > 3 for n in base_norms)
    got, got_norms = _run(folder, steps_units, in_backward=True, dtype=dtype, master=master,
                          max_norm=max_norm, checkpointing=checkpointing)
    start = [p.detach().float() for p in LlamaForCausalLM.from_pretrained(folder).parameters()]
    for p0, want in zip(start, base):
        assert float((want - p0).abs().max()) > LR  # every parameter was trained
    return base, base_norms, got, got_norms


@pytest.mark.parametrize("clipping", [True, False])
def test_three_fp32_steps_reach_the_accumulating_path(model_dir, clipping):
    """Tied embedding, fp32: its gradient (loss part plus embedding part) is summed in another
    order, the only difference; 3 steps move a weight by about 3 * LR, they agree to 1e-4 of it."""
    base, base_norms, got, got_norms = _three_steps(model_dir, torch.float32, "none", "none", clipping)
    assert got_norms == pytest.approx(base_norms, rel=1e-5)
    for w, want in zip(got, base):
        assert float((w - want).abs().max()) <= 1e-4 * 3 * LR


@pytest.mark.parametrize("master,checkpointing", [("fp32", "offload"), ("kahan", "layers")])
def test_three_bf16_steps_are_bit_exact_without_tied_embeddings(untied_model_dir, master, checkpointing):
    """Untied weights: every gradient is summed in the accumulating path's order, so bf16
    weights, fp32 masters or Kahan buffers, and the clipped norms are the same bits."""
    base, base_norms, got, got_norms = _three_steps(untied_model_dir, torch.bfloat16, master,
                                                    checkpointing, True)
    assert got_norms == base_norms
    for w, want in zip(got, base):
        assert torch.equal(w, want)


def test_non_finite_loss_updates_nothing(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enable_packed_attention(model, "sdpa")
    units = _units(random.Random(3))
    units[0].ref_logps[0] = (float("nan"), -20.0)
    num_pairs, num_retain = step_normalisers(units)
    opt = MixedPrecisionAdamW(model.named_parameters(), lr=LR, master_weights="none")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError):
        optimizer_step_in_backward(PackedAltPOLoss(model, loss_backend="torch"), opt,
                                   pack_micro_batches(units, 64), num_pairs=num_pairs,
                                   num_retain_tokens=num_retain, lr=LR, max_grad_norm=1.0)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
        assert p.grad is None


def test_trainer_resume_is_bit_exact_with_the_update_in_backward(tofu_dir, tmp_path_factory, tmp_path):
    """bf16 weights, fp32 master weights, clipping on: SIGTERM after step 1, resume, and the
    final weights equal an uninterrupted run's bit for bit; the same run with the setting off
    reaches them to bf16 rounding."""
    import os
    import signal

    from altpo.train import train
    from altpo.train.config import TrainConfig
    from train_fixtures import base_settings, build_model_folder

    model = build_model_folder(tofu_dir, tmp_path_factory.mktemp("tiny_tofu_oib"))
    settings = dict(max_steps=3, dtype="bf16", master_weights="fp32", lr=1e-3, max_grad_norm=0.5,
                    optimizer_in_backward="on", tokens_per_microbatch="800")
    whole = train(TrainConfig(**base_settings(tofu_dir, model, tmp_path / "whole", **settings)))
    assert whole.completed
    assert all(r["micro_batches"] >= 2 for r in whole.history)
    assert all(r["grad_norm"] > 0.5 for r in whole.history)  # every step clipped

    out = tmp_path / "split"
    config = TrainConfig(**base_settings(tofu_dir, model, out, **settings))

    def stop_at_step_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(config, on_step=stop_at_step_1)
    assert first.interrupted == "SIGTERM" and first.steps_done < 3
    rest = train(TrainConfig(**{**config.to_dict(), "resume": True}))
    assert rest.completed and rest.steps_done == 3
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name

    off = train(TrainConfig(**base_settings(tofu_dir, model, tmp_path / "off",
                                            **{**settings, "optimizer_in_backward": "off"})))
    c = load_file(str(tmp_path / "off" / "model.safetensors"))
    for name in a:
        # a bf16 weight may land one rounding step apart (the tied embedding's gradient sum)
        diff = (a[name].float() - c[name].float()).abs()
        assert float((diff > 1e-2 * c[name].float().abs() + 1e-6).float().mean()) < 0.01, name
    losses = [r["loss"] for r in off.history]
    assert [r["loss"] for r in whole.history] == pytest.approx(losses, rel=1e-2)


def test_setting_reads_on_off_from_yaml_and_flags(tmp_path):
    """YAML reads a bare on/off as a boolean; the setting must still come out as on/off."""
    from altpo.train.config import TrainConfig, convert_value, resolve_config

    for text in ("on", "off", "auto"):
        path = tmp_path / f"{text}.yaml"
        path.write_text(f"optimizer-in-backward: {text}\n")
        assert resolve_config({}, config_file=path).optimizer_in_backward == text
        assert convert_value("optimizer_in_backward", text, "--optimizer-in-backward") == text
    from altpo.cli import UserError

    with pytest.raises(UserError, match="optimizer-in-backward must be one of auto, on, off"):
        TrainConfig(model="m", alternates="a", output="o", optimizer_in_backward="yes").validate()
