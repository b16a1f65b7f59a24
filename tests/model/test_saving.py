"""Saved folders carry what transformers 4.45 reads and still load identically under the locked 5.x.

The load under 4.45.1 itself runs in a side venv: scripts/test_transformers_445.sh.
"""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from altpo.model.saving import make_folder_portable
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

TEXTS = ["Mara Ellison wrote The Lighthouse of Ashgrove in 1987.", "Who wrote it? Mara did."] * 5


def test_saved_folder_names_classes_old_releases_know_and_loads_the_same(tmp_path):
    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, intermediate_size=64, seed=2)
    save_tiny_model(model, tok, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["additional_special_tokens"] == ["<|start_header_id|>", "<|end_header_id|>"]
    assert cfg["chat_template"] == tok.chat_template
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert config["torch_dtype"] == "float32"

    again_tok = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=False)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert again_tok(TEXTS[0]).input_ids == tok(TEXTS[0]).input_ids
    assert again_tok.chat_template == tok.chat_template
    assert again_tok.all_special_tokens == tok.all_special_tokens
    ids = torch.randint(0, len(tok), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_llama3_rope_scaling_is_written_for_old_releases(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    make_folder_portable(tmp_path)
    make_folder_portable(tmp_path)  # idempotent
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert config["rope_parameters"] == rope


# What peft 0.13.2's LoraConfig accepts (read from that release's dataclass fields): the reader of
# adapter folders in open-unlearning's transformers 4.45.1 set-up.
PEFT_0_13_2_LORA_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
    "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
}


def test_lora_adapter_config_keeps_only_what_old_peft_reads_and_means_the_same(tmp_path):
    from peft import LoraConfig

    from altpo.model.saving import make_adapter_portable

    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    config.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) - PEFT_0_13_2_LORA_FIELDS  # the locked peft writes keys 0.13.2 refuses
    make_adapter_portable(tmp_path)
    portable = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(portable) <= PEFT_0_13_2_LORA_FIELDS, set(portable) - PEFT_0_13_2_LORA_FIELDS
    # read back by the locked peft, every setting is what was saved (the version note aside)
    again = LoraConfig.from_pretrained(str(tmp_path)).to_dict()
    before = config.to_dict()
    for key in set(before) | set(again):
        if key != "peft_version":
            assert again.get(key) == before.get(key), key
    make_adapter_portable(tmp_path)  # idempotent
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == portable


def test_a_lora_setting_old_peft_cannot_hold_is_kept_so_old_peft_refuses_it(tmp_path):
    from peft import LoraConfig

    from altpo.model.saving import make_adapter_portable

    LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True).save_pretrained(str(tmp_path))
    make_adapter_portable(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"] is True
