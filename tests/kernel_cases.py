"""Random inputs for the kernel tests: fresh values every call, never zeros, odd sizes."""

from __future__ import annotations

import torch


def random_linear_inputs(n, h, v, dtype, device, seed, ignore_frac=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    # Scale so logits spread over several units: a flat softmax would hide gather/lse mistakes.
    hidden = (torch.randn(n, h, generator=g) * 1.5).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2.0).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return hidden, weight, labels.to(device)


def random_packed_batch(seq_lens, num_pairs, h, v, dtype, device, seed, retain=2, ignore_index=-100,
                        share_lose=True):
    """A packed row of sequences with prompt tokens ignored, plus pairs and retain sequences.

    Sequence 0 has every token ignored (an answer truncated away) and is used as a win sequence,
    and lose sequences are shared by several pairs when ``share_lose``.
    """
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(seq_lens)])
    n = seq_ids.numel()
    hidden = (torch.randn(n, h, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    start = 0
    for i, length in enumerate(seq_lens):
        prompt = length if i == 0 else int(torch.randint(0, max(1, length // 2) + 1, (1,), generator=g))
        labels[start:start + prompt] = ignore_index
        start += length
    s = len(seq_lens)
    win = torch.randint(0, s, (num_pairs,), generator=g)
    win[0] = 0
    lose_pool = torch.randint(0, s, (max(1, num_pairs // 2) if share_lose else num_pairs,), generator=g)
    lose = lose_pool[torch.arange(num_pairs) % lose_pool.numel()]
    retain_seqs = torch.randperm(s, generator=g)[:retain]
    ref_win = -torch.rand(num_pairs, generator=g) * 20
    ref_lose = -torch.rand(num_pairs, generator=g) * 20
    tensors = dict(hidden=hidden, weight=weight, labels=labels, seq_ids=seq_ids, win_seqs=win,
                   lose_seqs=lose, retain_seqs=retain_seqs, ref_win_logps=ref_win,
                   ref_lose_logps=ref_lose)
    return {k: t.to(device) for k, t in tensors.items()}


# Head transforms (linear_logprobs' bias / logit_scale / softcap / temperature) that the fused
# backends' tests run: every one together, each alone, and the bias with none.
HEAD_TRANSFORM_CASES = {
    "all": dict(temperature=0.7, logit_scale=1.3, softcap=4.0),
    "softcap-only": dict(softcap=2.5),
    "temperature-scale": dict(temperature=1.9, logit_scale=0.45),
    "bias-only": dict(),
}


def transformed_reference(hidden, weight, bias, labels, a, c, ignore_index=-100, **tf):
    """(logp, entropy, dH, dW, db) in float64 of ``sum a logp + c entropy`` for the transformed
    head (``c`` None: logp only; ``bias`` None: no bias and db None), by autograd."""
    from altpo_kernels.reference import linear_logprobs_entropy_reference

    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    b = bias.detach().cpu().double().requires_grad_() if bias is not None else None
    logp, ent = linear_logprobs_entropy_reference(h, w, labels.cpu(), bias=b, ignore_index=ignore_index,
                                                  **tf)
    loss = (logp * a.cpu().double()).sum()
    if c is not None:
        loss = loss + (ent * c.cpu().double()).sum()
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, (b.grad if b is not None else None)
