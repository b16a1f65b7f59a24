"""The spec of the log-prob unlearning family, computed the obvious way in float64.

Materialises the full [N, V] logits and walks the sequences one by one, so it is for tests and
small inputs only; every fast backend of :func:`altpo_kernels.unlearning_loss` is tested against
it. The math is docs/methods.md; with ``lp_i`` the summed answer-token log-prob of sequence i and
``n_i`` its answer-token count:

    altpo, dpo, idkdpo  L_f = -(2/beta) sum_i log sigmoid(beta * D_i) / B,
                        D_i = [lp(chosen_i) - ref_chosen_i] - [lp(forget_i) - ref_forget_i]
    npo                 L_f = -(2/beta) sum_i log sigmoid(-beta * (lp(forget_i) - ref_forget_i)) / B
    simnpo              L_f = -(2/beta) sum_i log sigmoid(-beta * lp(forget_i) / n_i - beta * delta) / B
    graddiff, gradascent L_f = sum_i lp(forget_i) / sum_i n_i          (minus the forget NLL)
    every method        L_r = -sum_j lp(retain_j) / sum_j n_j,  L = gamma * L_f + alpha * L_r
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import linear_logprobs_reference


def unlearning_loss_reference(hidden, weight, labels, seq_ids, *, method: str, forget_seqs,
                              chosen_seqs=None, retain_seqs=None, ref_forget_logps=None,
                              ref_chosen_logps=None, beta: float = 0.1, alpha: float = 1.0,
                              gamma: float = 1.0, delta: float = 0.0, num_forget=None,
                              num_forget_tokens=None, num_retain_tokens=None,
                              ignore_index: int = -100) -> dict:
    """One method's loss in float64 (no input checks). Returns a dict of float64 tensors."""
    token_logp = linear_logprobs_reference(hidden, weight, labels, ignore_index)
    num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    seq_logp, seq_len = [], []
    for s in range(num_seqs):
        member = seq_ids == s
        seq_logp.append(token_logp[member].sum())
        seq_len.append(int((member & (labels != ignore_index)).sum()))
    zero = torch.zeros((), dtype=torch.float64, device=token_logp.device)

    def lp(i):
        return seq_logp[int(i)]

    forget = torch.stack([lp(s) for s in forget_seqs]) if len(forget_seqs) else zero[None][:0]
    count = len(forget_seqs) if num_forget is None else num_forget
    chosen = zero[None][:0]
    if method in ("altpo", "dpo", "idkdpo"):
        chosen = torch.stack([lp(s) for s in chosen_seqs])
        d = (chosen - ref_chosen_logps.double()) - (forget - ref_forget_logps.double())
        terms = [-(2.0 / beta) * F.logsigmoid(beta * d_i) for d_i in d]
        score = d
    elif method == "npo":
        ratio = forget - ref_forget_logps.double()
        terms = [-(2.0 / beta) * F.logsigmoid(-beta * r) for r in ratio]
        score = ratio
    elif method == "simnpo":
        # an answer truncated away (no answer token) has a length-normalised log-prob of 0
        per_token = torch.stack([lp(s) / max(seq_len[int(s)], 1) for s in forget_seqs])
        terms = [-(2.0 / beta) * F.logsigmoid(-beta * p - beta * delta) for p in per_token]
        score = per_token
    elif method in ("graddiff", "gradascent"):
        tokens = sum(seq_len[int(s)] for s in forget_seqs)
        if num_forget_tokens is not None:
            tokens = num_forget_tokens
        terms = [forget.sum() / tokens] if tokens else []
        count = 1
        score = torch.stack([lp(s) / max(seq_len[int(s)], 1) for s in forget_seqs])
    else:
        raise ValueError(f"unknown method {method!r}")
    forget_loss = sum(terms, zero) / count if terms else zero

    retain_seqs = [] if retain_seqs is None else retain_seqs
    retain_sum = sum((lp(s) for s in retain_seqs), zero)
    retain_count = sum(seq_len[int(s)] for s in retain_seqs)
    if num_retain_tokens is not None:
        retain_count = num_retain_tokens
    retain_loss = -retain_sum / retain_count if retain_count else zero
    loss = gamma * forget_loss + alpha * retain_loss
    return {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss,
            "forget_logps": forget, "chosen_logps": chosen, "score": score,
            "token_logps": token_logp}
