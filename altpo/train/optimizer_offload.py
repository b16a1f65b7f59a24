"""AdamW with its states in host memory: ``--optimizer-offload cpu``.

The fp32 moments (8 bytes per trainable parameter) and, for bf16/fp16 weights, the fp32 master
weights (4 more) live in CPU memory, pinned when a GPU is present, so the device keeps only the
weights and gradients. The update goes chunk by chunk (``OPTIMIZER_CHUNK_NUMEL`` elements) in one
of two ways (``--offload-update``):

``cpu``
    the chunk's gradient goes to the host, the host runs AdamW on the master chunk, and the new
    weights go back (rounded to the weight dtype on the device). Traffic per element: gradient in
    (as fp32), weight out; the arithmetic runs on the host's cores.
``stream``
    the chunk's moments and master weights go to the device, AdamW runs there, and they go back.
    Traffic: 12 bytes in and 12 out per element; the arithmetic runs on the device.

Both run torch's AdamW arithmetic (decoupled weight decay, bias corrections, eps outside the
square root), so they give the weights :class:`~altpo.train.master_weights.MixedPrecisionAdamW`
gives in fp32 mode. The exact-update mode is always fp32 master weights here (host memory is the
cheap kind); ``kahan`` is taken as fp32. Gradient clipping by the global norm happens first, on
the device, as in the other optimizer.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from altpo.train.master_weights import (
    MASTER_WEIGHT_MODES,
    OPTIMIZER_CHUNK_NUMEL,
    _spans,
    checked_grad_norm,
    clip_coefficient,
)

UPDATE_MODES = ("cpu", "stream")


def adamw_(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int,
           lr: float, betas, eps: float, weight_decay: float) -> None:
    """One AdamW update of fp32 ``w`` in place (torch's single-tensor arithmetic)."""
    b1, b2 = betas
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
    w.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))


class OffloadedAdamW:
    """AdamW over ``named_parameters`` with moments and master weights in host memory.

    Same interface as :class:`~altpo.train.master_weights.MixedPrecisionAdamW` for the loop:
    :meth:`step`, :meth:`zero_grad`, :meth:`state_tensors`, :meth:`load_state_tensors`, ``mode``.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 master_weights: str = "fp32", update: str = "cpu", norm_reduce=None,
                 chunk_numel: int = OPTIMIZER_CHUNK_NUMEL):
        if master_weights not in MASTER_WEIGHT_MODES:
            raise ValueError(f"master_weights must be one of {', '.join(MASTER_WEIGHT_MODES)}")
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {', '.join(UPDATE_MODES)}, got {update!r}")
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [p.dim() >= 2 for p in self.params]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.update, self.norm_reduce, self.chunk_numel = update, norm_reduce, int(chunk_numel)
        self.spans = [_spans(p.numel(), self.chunk_numel) for p in self.params]
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        self.mode = "fp32" if (low and master_weights != "none") else "none"
        pin = torch.cuda.is_available() and self.params[0].device.type == "cuda"

        def host(t):
            t = t.detach().to("cpu", torch.float32).reshape(-1).clone()
            return t.pin_memory() if pin else t

        self.exp_avg = [host(torch.zeros_like(p, dtype=torch.float32)) for p in self.params]
        self.exp_avg_sq = [host(torch.zeros_like(p, dtype=torch.float32)) for p in self.params]
        # fp32 weights are their own master; with mode "none" the bf16 weight is read each step
        self.master = [host(p) if self.mode == "fp32" else None for p in self.params]
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        """Clip, update with learning rate ``lr``, clear gradients; returns the pre-clip norm."""
        norm = checked_grad_norm(self.names, self.params, self.chunk_numel, self.norm_reduce,
                                 self.zero_grad)
        coef = clip_coefficient(norm, max_grad_norm)
        coef = float(coef) if coef is not None else None
        self.step_count += 1
        with torch.no_grad():
            for i in range(len(self.params)):
                self._update_one(i, lr, coef)
                self.params[i].grad = None
        return float(norm)

    def _update_one(self, i: int, lr: float, coef: float | None) -> None:
        p, flat_g = self.params[i], self.params[i].grad.reshape(-1)
        flat_p = p.view(-1)
        decay = self.weight_decay if self.decay[i] else 0.0
        kw = dict(step=self.step_count, lr=lr, betas=self.betas, eps=self.eps, weight_decay=decay)
        for a, b in self.spans[i]:
            m, v, master = self.exp_avg[i][a:b], self.exp_avg_sq[i][a:b], self.master[i]
            if self.update == "cpu":
                g = flat_g[a:b].to("cpu", torch.float32)
                if coef is not None:
                    g.mul_(coef)
                w = master[a:b] if master is not None else flat_p[a:b].to("cpu", torch.float32)
                adamw_(w, g, m, v, **kw)
                flat_p[a:b].copy_(w, non_blocking=False)
            else:  # stream: states to the device, update there, states back
                dev = p.device
                g = flat_g[a:b].float()
                if coef is not None:
                    g.mul_(coef)
                md, vd = m.to(dev, non_blocking=True), v.to(dev, non_blocking=True)
                w = master[a:b].to(dev, non_blocking=True) if master is not None else flat_p[a:b].float()
                adamw_(w, g, md, vd, **kw)
                m.copy_(md)
                v.copy_(vd)
                if master is not None:
                    master[a:b].copy_(w)
                flat_p[a:b].copy_(w)

    # ---------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Moments (and master weights) by parameter name, the names MixedPrecisionAdamW uses."""
        out: dict[str, torch.Tensor] = {}
        for n, p, m, v, w in zip(self.names, self.params, self.exp_avg, self.exp_avg_sq, self.master):
            if self.step_count:
                out[f"adam.{n}.step"] = torch.tensor(float(self.step_count))
                out[f"adam.{n}.exp_avg"] = m.view(p.shape).clone()
                out[f"adam.{n}.exp_avg_sq"] = v.view(p.shape).clone()
            if w is not None:
                out[f"master.{n}"] = w.view(p.shape).clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, m, v, w in zip(self.names, self.exp_avg, self.exp_avg_sq, self.master):
            if w is not None:
                if f"master.{n}" not in tensors:
                    raise ValueError(f"optimizer state has no fp32 master weight for {n}")
                w.copy_(tensors[f"master.{n}"].reshape(-1))
            if f"adam.{n}.step" in tensors:
                self.step_count = int(float(tensors[f"adam.{n}.step"]))
                m.copy_(tensors[f"adam.{n}.exp_avg"].reshape(-1))
                v.copy_(tensors[f"adam.{n}.exp_avg_sq"].reshape(-1))
