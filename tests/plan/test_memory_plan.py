"""The memory planner: exact parameter-proportional bytes, the activation formula against what
autograd really saves, the Llama-3.2-1B 16 GiB / 8 GiB behaviour, and the ``plan`` command."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from altpo import cli
from altpo.plan import memory_plan as mp
from altpo.model.activation_checkpointing import enable_activation_checkpointing, offload_saved_tensors
from altpo.plan.memory_plan import (
    NAMED_SHAPES,
    PlanError,
    activation_bytes_per_token,
    load_model_shape,
    parse_bytes,
    plan_memory,
    shape_from_config,
)
from altpo.model.packed_attention import enable_packed_attention, packed_attention_kwargs, packed_position_ids

GIB = 2**30


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors appear once


TINY = [
    (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    (LlamaConfig, LlamaForCausalLM, dict(head_dim=24, tie_word_embeddings=False)),
    (MistralConfig, MistralForCausalLM, dict()),
    (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
]


@pytest.mark.parametrize("config_cls,model_cls,extra", TINY)
def test_parameter_count_exact_against_real_model(config_cls, model_cls, extra, tmp_path):
    gen = torch.Generator().manual_seed(677)
    h = 16 * int(torch.randint(2, 5, (1,), generator=gen))
    cfg = config_cls(hidden_size=h, intermediate_size=3 * h + 8, num_hidden_layers=int(torch.randint(1, 4, (1,), generator=gen)),
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=int(torch.randint(50, 300, (1,), generator=gen)),
                     **extra)
    model = model_cls(cfg)
    model.save_pretrained(tmp_path)
    from_folder = load_model_shape(str(tmp_path))
    assert from_folder.num_parameters() == _numel(model)
    assert shape_from_config(cfg).num_parameters() == _numel(model)
    # the largest single tensor and one layer's parameters, from the real modules
    assert from_folder.largest_parameter() == max(p.numel() for p in model.parameters())
    assert from_folder.layer_parameters() == _numel(model.model.layers[0])


def test_named_shapes_match_published_counts_and_meta_models():
    published = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}
    for name, count in published.items():
        shape = NAMED_SHAPES[name]
        assert shape.num_parameters() == count
        cfg = LlamaConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                          num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                          intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                          tie_word_embeddings=shape.tie_word_embeddings, head_dim=shape.head_dim)
        with torch.device("meta"):
            assert _numel(LlamaForCausalLM(cfg)) == count


def test_parameter_proportional_bytes_exact():
    shape = NAMED_SHAPES["llama-3.2-1b"]
    p = 1_235_814_400
    layer = 60_821_504  # q 2048^2 + k,v 2048*512 each + o 2048^2 + 3*2048*8192 + 2 norms * 2048
    vh = 128_256 * 2048
    budget = 1 << 50  # large enough that every option fits
    for master, master_bytes in (("fp32", 4 * p), ("kahan", 2 * p), ("none", 0)):
        plan = plan_memory(shape, budget, master_weights=master, optimizer_in_backward=False,
                           checkpointing="layers", reference="resident")
        c = plan.components
        assert c["weights"] == 2 * p
        assert c["master_weights"] == master_bytes
        assert c["optimizer_states"] == 8 * p
        assert c["gradients"] == 2 * p
        assert c["reference"] == 2 * p
    plan = plan_memory(shape, budget, optimizer_in_backward=True, checkpointing="layers")
    assert plan.components["gradients"] == 2 * layer + 2 * vh  # one layer in flight + the tied embedding
    assert plan.components["reference"] == 0
    fp32 = plan_memory(shape, budget, weight_dtype="fp32", optimizer_in_backward=False)
    assert fp32.components["weights"] == 4 * p and fp32.components["master_weights"] == 0


def test_components_sum_to_total_and_grow_with_tokens():
    shape = NAMED_SHAPES["llama-3.2-3b"]
    totals = []
    for t in (512, 1024, 4096):
        plan = plan_memory(shape, 1 << 50, tokens_per_microbatch=t, checkpointing="layers",
                           optimizer_in_backward=False)
        assert plan.total_bytes == sum(plan.components.values())
        assert plan.tokens_per_microbatch == t and plan.checkpointing and plan.fits
        totals.append(plan.total_bytes)
    assert totals[0] < totals[1] < totals[2]


def _saved_bytes(model, lens):
    """Bytes of the distinct non-parameter tensors autograd saves during a packed forward."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (sum(lens),))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids[None], position_ids=packed_position_ids(lens, "cpu")[None],
                    **packed_attention_kwargs(lens, "cpu"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_activation_formula_equals_saved_tensors_of_a_real_bf16_llama():
    torch.manual_seed(2)
    layers, h, hd = 3, 64, 16
    cfg = LlamaConfig(hidden_size=h, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, head_dim=hd)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    enable_packed_attention(model, "sdpa")
    lens = [300, 212]
    t = sum(lens)
    act = activation_bytes_per_token(shape_from_config(cfg), "bf16", attention="sdpa")
    # the formula's A_final includes what the loss keeps (hidden bH, 24 bytes of per-token
    # vectors), which this backbone-only forward does not create
    loss_part = 2 * h + 24
    measured = _saved_bytes(model, lens)
    assert measured == t * (layers * act["layer"] + act["final"] - loss_part)

    enable_activation_checkpointing(model, "layers")
    measured = _saved_bytes(model, lens)
    # checkpointed layers keep their inputs; RoPE cos/sin reach them as keyword arguments, which
    # stay alive without passing through the saved-tensor hooks, so the hooks do not see them
    rope = 2 * 2 * hd
    assert measured == t * (layers * 2 * h + act["final"] - loss_part - rope)


def test_checkpointing_modes_give_identical_gradients():
    torch.manual_seed(4)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100)
    base = LlamaForCausalLM(cfg)
    lens = [20, 33]
    ids = torch.randint(0, 100, (sum(lens),))
    probe = torch.randn(sum(lens), 32)
    grads = {}
    for mode in ("none", "layers", "offload"):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        model.train()
        enable_packed_attention(model, "sdpa")
        enable_activation_checkpointing(model, mode)
        with offload_saved_tensors(mode == "offload", "cpu"):
            out = model.model(input_ids=ids[None], position_ids=packed_position_ids(lens, "cpu")[None],
                              **packed_attention_kwargs(lens, "cpu")).last_hidden_state[0]
        (out * probe).sum().backward()
        grads[mode] = [p.grad.clone() for p in model.model.parameters()]
    for mode in ("layers", "offload"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="checkpointing mode"):
        enable_activation_checkpointing(model, "sometimes")


