"""``--parallel auto`` asks the planner; combinations that cannot work fail before any work."""

from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig

from altpo.errors import UserError
from altpo.train.config import TrainConfig
from altpo.train.parallel import ScaleOut

# Llama-3.1-8B's shape; no weights are made, the planner reads the config only
CFG = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  tie_word_embeddings=False)


@dataclass
class _Dist:
    world: int
    device: torch.device
    rank: int = 0
    created_group: bool = False


def _config(**kw):
    return TrainConfig(model="m", alternates="a", output="o", **kw).validate()


@pytest.mark.parametrize("free_gib,want_fsdp", [(75, True), (140, False)])
def test_auto_takes_fsdp_when_a_whole_model_does_not_fit_one_gpu(monkeypatch, free_gib, want_fsdp):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, 80 * 2**30))
    model = type("ConfigOnly", (), {"config": CFG})()
    got = ScaleOut.choose(_config(), model, torch.bfloat16, _Dist(8, torch.device("cuda", 0)))
    assert got.fsdp is want_fsdp
    # one process, or the CPU: ddp, whatever the size
    assert not ScaleOut.choose(_config(), model, torch.bfloat16, _Dist(1, torch.device("cuda", 0))).fsdp
    assert not ScaleOut.choose(_config(), model, torch.bfloat16, _Dist(8, torch.device("cpu"))).fsdp


@pytest.mark.parametrize("settings,message", [
    (dict(parallel="fsdp", reference="resident"), "--reference cached"),
    (dict(merge=True), "needs --lora-rank"),
    (dict(lora_rank=-1), "must not be negative"),
    (dict(lora_rank=4, lora_targets=" , "), "--lora-targets is empty"),
    (dict(optimizer_offload="gpu"), "--optimizer-offload must be one of"),
])
def test_bad_scale_out_settings_are_refused_by_validation(settings, message):
    with pytest.raises(UserError, match=message):
        _config(**settings)


@pytest.mark.parametrize("settings,message", [
    (dict(parallel="fsdp", optimizer_in_backward="on"), "does not work with --parallel fsdp"),
    (dict(optimizer_offload="cpu", optimizer_in_backward="on"), "do not combine"),
    (dict(lora_rank=8, optimizer_in_backward="on"), "full-parameter"),
])
def test_optimizer_in_backward_is_refused_where_it_cannot_run(settings, message):
    model = type("ConfigOnly", (), {"config": CFG})()
    with pytest.raises(UserError, match=message):
        ScaleOut.choose(_config(**settings), model, torch.bfloat16, _Dist(2, torch.device("cpu")))


def test_lora_targets_that_the_model_lacks_are_named(tmp_path):
    from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer
    from altpo.train.lora import add_lora

    tok = build_tiny_tokenizer(["a b c d e f g"] * 4, vocab_size=60)
    model = build_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=24, seed=0)
    with pytest.raises(UserError, match="no modules named qkv_proj.*linear layers it has: .*q_proj"):
        add_lora(model, _config(lora_rank=2, lora_targets="q_proj,qkv_proj"))
