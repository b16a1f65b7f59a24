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

The update runs over at most ``chunk_numel`` elements at a time (the memory planner's
``OPTIMIZER_CHUNK_NUMEL``), so its fp32 temporaries (the gradient in fp32, the update) stay at
a few hundred MiB even for a 128k-vocabulary embedding, and the fp32 gradients of the whole model
never exist at once. AdamW is elementwise, so chunking changes nothing in the result.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

MASTER_WEIGHT_MODES = ("fp32", "kahan", "none")
OPTIMIZER_CHUNK_NUMEL = 1 << 24


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or infinite; the step was skipped and gradients cleared."""

    def __init__(self, norm: float):
        self.norm = norm
        super().__init__(f"the gradient norm is {norm}; no update was applied")


def _spans(numel: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(numel, a + chunk)) for a in range(0, max(numel, 1), chunk)] if numel else []


def grad_norm_parts(grad: torch.Tensor, chunk_numel: int = OPTIMIZER_CHUNK_NUMEL) -> list[torch.Tensor]:
    """The fp32 L2 norms of one gradient's chunks (what :func:`global_grad_norm` combines)."""
    flat = grad.reshape(-1)
    return [torch.linalg.vector_norm(flat[a:b], dtype=torch.float32)
            for a, b in _spans(flat.numel(), chunk_numel)]


