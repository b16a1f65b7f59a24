"""Bad input to the public kernel API raises ValueError naming the argument, before any work."""

import pytest
import torch

from altpo_kernels import altpo_loss, linear_logprobs
from kernel_cases import random_packed_batch

FIELDS = ("hidden", "weight", "labels", "seq_ids", "win_seqs", "lose_seqs", "retain_seqs",
          "ref_win_logps", "ref_lose_logps")


@pytest.fixture
def batch():
    return random_packed_batch([5, 7, 6, 8], 3, 12, 30, torch.float32, "cpu", 3)


def _call(batch, **overrides):
    b = {**batch, **overrides}
    return altpo_loss(*[b[k] for k in FIELDS], backend="torch")


@pytest.mark.parametrize("override, pattern", [
    (lambda b: dict(hidden=b["hidden"][None]), "hidden must be 2-D"),
    (lambda b: dict(weight=b["weight"][:, :-1]), "hidden size"),
    (lambda b: dict(weight=b["weight"].double()), "hidden must be float32|weight dtype"),
    (lambda b: dict(weight=b["weight"].half()), "weight dtype"),
    (lambda b: dict(labels=b["labels"][:-1]), "labels must be 1-D"),
    (lambda b: dict(labels=b["labels"].float()), "labels must be int64"),
    (lambda b: dict(labels=torch.where(b["labels"] >= 0, b["labels"] + 30, b["labels"])), "outside the vocabulary"),
    (lambda b: dict(seq_ids=b["seq_ids"][:-2]), "seq_ids must have"),
    (lambda b: dict(win_seqs=b["win_seqs"][:0], lose_seqs=b["lose_seqs"][:0],
                    ref_win_logps=b["ref_win_logps"][:0], ref_lose_logps=b["ref_lose_logps"][:0]), "win_seqs is empty"),
    (lambda b: dict(lose_seqs=b["lose_seqs"][:-1]), "lose_seqs must have"),
    (lambda b: dict(win_seqs=b["win_seqs"] + 10), "win_seqs refers to sequence"),
    (lambda b: dict(lose_seqs=b["lose_seqs"] - 10), "lose_seqs refers to sequence"),
    (lambda b: dict(retain_seqs=torch.tensor([99])), "retain_seqs refers to sequence"),
    (lambda b: dict(ref_win_logps=b["ref_win_logps"][:-1]), "ref_win_logps"),
    (lambda b: dict(ref_lose_logps=b["ref_lose_logps"].long()), "ref_lose_logps"),
])
def test_altpo_loss_rejects(batch, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(batch, **override(batch))


def test_mismatched_devices_named(batch):
    meta_labels = torch.empty_like(batch["labels"], device="meta")
    with pytest.raises(ValueError, match="labels on meta"):
        _call(batch, labels=meta_labels)


def test_bad_hyper_parameters(batch):
    args = [batch[k] for k in FIELDS]
    with pytest.raises(ValueError, match="beta"):
        altpo_loss(*args, beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="num_pairs"):
        altpo_loss(*args, num_pairs=-1, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        altpo_loss(*args, backend="cuda-magic")


def test_linear_logprobs_rejects_transposed_weight():
    hidden = torch.randn(4, 8)
    weight = torch.randn(8, 20)
    with pytest.raises(ValueError, match="not its transpose"):
        linear_logprobs(hidden, weight, torch.randint(0, 20, (4,)))


def test_triton_on_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_logprobs(hidden, weight, torch.randint(0, 20, (4,)), backend="triton")