def test_llama_1b_fits_16gib_with_fp32_optimizer_states():
    plan = plan_memory("llama-3.2-1b", 16 * GIB, master_weights="auto")
    assert plan.fits and plan.total_bytes <= 16 * GIB
    assert plan.components["optimizer_states"] == 8 * 1_235_814_400  # fp32 AdamW moments
    assert plan.master_weights == "kahan"  # fp32 masters cannot fit: 14 bytes/param > 16 GiB
    assert plan.optimizer_in_backward and plan.checkpointing
    assert plan.reference == "cached"
    assert plan.tokens_per_microbatch >= 512


def test_llama_1b_does_not_fit_8gib_and_names_the_smallest_budget(capsys):
    plan = plan_memory("llama-3.2-1b", 8 * GIB, master_weights="auto")
    assert not plan.fits
    smallest = plan.smallest_budget_bytes
    assert 8 * GIB < smallest <= 16 * GIB
    assert plan_memory("llama-3.2-1b", smallest, master_weights="auto").fits
    assert not plan_memory("llama-3.2-1b", smallest - 1, master_weights="auto").fits
    assert any("cannot fit" in n for n in plan.notes)

    assert cli.main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "8GiB"]) == 1
    out = capsys.readouterr().out
    assert "fits: NO" in out and "smallest budget that fits:" in out


