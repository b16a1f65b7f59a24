"""Fully sharded data parallel training (torch FSDP2, ``fully_shard``) under ``torchrun``.

``--parallel fsdp`` shards every parameter, gradient and optimizer state over the processes:

- ``fully_shard`` wraps each decoder layer, and the root wraps :class:`ShardRoot`: the module
  whose forward runs the backbone *and* the fused loss. The embedding, the final norm and the
  lm_head weight belong to the root group, so FSDP all-gathers the lm_head before the loss reads it
  and frees the full copy after backward. A tied lm_head is the embedding: one parameter, one group.
- The optimizer works on each process's local shards (:class:`ShardedOptimizer`): the exact-update
  modes (fp32 master weights or Kahan) and AdamW are elementwise, so updating shards gives the
  weights an unsharded update gives; only the gradient norm needs a sum over processes.
- The reference log-probs are computed sharded: every process scores a share of the sequences
  (all processes run the same number of forwards, as FSDP's collectives need), then the shares
  are summed across processes and rank 0 writes the cache.
- Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every process writes its shards
  into a temporary folder, rank 0 renames it when all are done (atomic), and DCP reshards on load,
  so a run can resume on another number of processes.
- The final model is gathered tensor by tensor onto rank 0's CPU and written as a
  ``save_pretrained`` folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from altpo_kernels import linear_logprobs

from altpo.data.packing import pack_micro_batches, sequence_units, with_key_mask
from altpo.errors import UserError
from altpo.train.reference_cache import ReferenceLogprobs, reusable_reference, save_reference_logprobs
from altpo.train.sequence_sums import sequence_sums
from altpo.train.signals import sigterm_interrupts
from altpo.train.step import backbone, last_hidden_states, output_weight
from altpo.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    checkpoint_dir,
    list_checkpoints,
    restore_rng_state,
    rng_state_tensors,
    save_final_model,
    copy_metrics_history,
)

SHARDS = "sharded"  # the DCP folder inside a checkpoint


def _dist():
    import torch.distributed as tdist

    return tdist


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class ShardRoot(nn.Module):
    """The root FSDP module: its forward computes either the training loss of a micro-batch (the
    :class:`~altpo.train.step.PackedAltPOLoss` inside) or, with ``logprobs_only``, the per-token
    log-probs of a micro-batch (the reference pass). Both read the lm_head weight inside this
    forward, where FSDP has gathered it."""

    def __init__(self, loss_module: nn.Module):
        super().__init__()
        self.loss_module = loss_module

    def forward(self, mb, num_pairs=None, num_retain_tokens=None, logprobs_only: bool = False):
        if logprobs_only:
            model = self.loss_module.model
            hidden = last_hidden_states(model, mb)
            return linear_logprobs(hidden, output_weight(model), mb.labels,
                                   backend=self.loss_module.loss_backend)
        return self.loss_module(mb, num_pairs, num_retain_tokens)


def decoder_layers(model) -> list[nn.Module]:
    layers = getattr(backbone(model), "layers", None)
    if layers is None:
        raise UserError(f"--parallel fsdp: {type(model).__name__} has no decoder layer list "
                        "(model.model.layers); use --parallel ddp")
    return list(layers)


def shard(loss_module: nn.Module, world: int, device: torch.device) -> ShardRoot:
    """``fully_shard`` each decoder layer of ``loss_module.model`` and the root; returns the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(loss_module.model):
        fully_shard(layer, mesh=mesh)
    root = ShardRoot(loss_module)
    fully_shard(root, mesh=mesh)
    return root


# ------------------------------------------------------------------------------------------------
# the optimizer on local shards


