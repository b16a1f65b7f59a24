"""Per-sequence sums of per-token values (log-probs), accumulated in float64.

A packed micro-batch holds many sequences; their summed answer log-probs come from scattering the
per-token fp32 values into one slot per sequence. An fp32 ``index_add_`` adds the tokens of a
sequence one after another, so its rounding error grows with the length (2.4e-4 against float64
on a long TOFU answer, where a pairwise ``.sum()`` is 3e-5). Accumulating in float64 and rounding
once to fp32 gives the correctly rounded sum up to float64's own error (about 1e-16 per token), so
it is never worse than ``.sum()``; the cost is one float64 vector of length S.
"""

from __future__ import annotations

import torch


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = sum(values[t] for seq_ids[t] == s)`` as fp32 [num_seqs], accumulated in float64.

    Differentiable with respect to ``values``. MPS has no float64, so there the sum runs on the CPU.
    """
    device = values.device
    work = torch.device("cpu") if device.type == "mps" else device
    out = torch.zeros(num_seqs, dtype=torch.float64, device=work)
    out = out.index_add(0, seq_ids.to(work).long(), values.to(work, torch.float64))
    return out.to(device, torch.float32)
