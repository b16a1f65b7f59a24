"""How a run spreads over processes and memory: DDP or FSDP, LoRA adapters, optimizer on the CPU.

:class:`ScaleOut` gathers the decisions the loop needs in a few calls: ``choose`` (ddp or fsdp),
``build`` (the loss module: LoRA adapters added, FSDP sharding applied), ``reference`` (sharded
reference log-probs), ``optimizer`` (exact bf16 AdamW, on shards, in host memory when asked),
``save_checkpoint``/``load_checkpoint`` (DCP under FSDP) and ``save_final``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from altpo.errors import UserError


@dataclass
class ScaleOut:
    fsdp: bool = False
    lora: bool = False
    offload: bool = False
    step_module: object = None      # the FSDP root (what forward_backward calls) under fsdp
    peft_model: object = None       # the peft wrapper under LoRA (its adapter is what is saved)
    details: dict = field(default_factory=dict)

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

    def plan_options(self) -> dict:
        """What the memory planner must know about this run (see ``memory_settings``)."""
        return {"parallel": "fsdp" if self.fsdp else "ddp", "lora": self.lora, "offload": self.offload}

    # --------------------------------------------------------------------------------------------

    def build(self, model, config, dist):
        """The loss module; under LoRA with adapters in the model, under FSDP sharded."""
        from altpo.train.methods import packed_loss_module

        if self.lora:
            from altpo.train.lora import add_lora

            self.peft_model = add_lora(model, config)
        loss_module = packed_loss_module(model, config)  # altpo, or another method (methods.py)
        if self.fsdp:
            from altpo.train.fsdp import shard

            self.step_module = shard(loss_module, dist.world, dist.device)
        return loss_module

    def reference(self, data, key, path, budget, config, dist, say):
        from altpo.train.fsdp import sharded_reference_logprobs

        if self.lora:
            with self.peft_model.disable_adapter():
                return sharded_reference_logprobs(self.step_module, data, key, path, budget,
                                                  config, dist, say)
        return sharded_reference_logprobs(self.step_module, data, key, path, budget, config, dist, say)

    def optimizer(self, model, config, memory):
        """AdamW with exact bf16 updates over the trainable parameters (the adapters under LoRA),
        on this process's shards under FSDP, with its states in host memory when offloaded."""
        def make(named, norm_reduce=None):
            kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                          eps=config.adam_eps, weight_decay=config.weight_decay,
                          master_weights=memory.master_weights, norm_reduce=norm_reduce)
            if self.offload:
                from altpo.train.optimizer_offload import OffloadedAdamW

                return OffloadedAdamW(named, update=config.offload_update, **kwargs)
            from altpo.train.master_weights import MixedPrecisionAdamW

            return MixedPrecisionAdamW(named, **kwargs)

        named = list(model.named_parameters())
        if self.fsdp:
            from altpo.train.fsdp import ShardedOptimizer

            return ShardedOptimizer(named, make)
        return make(named)

    # --------------------------------------------------------------------------------------------

    def save_checkpoint(self, out, step, model, tokenizer, optimizer, state, keep, dist):
        from altpo.train.fsdp import save_sharded_checkpoint

        return save_sharded_checkpoint(out, step, model=model, tokenizer=tokenizer,
                                       optimizer=optimizer, state=state, keep=keep, dist=dist)

    def load_checkpoint(self, path, model, optimizer) -> dict:
        from altpo.train.fsdp import load_sharded_checkpoint

        return load_sharded_checkpoint(path, model=model, optimizer=optimizer)

    def save_final(self, out, model, tokenizer, config, dist) -> None:
        """The output folder: the save_pretrained model, or under LoRA the adapter (and with
        ``--merge`` the merged model). Called on every process."""
        if self.fsdp:
            from altpo.train.fsdp import full_state_dict

            state = full_state_dict(model, dist.rank)
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.rank == 0 else None
        if dist.rank == 0:
            if self.lora:
                from altpo.train.lora import save_lora_outputs

                save_lora_outputs(out, self.peft_model, state, tokenizer, config)
            else:
                from altpo.train.checkpoint import save_final_model
                from altpo.train.fsdp import _SavesState

                save_final_model(out, _SavesState(model, state) if self.fsdp else model, tokenizer)


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