class ShardedOptimizer:
    """An optimizer (``MixedPrecisionAdamW`` or the offloaded one) over this process's shards.

    Each sharded parameter gets a plain leaf tensor sharing its local shard's storage; the inner
    optimizer updates those in place (so the DTensor parameters change with them), and its global
    gradient norm is completed by an all-reduce of squared norms.
    """

    def __init__(self, named_parameters, make_inner):
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.sharded = [p for _, p in named]
        self.locals = [nn.Parameter(p.to_local() if _is_dtensor(p) else p.data, requires_grad=True)
                       for p in self.sharded]
        if any(t.numel() == 0 for t in self.locals):
            empty = [n for (n, _), t in zip(named, self.locals) if t.numel() == 0][:3]
            raise UserError(f"--parallel fsdp: parameters {', '.join(empty)} have no rows on some "
                            "process (more processes than rows); use fewer processes")
        self.names = [n for n, _ in named]
        self.inner = make_inner(list(zip(self.names, self.locals)), norm_reduce=_all_reduce_sum)
        self.mode = self.inner.mode

    def _take_grads(self) -> None:
        for p, t in zip(self.sharded, self.locals):
            g = p.grad
            t.grad = None if g is None else (g.to_local() if _is_dtensor(g) else g)
            p.grad = None

    def zero_grad(self) -> None:
        for p, t in zip(self.sharded, self.locals):
            p.grad = None
            t.grad = None

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        self._take_grads()
        return self.inner.step(lr, max_grad_norm)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The inner state with each per-parameter tensor as a DTensor (DCP saves it sharded)."""
        from torch.distributed.tensor import DTensor

        by_name = dict(zip(self.names, self.sharded))
        out = {}
        for key, value in self.inner.state_tensors().items():
            name = _param_name(key, by_name)
            p = by_name.get(name)
            if p is not None and _is_dtensor(p) and value.dim() > 0:
                value = DTensor.from_local(value.to(p.to_local().device).view(p.to_local().shape),
                                           p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride())
            out[key] = value
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors({k: (v.to_local() if _is_dtensor(v) else v).cpu()
                                       for k, v in tensors.items()})


def _param_name(key: str, names) -> str | None:
    """The parameter a state key such as ``adam.<name>.exp_avg`` or ``master.<name>`` is about."""
    head, _, rest = key.partition(".")
    if head == "master":
        return rest
    for suffix in (".exp_avg_sq", ".exp_avg", ".step", ".compensation"):
        if rest.endswith(suffix):
            return rest[: -len(suffix)]
    return None


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    _dist().all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------
# the reference, sharded


@torch.no_grad()
def sharded_sequence_logprobs(root: ShardRoot, sequences, *, tokens_per_microbatch: int, rank: int,
                              world: int, device, masked_key_id: int | None = None) -> torch.Tensor:
    """Summed answer log-probs of every sequence, each process scoring every ``world``-th one;
    the same [S] fp32 CPU tensor on every process."""
    mine = list(range(rank, len(sequences), world))
    units = sequence_units([sequences[i] for i in mine])
    batches = [with_key_mask(b, masked_key_id)
               for b in (pack_micro_batches(units, tokens_per_microbatch) if units else [])]
    count = torch.tensor([len(batches)], device=device)
    _dist().all_reduce(count, op=_dist().ReduceOp.MAX)
    filler = pack_micro_batches(sequence_units(sequences[:1]), tokens_per_microbatch)[0]
    out = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    was_training = root.training
    root.eval()
    try:
        for i in range(int(count.item())):
            real = i < len(batches)
            mb = (batches[i] if real else filler).to(device)
            token_logp = root(mb, logprobs_only=True)  # every process joins every forward
            if not real:
                continue
            per_seq = sequence_sums(token_logp, mb.seq_ids, len(mb.seq_lens))
            keys = torch.tensor([mine[u.key] for u in mb.units], dtype=torch.long, device=device)
            out[keys] = per_seq[torch.tensor(mb.unit_offsets, device=device)].double()
    finally:
        root.train(was_training)
        root.reshard()
    _dist().all_reduce(out)
    return out.float().cpu()


def sharded_reference_logprobs(root: ShardRoot, data, key, path: Path, budget, config, dist, say):
    """Like :func:`altpo.train.reference_cache.cached_reference_logprobs`, with the scoring
    shared by all processes of a sharded model. SIGTERM (torchrun passes it to every process)
    stops it like Ctrl-C: the cache is written atomically, so it is whole or absent."""
    ref, _ = reusable_reference(path, key, data, dist, say)
    if ref is not None:
        return ref
    seqs = [(s.input_ids, s.labels) for s in data.forget] + \
           [(s.input_ids, s.labels) for s in data.alternates]
    with sigterm_interrupts("while the reference log-probs were computed"):
        logps = sharded_sequence_logprobs(root, seqs, tokens_per_microbatch=budget, rank=dist.rank,
                                          world=dist.world, device=dist.device,
                                          masked_key_id=data.masked_key_id)
        q = len(data.forget)
        ref = ReferenceLogprobs(logps[:q].clone(), logps[q:].clone(), key, path)
        if dist.rank == 0:
            save_reference_logprobs(path, ref, {"model": config.model, "forget_split": config.forget_split,
                                                "alternates": config.alternates})
    if dist.rank == 0:
        say(f"reference log-probs: computed {len(seqs)} sequences on {dist.world} processes, "
            f"cached in {path}")
    dist.barrier()
    return ref


# ------------------------------------------------------------------------------------------------
# checkpoints and the final model


def save_sharded_checkpoint(output_dir, step: int, *, model, tokenizer, optimizer: ShardedOptimizer,
                            state: dict, keep: int | None, dist) -> Path:
    """Checkpoint ``step`` through DCP: all processes write shards into a temporary folder, then
    rank 0 adds the JSON state and the RNG and renames the folder (a half-written checkpoint never
    has the final name). Called on every process."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-sharded")
    if dist.rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_tensors()},
             checkpoint_id=str(tmp / SHARDS))
    dist.barrier()
    if dist.rank == 0:
        model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in rng_state_tensors().items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({**state, "sharded": True, "world_size": dist.world},
                                                 indent=2, sort_keys=True))
        copy_metrics_history(output_dir, tmp, step)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        if keep is not None and keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: Path, *, model, optimizer: ShardedOptimizer) -> dict:
    """Load a checkpoint written by :func:`save_sharded_checkpoint` (any number of processes, as
    far as DCP can reshard) into the sharded ``model`` and ``optimizer``; returns its JSON state."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / SHARDS).is_dir():
        raise UserError(f"--resume: checkpoint {path} was not written by --parallel fsdp (no "
                        f"{SHARDS}/ folder); resume it with --parallel ddp")
    state = {"model": model.state_dict(), "optimizer": _optimizer_template(path / SHARDS, optimizer)}
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    optimizer.load_state_tensors(state["optimizer"])
    restore_rng_state(load_file(str(path / STATE_TENSORS)))
    return json.loads((path / STATE_JSON).read_text())


def _optimizer_template(folder: Path, optimizer: ShardedOptimizer) -> dict:
    """Tensors to load the saved optimizer state into: the keys the checkpoint holds (a fresh
    optimizer has no moments yet), sharded like their parameters on this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import DTensor

    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    by_name = dict(zip(optimizer.names, optimizer.sharded))
    out = {}
    for fqn, item in meta.items():
        if not fqn.startswith("optimizer.") or not isinstance(item, TensorStorageMetadata):
            continue
        key = fqn[len("optimizer."):]
        p = by_name.get(_param_name(key, by_name))
        dtype = item.properties.dtype
        if p is not None and _is_dtensor(p) and tuple(item.size) == tuple(p.shape):
            local = torch.zeros(p.to_local().shape, dtype=dtype, device=p.to_local().device)
            out[key] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
        else:
            out[key] = torch.zeros(tuple(item.size), dtype=dtype)
    return out


def full_state_dict(model, rank: int) -> dict[str, torch.Tensor] | None:
    """Every tensor of a sharded model, gathered one at a time onto rank 0's CPU (None elsewhere)."""
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if _is_dtensor(t) else t
        if rank == 0:
            out[name] = full.detach().cpu().clone()
        del full
    return out if rank == 0 else None


class _SavesState:
    """Stands in for a model in ``save_final_model``: ``save_pretrained`` with a given state dict."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, folder, **kwargs):
        self.model.save_pretrained(folder, state_dict=self.state_dict, **kwargs)


def save_sharded_final_model(output_dir, model, tokenizer, rank: int) -> None:
    """The final ``save_pretrained`` folder of a sharded model (collective; rank 0 writes)."""
    state = full_state_dict(model, rank)
    if rank == 0:
        save_final_model(output_dir, _SavesState(model, state), tokenizer)
