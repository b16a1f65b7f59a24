"""The spec: AltPO and per-token log-probs computed the obvious way, in float64.

Every fast backend is tested against these functions. They materialise the full [N, V] logits, so
they are for tests and small inputs only. The math is docs/design.md section 2:

    lp(seq)  = sum over the sequence's answer tokens of log softmax(h_t W^T)[label_t]
    delta_i  = [lp(win_i) - ref_win_i] - [lp(lose_i) - ref_lose_i]
    L_forget = -(2 / beta) * sum_i log sigmoid(beta * delta_i) / num_pairs
    L_retain = -sum of retain answer-token log-probs / num_retain_tokens
    L        = gamma * L_forget + alpha * L_retain
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_logprobs_reference(hidden, weight, labels, ignore_index: int = -100):
    """log_softmax(hidden @ weight.T)[label] in float64; 0 where label == ignore_index."""
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = logp.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def altpo_loss_reference(
    hidden,
    weight,
    labels,
    seq_ids,
    win_seqs,
    lose_seqs,
    retain_seqs,
    ref_win_logps,
    ref_lose_logps,
    *,
    beta: float = 0.5,
    alpha: float = 2.0,
    gamma: float = 1.0,
    num_pairs=None,
    num_retain_tokens=None,
    ignore_index: int = -100,
) -> dict:
    """The AltPO loss in float64, one sequence at a time. Returns a dict of float64 tensors."""
    token_logp = linear_logprobs_reference(hidden, weight, labels, ignore_index)
    num_seqs = int(seq_ids.max().item()) + 1 if seq_ids.numel() else 0
    num_seqs = max(num_seqs, int(torch.cat([win_seqs, lose_seqs, retain_seqs]).max().item()) + 1)
    seq_logp = [token_logp[seq_ids == s].sum() for s in range(num_seqs)]
    seq_tokens = [int(((seq_ids == s) & (labels != ignore_index)).sum()) for s in range(num_seqs)]

    win = torch.stack([seq_logp[int(s)] for s in win_seqs])
    lose = torch.stack([seq_logp[int(s)] for s in lose_seqs])
    delta = (win - ref_win_logps.double()) - (lose - ref_lose_logps.double())
    pairs = len(win_seqs) if num_pairs is None else num_pairs
    forget = -(2.0 / beta) * F.logsigmoid(beta * delta).sum() / pairs

    retain_sum = sum((seq_logp[int(s)] for s in retain_seqs), torch.zeros((), dtype=torch.float64))
    retain_count = sum(seq_tokens[int(s)] for s in retain_seqs)
    if num_retain_tokens is not None:
        retain_count = num_retain_tokens
    retain = -retain_sum / retain_count if retain_count else retain_sum * 0.0
    loss = gamma * forget + alpha * retain
    return {
        "loss": loss,
        "forget_loss": forget,
        "retain_loss": retain,
        "win_logps": win,
        "lose_logps": lose,
        "token_logps": token_logp,
    }


def transformed_logits_reference(hidden, weight, bias=None, temperature: float = 1.0,
                                 logit_scale: float = 1.0, softcap: float | None = None):
    """The head's logits in float64 with the optional transforms, in this order:
    ``z = (hidden @ weight.T + bias) * logit_scale``, then ``softcap * tanh(z / softcap)`` when
    ``softcap`` is set, then ``/ temperature``."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def linear_logprobs_entropy_reference(hidden, weight, labels, *, bias=None, temperature: float = 1.0,
                                      logit_scale: float = 1.0, softcap: float | None = None,
                                      ignore_index: int = -100):
    """``(log-prob of the label, entropy of the distribution)`` per token in float64, from the
    transformed logits; both 0 where label == ignore_index."""
    logp_all = torch.log_softmax(transformed_logits_reference(
        hidden, weight, bias, temperature, logit_scale, softcap), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = logp_all.gather(1, safe[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(picked)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)