def test_explicit_fp32_masters_at_16gib_do_not_fit_and_point_to_kahan():
    plan = plan_memory("llama-3.2-1b", 16 * GIB, master_weights="fp32")
    assert not plan.fits
    assert any("kahan" in n for n in plan.notes)


def test_plan_command_table_and_json(capsys):
    assert cli.main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "optimizer_states" in out and "loss_workspace" in out

    assert cli.main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "80GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"components", "total_bytes", "fits", "settings"} <= data.keys()
    assert data["total_bytes"] == sum(data["components"].values())
    assert data["fits"] is True and data["gpu_memory_bytes"] == 80 * 10**9
    assert {"tokens_per_microbatch", "checkpointing", "master_weights", "reference"} <= data["settings"].keys()
    assert data["settings"]["master_weights"] == "fp32"  # 80 GB leaves room for fp32 masters


def test_plan_command_local_folder(tmp_path, capsys):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--gpu-memory", "1GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["details"]["num_parameters"] == _numel(model)
    assert data["components"]["weights"] == 2 * _numel(model)


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-3.2-1b", "--gpu-memory", "16"], "write a number and a unit"),
    (["--model", "llama-3.2-1b", "--gpu-memory", "16 potatoes"], "cannot read the size"),
    (["--model", "llama-9"], None),  # no GPU here and no --gpu-memory: checked first
    (["--model", "llama-9", "--gpu-memory", "16GiB"], "not a named shape"),
    (["--model", "llama-3.2-1b", "--gpu-memory", "16GiB", "--tokens-per-microbatch", "100"], "below the longest sequence"),
])
def test_plan_command_errors(argv, message, capsys):
    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible, so the budget has a default")
        message = "no GPU is visible"
    assert cli.main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_command_folder_without_config_and_offline_hub(tmp_path, monkeypatch, capsys):
    assert cli.main(["plan", "--model", str(tmp_path), "--gpu-memory", "16GiB"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["plan", "--model", "someone/some-model", "--gpu-memory", "16GiB"]) == 2
    err = capsys.readouterr().err
    assert "hub is not reachable" in err and "named shape" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert cli.main(["plan", "--model", str(tmp_path), "--gpu-memory", "16GiB"]) == 2
    assert "'bert' is not supported" in capsys.readouterr().err


def test_parse_bytes_hand_computed():
    assert parse_bytes("16GiB") == 17_179_869_184
    assert parse_bytes("80GB") == 80_000_000_000
    assert parse_bytes("1.5 TiB") == 1_649_267_441_664
    assert parse_bytes("512mib") == 536_870_912
    for bad in ("16", "GiB", "-3GB", "0GiB", "16 G"):
        with pytest.raises(PlanError):
            parse_bytes(bad)


def test_bad_api_options():
    with pytest.raises(PlanError, match="checkpointing must be one of"):
        plan_memory("llama-3.2-1b", 16 * GIB, checkpointing="sometimes")
    with pytest.raises(PlanError, match="master_weights must be one of"):
        plan_memory("llama-3.2-1b", 16 * GIB, master_weights="fp64")
    with pytest.raises(PlanError, match="gpu_memory_bytes"):
        plan_memory("llama-3.2-1b", -5)
    assert mp.SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")


def test_loss_workspace_band_covers_the_kernels_workspace():
    """The planner's fp32 dW-band term is at least the chunked backward's whole workspace."""
    import torch

    from altpo.plan import memory_plan
    from altpo_kernels.chunked_backward import workspace_bytes

    h, v = 2048, 128256
    for n in (4096, 16384, 65536):
        for backend in ("triton", "torch"):
            assert 4 * min(v, memory_plan.LOSS_DW_BAND_ROWS) * h >= workspace_bytes(
                n, h, v, torch.bfloat16, backend=backend)