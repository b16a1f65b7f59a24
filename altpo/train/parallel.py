"""How a run spreads over processes and memory: the one scale-out strategy, chosen once.

:class:`ScaleOut` owns every difference between one process, DDP and FSDP2, LoRA adapters and
optimizer states in host memory, so the training loop has no branch on them:

- ``choose``: ddp or fsdp (``--parallel``), and the refusals of settings that do not combine;
- ``place``: the weights onto this process's device (FSDP moves its shards when it shards);
- ``reference_logprobs``: the cached reference, scored on rank 0 or sharded over all processes;
- ``build``: the modules a step runs (LoRA adapters added, DDP's wrapper and its ``no_sync``, or
  FSDP's sharding);
- ``optimizer``: exact bf16 AdamW (on shards, in host memory when asked), and on ``--resume`` the
  checkpoint's weights, optimizer state and RNG;
- ``save_checkpoint`` (DCP under FSDP) and ``save_final``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from altpo.errors import UserError
from altpo.train.checkpoint import (
    load_checkpoint_state,
    load_model_weights,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    save_final_model,
)
from altpo.train.fsdp import (
    ShardedOptimizer,
    full_state_dict,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    save_sharded_final_model,
    shard,
    sharded_reference_logprobs,
)
from altpo.train.lora import add_lora, save_lora_outputs
from altpo.train.master_weights import MixedPrecisionAdamW
from altpo.train.methods import packed_loss_module
from altpo.train.optimizer_offload import OffloadedAdamW
from altpo.train.reference_cache import cached_reference_logprobs


@dataclass
class LossModules:
    """What a step runs: ``loss`` (the :class:`~altpo.train.step.PackedLoss`), ``step`` (the
    module to call: DDP's wrapper or the FSDP root around ``loss``, or ``loss`` itself) and
    ``no_sync`` (DDP's: all but a step's last micro-batch skip the gradient all-reduce)."""

    loss: nn.Module
    step: nn.Module
    no_sync: Callable | None = None


@dataclass
class ScaleOut:
    """The run's scale-out strategy (see the module docstring); made by :meth:`choose`."""

    fsdp: bool = False
    lora: bool = False
    offload: bool = False
    modules: LossModules | None = None  # once built (see ``build``)
    peft_model: object = None       # the peft wrapper under LoRA (its adapter is what is saved)

    @classmethod
    def choose(cls, config, model, dtype, dist) -> "ScaleOut":
        """``--parallel``: fsdp or ddp; auto picks fsdp when, on CUDA with several processes, the
        planner says one whole model (ddp) does not fit a GPU."""
        parallel = config.parallel
        if parallel == "auto":
            parallel = "ddp"
            if dist.world > 1 and dist.device.type == "cuda":
                parallel = "fsdp" if not _ddp_fits(config, model, dtype, dist) else "ddp"
        if config.optimizer_offload == "cpu" and config.optimizer_in_backward == "on":
            raise UserError("--optimizer-offload cpu and --optimizer-in-backward on do not combine: "
                            "the offloaded update runs once per step after backward; pick one")
        if config.lora_rank and config.optimizer_in_backward == "on":
            raise UserError("--optimizer-in-backward on is for full-parameter training; with "
                            "--lora-rank the adapters' gradients are small: use --optimizer-in-backward off")
        if parallel == "fsdp" and config.optimizer_in_backward == "on":
            raise UserError("--optimizer-in-backward on does not work with --parallel fsdp (FSDP "
                            "reduce-scatters gradients itself); use --optimizer-in-backward off")
        if parallel == "fsdp" and dist.world == 1:
            _single_process_group(dist)  # fully_shard needs a process group, even of one
        return cls(fsdp=parallel == "fsdp", lora=bool(config.lora_rank),
                   offload=config.optimizer_offload == "cpu")

    def check_resident_reference(self) -> None:
        """``--reference resident`` copies the whole model; under FSDP that copy is what sharding
        avoids (``--parallel auto`` can pick fsdp after the settings were checked)."""
        if self.fsdp:
            raise UserError("--reference resident keeps a whole copy of the model on every process, "
                            "and --parallel auto chose fsdp (one whole model does not fit a GPU); "
                            "use --reference cached")

    def plan_options(self) -> dict:
        """What the memory planner must know about this run (see ``memory_settings``)."""
        return {"parallel": "fsdp" if self.fsdp else "ddp", "lora": self.lora, "offload": self.offload}

    # --------------------------------------------------------------------------------------------
    # the model and the loss modules

    def place(self, model, dist) -> None:
        """The whole model onto this process's device (before packed attention picks its backend
        for that device); under FSDP nothing yet: ``fully_shard`` moves each shard itself."""
        if not self.fsdp:
            model.to(dist.device)

    def build(self, model, config, dist) -> LossModules:
        """The modules a step runs (made once): LoRA adapters added, then the loss module, DDP's
        wrapper around it or FSDP's sharding. Without FSDP this comes after the reference (LoRA
        adapters go in once the reference has the starting weights); under FSDP the reference
        itself needs the sharded model and builds it first."""
        if self.modules is None:
            self.modules = self._build(model, config, dist)
        return self.modules

    def _build(self, model, config, dist) -> LossModules:
        if self.lora:
            self.peft_model = add_lora(model, config)
        loss_module = packed_loss_module(model, config)  # the run's method and its settings
        if self.fsdp:
            return LossModules(loss_module, shard(loss_module, dist.world, dist.device))
        if dist.world > 1:
            ddp = DistributedDataParallel(
                loss_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            return LossModules(loss_module, ddp, ddp.no_sync)
        return LossModules(loss_module, loss_module)

    def reference_logprobs(self, model, data, key, path, budget, config, dist, say):
        """The cached reference log-probs (:func:`~altpo.train.reference_cache.cached_reference_logprobs`);
        under FSDP every process scores a share with the sharded model (LoRA adapters off)."""
        if not self.fsdp:
            return cached_reference_logprobs(model, data, key, path, budget, config, dist, say)
        root = self.build(model, config, dist).step
        if self.lora:
            with self.peft_model.disable_adapter():
                return sharded_reference_logprobs(root, data, key, path, budget, config, dist, say)
        return sharded_reference_logprobs(root, data, key, path, budget, config, dist, say)

    # --------------------------------------------------------------------------------------------
    # the optimizer, resume and saving

    def optimizer(self, model, config, memory, resume_from: Path | None = None):
        """``(optimizer, start step)``: AdamW with exact bf16 updates over the trainable
        parameters (the adapters under LoRA), on this process's shards under FSDP, with its
        states in host memory when offloaded; on ``--resume`` (``resume_from``) loaded with the
        checkpoint's weights, optimizer state and RNG, and its step."""
        def make(named, norm_reduce=None):
            kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                          eps=config.adam_eps, weight_decay=config.weight_decay,
                          master_weights=memory.master_weights, norm_reduce=norm_reduce)
            if self.offload:
                return OffloadedAdamW(named, update=config.offload_update, **kwargs)
            return MixedPrecisionAdamW(named, **kwargs)

        named = list(model.named_parameters())
        if self.fsdp:
            optimizer = ShardedOptimizer(named, make)
            if resume_from is None:
                return optimizer, 0
            return optimizer, int(load_sharded_checkpoint(resume_from, model=model, optimizer=optimizer)["step"])
        if resume_from is not None:
            load_model_weights(model, resume_from)  # before the optimizer copies the weights
        optimizer = make(named)
        if resume_from is None:
            return optimizer, 0
        state, tensors = load_checkpoint_state(resume_from)
        optimizer.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("rng.")})
        restore_rng_state(tensors)
        return optimizer, int(state["step"])

    def save_checkpoint(self, out, step, model, tokenizer, optimizer, state, keep, dist) -> Path | None:
        """Checkpoint ``step`` (called on every process): DCP shards under FSDP, else rank 0
        writes the folder and the other ranks return None."""
        if self.fsdp:
            return save_sharded_checkpoint(out, step, model=model, tokenizer=tokenizer,
                                           optimizer=optimizer, state=state, keep=keep, dist=dist)
        if dist.rank != 0:
            return None
        tensors = {**optimizer.state_tensors(), **rng_state_tensors()}
        return save_checkpoint(out, step, model=model, tokenizer=tokenizer, tensors=tensors,
                               state=state, keep=keep)

    def save_final(self, out, model, tokenizer, config, dist) -> None:
        """The output folder: the save_pretrained model, or under LoRA the adapter (and with
        ``--merge`` the merged model). Called on every process."""
        if self.lora:
            if self.fsdp:
                state = full_state_dict(model, dist.rank)
            else:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.rank == 0 else None
            if dist.rank == 0:
                save_lora_outputs(out, self.peft_model, state, tokenizer, config)
        elif self.fsdp:
            save_sharded_final_model(out, model, tokenizer, dist.rank)
        elif dist.rank == 0:
            save_final_model(out, model, tokenizer)


def _single_process_group(dist) -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if dist.device.type == "cuda" else "gloo",
                                 store=tdist.HashStore(), rank=0, world_size=1)
        dist.created_group = True


def _ddp_fits(config, model, dtype, dist) -> bool:
    """Whether the planner fits one whole model (ddp) into this GPU's free memory."""
    from altpo.plan import memory_plan

    free = int(torch.cuda.mem_get_info(dist.device)[0])
    plan = memory_plan.plan_memory(
        model.config, free, weight_dtype="bf16" if dtype == torch.bfloat16 else "fp32",
        master_weights="auto" if config.master_weights == "auto" else config.master_weights,
        lora_rank=int(config.lora_rank), optimizer_offload=config.optimizer_offload,
        cuda_context_bytes=0)
    return plan.fits
