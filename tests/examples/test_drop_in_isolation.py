"""The drop-in example's packed hidden states equal per-sequence ones, and the padded-batch
log-probs give model(**batch).loss."""

import runpy

import torch

from altpo_kernels import batch_answer_logprobs
from helpers import REPO_ROOT


def test_drop_in_example_hidden_states_equal_per_sequence_ones():
    g = runpy.run_path(str(REPO_ROOT / "examples" / "drop_in_loss.py"))
    model, ids, lengths, hidden = g["model"], g["input_ids"][0], g["lengths"], g["hidden"]
    parts, start = [], 0
    with torch.no_grad():
        for n in lengths:
            parts.append(model.model(input_ids=ids[None, start:start + n]).last_hidden_state[0])
            start += n
    torch.testing.assert_close(hidden.detach(), torch.cat(parts), rtol=1e-5, atol=1e-5)


def test_padded_batch_nll_equals_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    ids = torch.randint(1, 301, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    out = batch_answer_logprobs(model, ids, mask, labels, backend="torch")
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.nll(), want, rtol=1e-5, atol=1e-6)
    assert out.num_tokens.tolist() == [8, 4, 2]
