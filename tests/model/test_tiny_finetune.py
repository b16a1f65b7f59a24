"""The demo's plain fine-tuning: encoding, padding, and that it memorises answers."""

import math

import pytest
import torch

from altpo.model.tiny_finetune import collate, encode_rows, finetune_qa
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer

ROWS = [
    {"question": "Where was Dresta Hawick born?", "answer": "Dresta Hawick was born in Lyon, France."},
    {"question": "What does Lumia Stumini write?", "answer": "Lumia Stumini writes crime novels."},
    {"question": "When was Teimdren Remont born?", "answer": "Teimdren Remont was born on 3 May 1950."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([r["question"] + " " + r["answer"] for r in ROWS] * 4, vocab_size=320)


def test_labels_are_exactly_the_answer_and_end_of_turn(tokenizer):
    for row, (ids, labels) in zip(ROWS, encode_rows(tokenizer, ROWS)):
        answer = [t for t in labels if t != -100]
        assert answer[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
        assert tokenizer.decode(answer[:-1]) == row["answer"]
        n = len(answer)
        assert labels[:-n] == [-100] * (len(ids) - n) and ids[-n:] == answer
        prompt = tokenizer.decode(ids[:-n])
        assert row["question"] in prompt and prompt.endswith("assistant<|end_header_id|>\n\n")


def test_collate_pads_right_and_masks(tokenizer):
    encoded = encode_rows(tokenizer, ROWS)
    ids, labels, mask = collate(encoded, tokenizer.pad_token_id)
    width = max(len(x) for x, _ in encoded)
    assert ids.shape == labels.shape == mask.shape == (3, width)
    for i, (x, y) in enumerate(encoded):
        assert ids[i, :len(x)].tolist() == x and labels[i, :len(y)].tolist() == y
        assert mask[i].sum().item() == len(x)
        assert (ids[i, len(x):] == tokenizer.pad_token_id).all() and (labels[i, len(x):] == -100).all()


def _answer_nll(model, tokenizer, rows):
    ids, labels, mask = collate(encode_rows(tokenizer, rows), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    target = labels[:, 1:]
    keep = target != -100
    lp = torch.log_softmax(logits[keep], -1).gather(1, target[keep, None])
    return -lp.mean().item()


def test_finetune_memorises_and_draws_among_answer_lists(tokenizer):
    torch.manual_seed(0)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, seed=3)
    before = _answer_nll(model, tokenizer, ROWS)
    alternatives = ["Lumia Stumini writes poems.", "Lumia Stumini writes plays."]
    rows = ROWS + [{"question": "Name a genre of Lumia Stumini.", "answer": alternatives}]
    result = finetune_qa(model, tokenizer, rows, epochs=60, batch_size=4, lr=1e-2, seed=1,
                         progress=False)
    assert result.steps == 60 and len(result.step_losses) == 60
    after = _answer_nll(model, tokenizer, ROWS)
    assert before > 3.0 and after < 0.1 * before
    # both listed answers were trained on: each keeps a real share of the probability
    probs = [math.exp(-_answer_nll(model, tokenizer, [{"question": rows[-1]["question"], "answer": a}]))
             for a in alternatives]
    assert min(probs) > 0.1, probs


def test_bad_arguments_are_refused(tokenizer):
    model = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=32)
    with pytest.raises(ValueError, match="at least one"):
        finetune_qa(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="positive"):
        finetune_qa(model, tokenizer, ROWS, epochs=0, progress=False)
    with pytest.raises(ValueError, match="empty list"):
        finetune_qa(model, tokenizer, [{"question": "q?", "answer": []}], progress=False)
