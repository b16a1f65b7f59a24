"""Input checks for the public API: each failure names the argument and says how to fix it."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_linear_inputs(hidden, weight, labels, ignore_index: int) -> None:
    """Shapes, dtypes, devices and label range of (hidden, weight, labels)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D [tokens, hidden_size], got shape {tuple(hidden.shape)}; "
            "flatten batch and sequence dimensions first (hidden.reshape(-1, hidden.shape[-1]))"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[1]}: "
            "pass the lm_head weight [vocab, hidden_size] (model.lm_head.weight), not its transpose"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; "
            "cast one of them so both match"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per token ({hidden.shape[0]}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if labels.numel():
        valid = labels[labels != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            raise ValueError(
                f"labels contain {bad}, outside the vocabulary [0, {weight.shape[0]}); mark ignored "
                f"tokens with ignore_index={ignore_index} and check the tokenizer matches the model"
            )


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}; move them with .to(device)")


def check_index_vector(name: str, t, length: int | None = None, allow_empty: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of sequence indices, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int64 (or int32), got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty: AltPO needs at least one (alternate, forget answer) pair")


def check_range(name: str, t, num_seqs: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_seqs):
        raise ValueError(
            f"{name} refers to sequence {int(t.max()) if int(t.max()) >= num_seqs else int(t.min())}, "
            f"but seq_ids only define sequences 0..{num_seqs - 1}; indices must name packed sequences"
        )
