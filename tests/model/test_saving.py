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
