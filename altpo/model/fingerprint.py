"""The identity of a model's weights: one sha256 over every state-dict entry.

The reference cache keys on it (the log-probs of other weights are not reused) and every eval
records it (which weights were evaluated), so it lives with the model, below both.
"""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model) -> str:
    """sha256 of a model's weights: every state-dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())  # no extra copy
    return h.hexdigest()
