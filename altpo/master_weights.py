"""AdamW for bf16 weights whose small updates are not lost to rounding.

At lr 1e-5 most AdamW updates of a bf16 weight are smaller than half its last bit and round away:
a plain bf16 run trains a different model from the one the math describes. Three modes:

``fp32``
    An fp32 master copy of every weight takes the update (torch's AdamW, fused on CUDA); the bf16
    weight is the master rounded. Extra memory: 4 bytes per parameter.
``kahan``
    The bf16 weight is updated with Kahan-compensated addition: a bf16 buffer keeps what rounding
    dropped and adds it back next step, so the weight tracks the exact sum to about bf16 squared
    precision. Extra memory: 2 bytes per parameter. AdamW moments stay fp32.
``none``
    torch's AdamW straight on the weights (what a bf16 HF Trainer run does).

fp32 weights need none of this; for them every mode is plain AdamW on the weights. Parameters
with fewer than two dimensions (norm weights, biases) get no weight decay, as in HF Trainer.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

MASTER_WEIGHT_MODES = ("fp32", "kahan", "none")


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` together, accumulated in fp32 (a 0-dim fp32 tensor)."""
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | None:
    """The factor that brings ``norm`` down to ``max_norm`` (torch's formula), or None: no clipping."""
    if not max_norm or max_norm <= 0:
        return None
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or infinite; the step was skipped and gradients cleared."""

    def __init__(self, norm: float):
        self.norm = norm
        super().__init__(f"the gradient norm is {norm}; no update was applied")


class MixedPrecisionAdamW:
    """AdamW over ``named_parameters`` with exact updates for bf16/fp16 weights.

    Call :meth:`step` after backward with the step's learning rate; it clips the global gradient
    norm, updates the weights, and clears the gradients. :meth:`state_tensors` and
    :meth:`load_state_tensors` round-trip the whole optimizer state as named tensors (for
    safetensors checkpoints).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, master_weights: str = "fp32", fused: bool | None = None):
        if master_weights not in MASTER_WEIGHT_MODES:
            raise ValueError(f"master_weights must be one of {', '.join(MASTER_WEIGHT_MODES)}, got {master_weights!r}")
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [p.dim() >= 2 for p in self.params]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        self.mode = master_weights if low_precision else "none"
        if fused is None:
            fused = self.params[0].device.type == "cuda"
        self.fused = fused

        if self.mode == "kahan":
            self.step_count = 0
            self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.compensation = [torch.zeros_like(p) for p in self.params]
            self.inner = None
        else:
            if self.mode == "fp32":
                self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
                targets = self.master
            else:
                targets = self.params
            groups = [
                {"params": [t for t, d in zip(targets, self.decay) if d], "weight_decay": weight_decay},
                {"params": [t for t, d in zip(targets, self.decay) if not d], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            kwargs = {"fused": True} if fused else {"foreach": False}
            self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
            # index of each target inside the flattened param groups, for saving state by name
            self._targets = targets

    # ---------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        """Clip, update with learning rate ``lr``, clear gradients; returns the pre-clip grad norm.

        A non-finite gradient norm raises :class:`NonFiniteGradientError` before anything is
        updated (the gradients are cleared, the weights and state are untouched).
        """
        if any(p.grad is None for p in self.params):
            missing = [n for n, p in zip(self.names, self.params) if p.grad is None][:3]
            raise RuntimeError(f"parameters without a gradient: {', '.join(missing)}")
        if self.mode == "kahan":
            return self._kahan_step(lr, max_grad_norm)
        if self.mode == "fp32":
            # fp32 gradients one parameter at a time, dropping each bf16 gradient as it is copied
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float()
                p.grad = None
            grads = [m.grad for m in self.master]
        else:
            grads = [p.grad for p in self.params]
        norm = global_grad_norm(grads)
        if not math.isfinite(float(norm)):
            self._clear_all_grads()
            raise NonFiniteGradientError(float(norm))
        coef = clip_coefficient(norm, max_grad_norm)
        if coef is not None:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        if self.mode == "fp32":
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)
                    m.grad = None
        else:
            self.zero_grad()
        return float(norm)

    def _clear_all_grads(self) -> None:
        self.zero_grad()
        for m in getattr(self, "master", []):
            m.grad = None

    @torch.no_grad()
    def _kahan_step(self, lr: float, max_grad_norm: float | None) -> float:
        grads = [p.grad for p in self.params]
        norm = global_grad_norm(grads)
        if not math.isfinite(float(norm)):
            self._clear_all_grads()
            raise NonFiniteGradientError(float(norm))
        coef = clip_coefficient(norm, max_grad_norm)
        self.step_count += 1
        b1, b2 = self.betas
        bias1 = 1 - b1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        for p, g, m, v, c, decay in zip(self.params, grads, self.exp_avg, self.exp_avg_sq,
                                        self.compensation, self.decay):
            g32 = g.float()
            if coef is not None:
                g32.mul_(coef.to(g32.device))
            m.lerp_(g32, 1 - b1)
            v.mul_(b2).addcmul_(g32, g32, value=1 - b2)
            # the exact update in fp32, torch AdamW's arithmetic: decay, then the Adam step
            update = m / (v.sqrt() / bias2_sqrt + self.eps)
            update.mul_(-lr / bias1)
            p32 = p.float()
            if decay and self.weight_decay:
                update.add_(p32, alpha=-lr * self.weight_decay)
            # Kahan: add what earlier roundings dropped, round once, keep the new remainder
            update.add_(c.float())
            rounded = (p32 + update).to(p.dtype)
            c.copy_(update - (rounded.float() - p32))
            p.copy_(rounded)
        self.zero_grad()
        return float(norm)

    # ---------------------------------------------------------------------------------------------

    def exact_weights(self) -> list[torch.Tensor]:
        """The weights the optimizer tracks, in fp32: master, bf16 + compensation, or the weights."""
        if self.mode == "fp32":
            return [m.detach().clone() for m in self.master]
        if self.mode == "kahan":
            return [p.detach().float() + c.float() for p, c in zip(self.params, self.compensation)]
        return [p.detach().float() for p in self.params]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every piece of optimizer state as named CPU tensors (names are parameter names)."""
        out: dict[str, torch.Tensor] = {}
        if self.mode == "kahan":
            out["kahan.step"] = torch.tensor(self.step_count, dtype=torch.int64)
            for n, m, v, c in zip(self.names, self.exp_avg, self.exp_avg_sq, self.compensation):
                out[f"adam.{n}.exp_avg"] = m
                out[f"adam.{n}.exp_avg_sq"] = v
                out[f"kahan.{n}.compensation"] = c
        else:
            for n, t in zip(self.names, self._targets):
                for key, value in self.inner.state.get(t, {}).items():
                    if isinstance(value, torch.Tensor):
                        out[f"adam.{n}.{key}"] = value
            if self.mode == "fp32":
                for n, m in zip(self.names, self.master):
                    out[f"master.{n}"] = m.detach()
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (same parameter names and mode)."""
        if self.mode == "kahan":
            if "kahan.step" not in tensors:
                raise ValueError("optimizer state was not saved in kahan mode")
            self.step_count = int(tensors["kahan.step"])
            for n, m, v, c in zip(self.names, self.exp_avg, self.exp_avg_sq, self.compensation):
                m.copy_(tensors[f"adam.{n}.exp_avg"])
                v.copy_(tensors[f"adam.{n}.exp_avg_sq"])
                c.copy_(tensors[f"kahan.{n}.compensation"])
            return
        if self.mode == "fp32":
            with torch.no_grad():
                for n, m in zip(self.names, self.master):
                    if f"master.{n}" not in tensors:
                        raise ValueError(f"optimizer state has no fp32 master weight for {n}")
                    m.copy_(tensors[f"master.{n}"])
        index = {id(t): i for i, t in enumerate(p for g in self.inner.param_groups for p in g["params"])}
        state = {}
        for n, t in zip(self.names, self._targets):
            entry = {k: tensors[f"adam.{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")
                     if f"adam.{n}.{k}" in tensors}
            if entry:
                state[index[id(t)]] = entry
        saved = self.inner.state_dict()
        saved["state"] = state
        self.inner.load_state_dict(saved)
