"""The spec: per-token log-probs and every method's loss computed the obvious way, in float64.

Every fast backend is tested against these functions. They materialise the full [N, V] logits and
walk the sequences one at a time, so they are for tests and small inputs only. The math is
docs/design.md section 2:

    lp(seq)  = sum over the sequence's answer tokens of log softmax(h_t W^T)[label_t]
    L_forget = the method's forget terms (its float64 ``reference`` in altpo_kernels.methods),
               summed, over the step's forget terms or forget answer tokens
    L_retain = -sum of retain answer-token log-probs / num_retain_tokens
    L        = gamma * L_forget + alpha * L_retain
"""

from __future__ import annotations

import torch

from .methods import ALTPO, DEFAULT_METHOD, SequenceLogprobs, get_method


def linear_logprobs_reference(hidden, weight, labels, ignore_index: int = -100):
    """log_softmax(hidden @ weight.T)[label] in float64; 0 where label == ignore_index."""
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = logp.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def unlearning_loss_reference(hidden, weight, labels, seq_ids, *, method=DEFAULT_METHOD, forget_seqs,
                              chosen_seqs=None, retain_seqs=None, ref_forget_logps=None,
                              ref_chosen_logps=None, hparams: dict | None = None, num_forget=None,
                              num_forget_tokens=None, num_retain_tokens=None,
                              ignore_index: int = -100, **settings) -> dict:
    """One method's loss in float64 (no input checks). ``hparams`` (or the settings as keywords)
    default to the method's; its float64 ``reference`` term is used when it has one, else its own
    forget term evaluated in float64. Returns a dict of float64 tensors and the normalisers."""
    spec = get_method(method)
    hp = dict(hparams) if hparams is not None else spec.hparams(**settings)
    token_logp = linear_logprobs_reference(hidden, weight, labels, ignore_index)
    seq_list = [forget_seqs, retain_seqs, chosen_seqs]
    top = max([int(t.max()) for t in seq_list if t is not None and len(t)] + [-1])
    num_seqs = max(int(seq_ids.max()) + 1 if seq_ids.numel() else 0, top + 1)
    seq_logp, seq_len = [], []
    for s in range(num_seqs):
        member = seq_ids == s
        seq_logp.append(token_logp[member].sum())
        seq_len.append(int((member & (labels != ignore_index)).sum()))
    zero = torch.zeros((), dtype=torch.float64, device=token_logp.device)
    empty = zero[None][:0]

    def gather(seqs):
        return torch.stack([seq_logp[int(s)] for s in seqs]) if seqs is not None and len(seqs) else empty

    forget = gather(forget_seqs)
    chosen = gather(chosen_seqs) if spec.pairs else empty
    lengths = torch.tensor([max(seq_len[int(s)], 1) for s in forget_seqs], dtype=torch.float64,
                           device=token_logp.device)
    x = SequenceLogprobs(
        forget=forget, lengths=lengths, chosen=chosen if spec.pairs else None,
        ref_forget=ref_forget_logps.double() if spec.uses_reference else None,
        ref_chosen=ref_chosen_logps.double() if spec.uses_reference and spec.pairs else None)
    term = spec.reference or spec.forget_term
    per_term, score = term(x, hp) if len(forget_seqs) else (empty, empty)
    forget_tokens = sum(seq_len[int(s)] for s in forget_seqs)
    if num_forget_tokens is not None:
        forget_tokens = num_forget_tokens
    terms = len(forget_seqs) if num_forget is None else num_forget
    count = forget_tokens if spec.normaliser == "forget_tokens" else terms
    forget_loss = per_term.double().sum() / count if len(forget_seqs) and count else zero

    retain_seqs = [] if retain_seqs is None else retain_seqs
    retain_sum = sum((seq_logp[int(s)] for s in retain_seqs), zero)
    retain_count = sum(seq_len[int(s)] for s in retain_seqs)
    if num_retain_tokens is not None:
        retain_count = num_retain_tokens
    retain_loss = -retain_sum / retain_count if retain_count else zero
    loss = hp["gamma"] * forget_loss + hp["alpha"] * retain_loss
    return {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss,
            "forget_logps": forget, "chosen_logps": chosen, "score": score.double(),
            "token_logps": token_logp, "num_forget": float(terms),
            "num_forget_tokens": float(forget_tokens), "num_retain_tokens": float(retain_count)}


def altpo_loss_reference(hidden, weight, labels, seq_ids, win_seqs, lose_seqs, retain_seqs,
                         ref_win_logps, ref_lose_logps, *, beta: float = 0.5, alpha: float = 2.0,
                         gamma: float = 1.0, num_pairs=None, num_retain_tokens=None,
                         ignore_index: int = -100) -> dict:
    """The AltPO loss in float64, in AltPO's names (win = chosen, lose = forget)."""
    out = unlearning_loss_reference(
        hidden, weight, labels, seq_ids, method=ALTPO, forget_seqs=lose_seqs,
        chosen_seqs=win_seqs, retain_seqs=retain_seqs, ref_forget_logps=ref_lose_logps,
        ref_chosen_logps=ref_win_logps, hparams=dict(beta=beta, alpha=alpha, gamma=gamma),
        num_forget=num_pairs, num_retain_tokens=num_retain_tokens, ignore_index=ignore_index)
    return dict(out, win_logps=out["chosen_logps"], lose_logps=out["forget_logps"])


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
