"""The planner for several GPUs, LoRA and offloaded optimizer states, checked against real models.

FSDP per-rank bytes are counted on a real tiny Llama sharded by ``fully_shard`` as rank 0 of 2
(torch's in-process fake process group: the collectives do nothing, the shard shapes are real),
after a real backward and a real optimizer step; LoRA parameter counts against peft's.
"""

import json

import pytest
import torch
import torch.distributed as tdist

from altpo import cli
from altpo.plan.memory_plan import NAMED_SHAPES, plan_memory, shape_from_config
from altpo.plan.memory_plan_parallel import lora_shapes, parameter_memory, shard_numel


def _tiny(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=100, vocab_size=301,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return cfg, LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture
def fake_two_ranks():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    tdist.destroy_process_group()


def _local_bytes(tensors):
    return sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local")
               else t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("tie,lora_rank", [(False, 0), (True, 0), (False, 3)])
def test_fsdp_rank_bytes_match_a_real_sharded_model(fake_two_ranks, tie, lora_rank):
    from altpo.data.packing import pack_micro_batches, sequence_units
    from altpo.model.packed_attention import enable_packed_attention
    from altpo.train.fsdp import ShardedOptimizer, shard
    from altpo.train.master_weights import MixedPrecisionAdamW
    from altpo.train.step import PackedAltPOLoss

    cfg, model = _tiny(tie)
    targets = ("q_proj", "v_proj", "down_proj")
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        get_peft_model(model, LoraConfig(r=lora_rank, target_modules=list(targets), lora_dropout=0.0),
                       autocast_adapter_dtype=False)
    enable_packed_attention(model, "sdpa")
    root = shard(PackedAltPOLoss(model, loss_backend="torch"), 2, torch.device("cpu"))
    opt = ShardedOptimizer(model.named_parameters(), lambda named, norm_reduce: MixedPrecisionAdamW(
        named, lr=1e-3, master_weights="fp32", norm_reduce=norm_reduce))
    ids = torch.randint(0, cfg.vocab_size, (23,)).tolist()
    mb = pack_micro_batches(sequence_units([(ids, [-100] * 5 + ids[5:])]), 64)[0]
    root(mb, logprobs_only=True).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = _local_bytes([p.grad for p in trainable])
    opt.step(1e-3, 1.0)
    state = opt.inner.state_tensors()

    shape = shape_from_config(cfg)
    want = parameter_memory(shape, b=2, gpus=2, parallel="fsdp", lora_rank=lora_rank,
                            lora_targets=targets, master_weights="fp32", optimizer_offload="none",
                            offload_update="cpu", optimizer_in_backward=False, chunk_numel=1 << 24)
    assert _local_bytes(model.parameters()) == want["weights"]
    assert grad_bytes == 2 * want["trainable_parameters_on_this_gpu"]
    masters = sum(v.numel() * 4 for k, v in state.items() if k.startswith("master."))
    moments = sum(v.numel() * 4 for k, v in state.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert masters == want["master_weights"] and moments == want["optimizer_states"]
    # the plan's components carry exactly these bytes for the shards
    plan = plan_memory(cfg, 1 << 40, gpus=2, parallel="fsdp", lora_rank=lora_rank,
                       lora_targets=targets, master_weights="fp32", find_smallest_gpus=False)
    assert plan.components["weights"] == want["weights"]
    assert plan.components["optimizer_states"] == moments
    assert plan.components["master_weights"] == masters


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    cfg, model = _tiny(False)
    peft_model = get_peft_model(model, LoraConfig(r=5, target_modules=["q_proj", "k_proj", "up_proj"]))
    trainable = {n.replace("base_model.model.", "").replace(".default", ""): tuple(p.shape)
                 for n, p in peft_model.named_parameters() if p.requires_grad}
    shape = shape_from_config(cfg)
    assert trainable == dict(lora_shapes(shape, 5, ("q_proj", "k_proj", "up_proj")))
    assert shape.lora_parameters(5, ("q_proj", "k_proj", "up_proj")) == sum(
        torch.Size(s).numel() for s in trainable.values())


def test_shards_follow_torch_chunk():
    for rows, world in ((7, 2), (301, 4), (5, 8), (128256, 8)):
        parts = torch.zeros(rows, 3).chunk(world)
        for rank in range(world):
            got = shard_numel((rows, 3), world, rank)
            assert got == (parts[rank].numel() if rank < len(parts) else 0)


def test_named_shape_llama_2_7b_has_its_parameter_count():
    assert NAMED_SHAPES["llama-2-7b"].num_parameters() == 6_738_415_616


def test_cuda_context_is_counted_so_a_16gb_card_fits_what_the_plan_says():
    card = 16 * 10**9  # a real "16 GB" card: what it has in all, context included
    plan = plan_memory("llama-3.2-1b", card, master_weights="auto", optimizer_in_backward="auto")
    assert plan.components["cuda_context"] >= 300 * 2**20
    assert plan.total_bytes == sum(plan.components.values())
    assert not plan.fits  # full-parameter 1B with on-GPU states does not fit beside the context
    offloaded = plan_memory("llama-3.2-1b", card, master_weights="auto", optimizer_offload="cpu")
    assert offloaded.fits and offloaded.total_bytes <= card
    assert offloaded.components["optimizer_states"] == 0 == offloaded.components["master_weights"]
    assert offloaded.details["host_memory_for_optimizer_states"] == 12 * 1_235_814_400
    # the budget without the context: what it leaves for PyTorch
    free = plan_memory("llama-3.2-1b", card, optimizer_offload="cpu", cuda_context_bytes=0)
    assert "cuda_context" not in free.components


def test_smallest_gpu_count_is_the_smallest_that_fits():
    plan = plan_memory("llama-3.1-8b", 40 * 10**9, master_weights="auto", optimizer_in_backward="auto")
    assert not plan.fits
    n = plan.details["smallest_gpus"]
    assert n > 1
    assert plan_memory("llama-3.1-8b", 40 * 10**9, gpus=n, parallel="fsdp", master_weights="auto").fits
    assert not plan_memory("llama-3.1-8b", 40 * 10**9, gpus=n - 1, parallel="fsdp" if n > 2 else "ddp",
                           master_weights="auto").fits
    assert any(f"fits on {n} GPUs" in note for note in plan.notes)
    # DDP does not shrink with more GPUs
    ddp = plan_memory("llama-3.1-8b", 40 * 10**9, gpus=8, parallel="ddp", master_weights="auto")
    assert not ddp.fits


def test_plan_command_speaks_the_train_flags(capsys):
    base = ["plan", "--model", "llama-3.2-1b", "--gpu-memory", "24GiB", "--json"]
    results = []
    for flags in (["--gradient-checkpointing", "on", "--optimizer-in-backward", "off"],
                  ["--checkpointing", "layers", "--optimizer-in-backward", "no"]):
        cli.main(base + flags)
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["settings"]["checkpointing"] == "layers"

    assert cli.main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "80GB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "on each of 8 GPUs (fsdp)" in out and "gathered_weights" in out
    assert "train with: --tokens-per-microbatch" in out and "--parallel fsdp" in out
    assert "host memory per process" in out

    assert cli.main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB", "--lora-rank", "16"]) == 0
    assert "--lora-rank 16" in capsys.readouterr().out
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB", "--lora-rank", "4",
                     "--lora-targets", "q_proj,nope"]) == 2
    assert "nope" in capsys.readouterr().err