def combine_norm_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of chunk norms taken in parameter order (0-dim fp32)."""
    if not parts:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(parts))


def global_grad_norm(grads: list[torch.Tensor], chunk_numel: int = OPTIMIZER_CHUNK_NUMEL) -> torch.Tensor:
    """The L2 norm of all ``grads`` together, accumulated in fp32, chunk by chunk (0-dim fp32)."""
    return combine_norm_parts([part for g in grads for part in grad_norm_parts(g, chunk_numel)])


def clip_coefficient(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | None:
    """The factor that brings ``norm`` down to ``max_norm`` (torch's formula), or None: no clipping."""
    if not max_norm or max_norm <= 0:
        return None
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def checked_grad_norm(names, params, chunk_numel: int, norm_reduce, clear_grads) -> torch.Tensor:
    """The global gradient norm of ``params`` (summed over processes by ``norm_reduce`` when
    given), checked before any update: a missing gradient raises ``RuntimeError`` naming it, and a
    non-finite norm calls ``clear_grads`` and raises :class:`NonFiniteGradientError`."""
    if any(p.grad is None for p in params):
        missing = [n for n, p in zip(names, params) if p.grad is None][:3]
        raise RuntimeError(f"parameters without a gradient: {', '.join(missing)}")
    norm = global_grad_norm([p.grad for p in params], chunk_numel)
    if norm_reduce is not None:
        norm = norm_reduce(norm.square()).sqrt()
    if not math.isfinite(float(norm)):
        clear_grads()
        raise NonFiniteGradientError(float(norm))
    return norm


class MixedPrecisionAdamW:
    """AdamW over ``named_parameters`` with exact updates for bf16/fp16 weights.

    Call :meth:`step` after backward with the step's learning rate; it clips the global gradient
    norm, updates the weights, and clears the gradients. :meth:`state_tensors` and
    :meth:`load_state_tensors` round-trip the whole optimizer state as named tensors (for
    safetensors checkpoints), one tensor per parameter whatever the chunking.

    ``norm_reduce`` (for parameters that are shards, under FSDP) maps this process's squared
    gradient norm to the sum over all processes, so clipping uses the global norm.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, master_weights: str = "fp32", fused: bool | None = None,
                 chunk_numel: int = OPTIMIZER_CHUNK_NUMEL, norm_reduce=None):
        if master_weights not in MASTER_WEIGHT_MODES:
            raise ValueError(f"master_weights must be one of {', '.join(MASTER_WEIGHT_MODES)}, got {master_weights!r}")
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [p.dim() >= 2 for p in self.params]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.chunk_numel = int(chunk_numel)
        # sharded parameters (FSDP): turns this process's squared norm into the global one
        self.norm_reduce = norm_reduce
        self.spans = [_spans(p.numel(), self.chunk_numel) for p in self.params]
        low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        self.mode = master_weights if low_precision else "none"
        if fused is None:
            fused = self.params[0].device.type == "cuda"
        self.fused = fused
        self.inner = None

        if self.mode == "kahan":
            self.step_count = 0
            self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.compensation = [torch.zeros_like(p) for p in self.params]
            return
        if self.mode == "fp32":
            # one fp32 leaf per chunk, so torch's AdamW can step a chunk's worth at a time
            self.master = [[p.detach().reshape(-1)[a:b].float().clone().requires_grad_(True)
                            for a, b in spans] for p, spans in zip(self.params, self.spans)]
            targets = [(m, d) for chunks, d in zip(self.master, self.decay) for m in chunks]
        else:
            targets = list(zip(self.params, self.decay))
        groups = [
            {"params": [t for t, d in targets if d], "weight_decay": weight_decay},
            {"params": [t for t, d in targets if not d], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        kwargs = {"fused": True} if fused else {"foreach": False}
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)

    # ---------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _clear_all_grads(self) -> None:
        self.zero_grad()
        for chunks in getattr(self, "master", []):
            for m in chunks:
                m.grad = None

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        """Clip, update with learning rate ``lr``, clear gradients; returns the pre-clip grad norm.

        A non-finite gradient norm raises :class:`NonFiniteGradientError` before anything is
        updated (the gradients are cleared, the weights and state are untouched).
        """
        norm = checked_grad_norm(self.names, self.params, self.chunk_numel, self.norm_reduce,
                                 self._clear_all_grads)
        coef = clip_coefficient(norm, max_grad_norm)
        if coef is not None:
            coef = coef.to(self.params[0].device)
        self.begin_update()
        self.update_parameters(range(len(self.params)), lr, coef)
        return float(norm)

    def begin_update(self) -> None:
        """Start one optimizer step whose parameters are then updated by :meth:`update_parameters`
        (possibly a few at a time, as backward completes their gradients)."""
        if self.mode == "kahan":
            self.step_count += 1

    def update_parameters(self, indices, lr: float, coef: torch.Tensor | None) -> None:
        """Update the parameters at ``indices`` (positions in ``self.params``) from their
        gradients, scaled by the clipping factor ``coef`` (None: no clipping), and free those
        gradients. Called once per parameter per step, after :meth:`begin_update`; AdamW is
        per-parameter, so updating in groups gives the same weights as updating all at once."""
        indices = list(indices)
        if not indices:
            return
        if self.mode == "kahan":
            self._kahan_step(lr, coef, indices)
        elif self.mode == "fp32":
            self._master_step(lr, coef, indices)
        else:
            grads = [self.params[i].grad for i in indices]
            if coef is not None:
                torch._foreach_mul_(grads, coef)
            for group in self.inner.param_groups:
                group["lr"] = lr
            # torch's AdamW steps every parameter holding a gradient: hide the partial gradients
            # of parameters whose backward is not finished (the tied embedding's, in backward)
            chosen = set(indices)
            hidden = {i: p.grad for i, p in enumerate(self.params) if i not in chosen and p.grad is not None}
            for i in hidden:
                self.params[i].grad = None
            self.inner.step()
            for i in indices:
                self.params[i].grad = None
            for i, g in hidden.items():
                self.params[i].grad = g

    @torch.no_grad()
    def _master_step(self, lr: float, coef, indices) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr
        pending: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
        pending_numel = 0

        def flush():
            self.inner.step()  # steps exactly the chunks that hold a gradient
            for p, a, b, m in pending:
                p.view(-1)[a:b].copy_(m)
                m.grad = None
            pending.clear()

        for i in indices:
            p, spans, chunks = self.params[i], self.spans[i], self.master[i]
            flat = p.grad.reshape(-1)
            for (a, b), m in zip(spans, chunks):
                m.grad = flat[a:b].float()
                if coef is not None:
                    m.grad.mul_(coef)
                pending.append((p, a, b, m))
                pending_numel += b - a
                if pending_numel >= self.chunk_numel:
                    flush()
                    pending_numel = 0
            p.grad = None
        if pending:
            flush()

    @torch.no_grad()
    def _kahan_step(self, lr: float, coef, indices) -> None:
        b1, b2 = self.betas
        bias1 = 1 - b1 ** self.step_count
        bias2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        for i in indices:
            p, spans, m_full, v_full, c_full, decay = (
                self.params[i], self.spans[i], self.exp_avg[i], self.exp_avg_sq[i],
                self.compensation[i], self.decay[i])
            flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
            flat_m, flat_v, flat_c = m_full.view(-1), v_full.view(-1), c_full.view(-1)
            for a, b in spans:
                m, v, c = flat_m[a:b], flat_v[a:b], flat_c[a:b]
                g = flat_g[a:b].float()
                if coef is not None:
                    g.mul_(coef)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                # the exact update in fp32 with torch AdamW's arithmetic, reusing g's buffer
                update = torch.sqrt(v, out=g).div_(bias2_sqrt).add_(self.eps)
                torch.div(m, update, out=update).mul_(-lr / bias1)
                p32 = flat_p[a:b].float()
                if decay and self.weight_decay:
                    update.add_(p32, alpha=-lr * self.weight_decay)
                # Kahan: add what earlier roundings dropped, round once, keep the new remainder
                update.add_(c)
                rounded = (p32 + update).to(p.dtype)
                c.copy_(update.sub_(rounded.float().sub_(p32)))
                flat_p[a:b].copy_(rounded)
            p.grad = None

    # ---------------------------------------------------------------------------------------------

    def exact_weights(self) -> list[torch.Tensor]:
        """The weights the optimizer tracks, in fp32: master, bf16 + compensation, or the weights."""
        if self.mode == "fp32":
            return [torch.cat([m.detach() for m in chunks]).view(p.shape)
                    for p, chunks in zip(self.params, self.master)]
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
        elif self.mode == "fp32":
            for n, p, chunks in zip(self.names, self.params, self.master):
                out[f"master.{n}"] = torch.cat([m.detach() for m in chunks]).view(p.shape)
                states = [self.inner.state.get(m, {}) for m in chunks]
                if states[0]:
                    out[f"adam.{n}.step"] = states[0]["step"]
                    for key in ("exp_avg", "exp_avg_sq"):
                        out[f"adam.{n}.{key}"] = torch.cat([s[key] for s in states]).view(p.shape)
        else:
            for n, p in zip(self.names, self.params):
                for key, value in self.inner.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        out[f"adam.{n}.{key}"] = value
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
        index = {id(t): i for i, t in enumerate(t for g in self.inner.param_groups for t in g["params"])}
        state = {}
        if self.mode == "fp32":
            with torch.no_grad():
                for n, spans, chunks in zip(self.names, self.spans, self.master):
                    if f"master.{n}" not in tensors:
                        raise ValueError(f"optimizer state has no fp32 master weight for {n}")
                    flat = tensors[f"master.{n}"].reshape(-1)
                    for (a, b), m in zip(spans, chunks):
                        m.copy_(flat[a:b])
                    if f"adam.{n}.step" not in tensors:
                        continue
                    moments = {k: tensors[f"adam.{n}.{k}"].reshape(-1) for k in ("exp_avg", "exp_avg_sq")}
                    for (a, b), m in zip(spans, chunks):
                        state[index[id(m)]] = {"step": tensors[f"adam.{n}.step"].clone(),
                                               **{k: t[a:b].clone() for k, t in moments.items()}}
        else:
            for n, p in zip(self.names, self.params):
                entry = {k: tensors[f"adam.{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")
                         if f"adam.{n}.{k}" in tensors}
                if entry:
                    state[index[id(p)]] = entry
        saved = self.inner.state_dict()
        saved["state"] = state
        self.inner.load_state_dict(saved)
