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
