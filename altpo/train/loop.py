"""The AltPO training loop: ``train(config) -> TrainResult``.

Read top to bottom, it is the whole run:

1. settle the output folder (fresh, ``--overwrite`` or ``--resume``) and fail early on bad input;
2. load the tokenizer and the TOFU rows, tokenise them with the chat template;
3. load the model, switch it to packed attention;
4. reference log-probs: from the cache, or computed once with the starting weights and cached;
5. AdamW with exact bf16 updates, the warm-up + linear-decay schedule, and (on ``--resume``) the
   checkpoint's weights, optimizer state and RNG;
6. the steps: sample the step's rows, pack them, forward/backward through the fused loss with
   step-level normalisers, all-reduce across ranks, clip, update, log, checkpoint;
7. save the final ``save_pretrained`` folder.

Several processes: launch the same command with ``torchrun --nproc-per-node N``; each rank takes
its share of every step (DistributedDataParallel, gloo on CPU, nccl on CUDA; or, with
``--parallel fsdp``, FSDP2 sharding: ``altpo.train.fsdp``). LoRA and optimizer states in host
memory: ``altpo.train.parallel``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from altpo.data.data_checks import check_answer_tokens, check_retain_overlap, duplicate_alternates_note
from altpo.data.packing import num_loss_tokens, pack_micro_batches, retain_units
from altpo.data.step_sampling import StepSampler
from altpo.data.tofu import ChatFormat, build_altpo_data, load_tofu_split, truncation_report
from altpo.errors import UserError
from altpo.model.loading import load_causal_lm, load_tokenizer
from altpo.train.checkpoint import (
    load_checkpoint_state,
    load_model_weights,
    remove_run_outputs,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
)
from altpo.train.config import TrainConfig
from altpo.train.distributed import Distributed
from altpo.train.epoch_eval import EpochEvaluator
from altpo.train.finite_weights import check_finite_weights
from altpo.train.input_fingerprints import check_resume_inputs, input_fingerprints
from altpo.train.master_weights import NonFiniteGradientError
from altpo.train.memory import explain_oom, memory_settings, train_dtype
from altpo.train.numerics import OpenUnlearningSteps
from altpo.train.optimizer_in_backward import optimizer_step_in_backward
from altpo.train.output_lock import output_lock
from altpo.train.parallel import ScaleOut
from altpo.train.preflight import preflight
from altpo.train.reference_cache import cached_reference_logprobs, cache_key, model_fingerprint, resident_reference
from altpo.train.report import (
    NonFiniteLossError,
    Printer,
    TrainResult,
    gib,
    metrics_record,
    non_finite_message,
    peak_memory,
    summary_dict,
    transformers_bars,
)
from altpo.train.run_folder import (
    CONFIG_NAME,
    METRICS_NAME,
    REF_CACHE_NAME,
    SUMMARY_NAME,
    check_output_folder,
    checkpoint_master_mode,
    trim_metrics,
)
from altpo.train.signals import stop_signals
from altpo.train.run_manifest import check_output_is_not_an_input, start_run
from altpo.train.methods import method_alternates, needs_reference, prepare_step
from altpo.train.step import forward_backward

__all__ = ["train", "TrainResult", "NonFiniteLossError"]


# ================================================================================================
# the run


def train(config: TrainConfig, *, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run AltPO as ``config`` says; returns when done, interrupted (checkpoint saved) or failed.

    ``on_step(record)`` is called after every optimizer step with that step's metrics (the same
    dict that goes to ``metrics.jsonl``). Raises :class:`~altpo.cli.UserError` for bad input, an
    out-of-memory device (with what to change) and a non-finite loss (:class:`NonFiniteLossError`).
    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group and trains data-parallel.
    """
    config = TrainConfig(**config.to_dict()).validate()
    check_output_is_not_an_input(config)  # before the lock: nothing is written into an input
    dist = Distributed.setup(config.device, config.dist_timeout)
    try:  # only our bars; one run per output folder, locked for the run's lifetime
        with transformers_bars(enabled=False), output_lock(Path(config.output).expanduser(), dist):
            return _train(config, dist, on_step)
    except RuntimeError as err:
        stalled = dist.stall_error(err)
        if stalled is None:
            raise
        raise stalled from None
    finally:
        dist.cleanup()


def _train(config: TrainConfig, dist: "Distributed", on_step) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    say = Printer(quiet=config.quiet or dist.rank != 0)
    out = Path(config.output).expanduser()

    # 1. the output folder and early checks: decide before any expensive work, change nothing yet
    preflight(config, dist, out, say)
    resume_from = check_output_folder(out, config, say)

    # 2. tokenizer and data
    tokenizer = load_tokenizer(config.tokenizer or config.model,
                               "--tokenizer" if config.tokenizer else "--model")
    fmt = ChatFormat(config.system_prompt or None, config.date_string)
    forget_rows = load_tofu_split(config.data, config.forget_split)
    retain_rows = load_tofu_split(config.data, config.retain_split)
    check_retain_overlap(forget_rows, retain_rows, config.forget_split, config.retain_split)
    retain_rows = retain_rows[: config.max_retain_rows]
    # alternates are checked against the whole split, then cut with it
    alternates = method_alternates(config, forget_rows)[: config.max_forget_rows]
    forget_rows = forget_rows[: config.max_forget_rows]
    data = build_altpo_data(tokenizer, forget_rows, alternates, retain_rows, fmt=fmt,
                            max_length=config.max_length)
    check_answer_tokens(data, config.max_length)
    repeated = duplicate_alternates_note(alternates, config.alternates)
    if repeated:
        say(repeated)
    note = truncation_report(data, config.max_length)
    if note:
        say(note)
    if config.batch_size > data.num_pairs:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the data: {config.forget_split} has "
            f"{len(data.forget)} questions with {data.num_pairs} alternates in all; lower "
            f"--batch-size to at most {data.num_pairs}"
        )
    if config.batch_size < dist.world:
        raise UserError(f"--batch-size {config.batch_size} is smaller than the {dist.world} "
                        "processes; every process needs at least one forget pair")
    # open-unlearning numerics: pairs stay in the loader's order, grouped as its loader groups them
    ou_steps = OpenUnlearningSteps(config, data, dist.world) if config.numerics == "open-unlearning" else None
    sampler = StepSampler(data.num_pairs, len(data.retain), config.batch_size, config.seed,
                          None if ou_steps else data.pair_question)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    warmup_steps = int(round(config.warmup_epochs * sampler.steps_per_epoch))

    # 3. the model, and the memory settings (the planner's, on a GPU, where asked for)
    dtype = train_dtype(config.dtype, dist.device)
    model = load_causal_lm(config.model, dtype)
    model_hash = model_fingerprint(model)
    inputs = input_fingerprints(config, tokenizer, forget_rows, retain_rows, alternates, data,
                                model_hash, dtype)
    if resume_from is not None:
        check_resume_inputs(resume_from, inputs, say)
    saved_mode = checkpoint_master_mode(resume_from)
    scale = ScaleOut.choose(config, model, dtype, dist)  # ddp or fsdp, LoRA, optimizer offload
    memory = memory_settings(config, model, dtype, dist.device, data, sampler, saved_mode,
                              dist.world, **scale.plan_options())
    with explain_oom(config, memory):
        if not scale.fsdp:  # fully_shard moves each process's shards to its device itself
            model.to(dist.device)
    if ou_steps is not None:
        ou_steps.check_memory(memory.optimizer_in_backward)
    attention = _enable_packed_attention(model, config.attention)
    budget = memory.tokens_per_microbatch
    if memory.optimizer_in_backward and dist.world > 1:
        raise UserError("--optimizer-in-backward on does not work with several processes: DDP "
                        "all-reduces gradients in one backward of the whole model, while the "
                        "update in backward needs each layer's gradient reduced before its update; "
                        "use --optimizer-in-backward off under torchrun")
    if memory.checkpointing != "none":
        from altpo.model.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model, memory.checkpointing)
    say(f"model {config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')} on {dist.device}, attention {attention}, "
        f"{budget} tokens per micro-batch, checkpointing {memory.checkpointing}, master weights "
        f"{memory.master_weights}, optimizer in backward "
        f"{'on' if memory.optimizer_in_backward else 'off'}, {dist.world} process(es)")
    if memory.plan is not None:
        say(f"memory plan: predicted peak {gib(memory.plan.predicted_allocated_bytes)} of "
            f"{gib(memory.plan.gpu_memory_bytes)} free ({memory.source})")

    # 4. reference log-probs (with the starting weights, before any update or checkpoint load)
    ref, ref_model = None, None
    ref_path = Path(config.ref_cache).expanduser() if config.ref_cache else out / REF_CACHE_NAME
    with explain_oom(config, memory):
        if scale.fsdp:
            loss_module = scale.build(model, config, dist)  # sharded; the reference is the base model
        if not needs_reference(config.method):
            pass  # a method without a reference: no reference model at all
        elif config.reference == "cached" and scale.fsdp:
            key = cache_key(model_hash, data.reference_fingerprint(), dtype)
            ref = scale.reference(data, key, ref_path, budget, config, dist, say)
        elif config.reference == "cached":
            key = cache_key(model_hash, data.reference_fingerprint(), dtype)
            ref = cached_reference_logprobs(model, data, key, ref_path, budget, config, dist, say)
        else:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # 5. optimizer, schedule, resume
    if not scale.fsdp:
        loss_module = scale.build(model, config, dist)  # LoRA adapters go in after the reference
    if resume_from is not None and not scale.fsdp:
        load_model_weights(model, resume_from)
    optimizer = scale.optimizer(model, config, memory)
    start_step = 0
    if resume_from is not None and scale.fsdp:
        start_step = int(scale.load_checkpoint(resume_from, model, optimizer)["step"])
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})")
    elif resume_from is not None:
        state, tensors = load_checkpoint_state(resume_from)
        optimizer.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("rng.")})
        restore_rng_state(tensors)
        start_step = int(state["step"])
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})")

    def lr_at(step: int) -> float:
        # HF's linear schedule with warm-up: step 0 of a warm-up has learning rate 0
        if step < warmup_steps:
            return config.lr * step / warmup_steps
        return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    model.train()
    step_module, no_sync = scale.step_module or loss_module, None
    if dist.world > 1 and not scale.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            loss_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        no_sync = step_module.no_sync
    fill_reference = resident_reference(ref_model, config, budget) if ref_model is not None else None

    # outputs: only now that everything loaded is anything changed on disk
    metrics_path = out / METRICS_NAME
    if dist.rank == 0:
        if config.overwrite:
            remove_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        start_run(out)  # the run manifest: what --overwrite may remove later
        (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        trim_metrics(metrics_path, start_step)

    def save(step: int) -> Path | None:
        check_finite_weights(model, step, f"checkpoint step-{step:08d}", last_checkpoint)
        if dist.rank != 0 and not scale.fsdp:
            return None
        state = {"step": step, "epoch": step / sampler.steps_per_epoch, "total_steps": total_steps,
                 "warmup_steps": warmup_steps, "lr_next": lr_at(step),
                 "data_position": {"epoch": step // sampler.steps_per_epoch,
                                   "step_in_epoch": step % sampler.steps_per_epoch},
                 "settings": config.to_dict(),
                 "reference_key": ref.key if ref is not None else None, "inputs": inputs,
                 "master_weights": optimizer.mode}
        if scale.fsdp:
            return scale.save_checkpoint(out, step, model, tokenizer, optimizer, state,
                                         config.keep_checkpoints or None, dist)
        tensors = {**optimizer.state_tensors(), **rng_state_tensors()}
        return save_checkpoint(out, step, model=model, tokenizer=tokenizer, tensors=tensors,
                               state=state, keep=config.keep_checkpoints or None)

    evaluator = (EpochEvaluator(config, tokenizer, out, dist.rank, dist.world)
                 if config.eval_every_epoch else None)

    # 6. the steps
    history: list[dict] = []
    last_checkpoint = resume_from
    interrupted = None
    tokens_done, train_seconds = 0, 0.0
    bar = say.progress(total_steps, start_step)
    with stop_signals() as stop, explain_oom(config, memory):
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rows = sampler.rows(step, dist.rank, dist.world)
            units = prepare_step(loss_module, data, config.method, rows, ref)
            if config.alpha > 0:  # with alpha 0 the retain rows would cost compute for nothing
                units += retain_units(data, rows.retain)
            micro_batches = pack_micro_batches(units, budget)
            num_retain_tokens = (sum(num_loss_tokens(data.retain[r].labels) for r in rows.step_retain)
                                 if config.alpha > 0 else 0)

            lr = lr_at(step)
            if memory.optimizer_in_backward:
                # one process only (checked above): forwards, then the update inside backward
                try:
                    stats = optimizer_step_in_backward(
                        loss_module, optimizer, micro_batches, num_pairs=len(rows.step_pairs),
                        num_retain_tokens=num_retain_tokens, lr=lr,
                        max_grad_norm=config.max_grad_norm, device=dist.device,
                        before_forward=fill_reference,
                        forward_context=memory.forward_context(dist.device))
                except NonFiniteGradientError as err:
                    raise NonFiniteLossError(non_finite_message(
                        step + 1, err.stats, err.norm, last_checkpoint)) from None
                stop_requested = stop.requested
            else:
                stats = (ou_steps.runner(rows, ref, budget) if ou_steps else forward_backward)(
                    step_module, micro_batches, num_pairs=len(rows.step_pairs),
                    num_retain_tokens=num_retain_tokens, loss_scale=float(dist.world),
                    no_sync=no_sync, device=dist.device, before_forward=fill_reference,
                    forward_context=memory.forward_context(dist.device))
                stats, stop_requested = dist.sum_stats(stats, stop.requested)
                try:
                    if not math.isfinite(stats.loss):
                        optimizer.zero_grad()
                        raise NonFiniteGradientError(float("nan"))
                    stats.grad_norm = optimizer.step(lr, config.max_grad_norm)
                except NonFiniteGradientError as err:
                    raise NonFiniteLossError(
                        non_finite_message(step + 1, stats, err.norm, last_checkpoint)) from None

            step_time = time.perf_counter() - t0
            tokens_done += stats.num_tokens
            train_seconds += step_time
            record = metrics_record(step + 1, sampler.steps_per_epoch, lr, stats, step_time,
                                     dist.device)
            history.append(record)
            if dist.rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(record)
            if on_step is not None:
                on_step(record)
            if evaluator is not None:
                evaluator.after_step(model, step + 1, sampler.steps_per_epoch, say)

            done = step + 1
            if stop_requested and done < total_steps:
                interrupted = stop.signal_name or "signal"
                last_checkpoint = save(done)
                dist.barrier()
                break
            if config.save_every and done % config.save_every == 0 and done < total_steps:
                last_checkpoint = save(done) or last_checkpoint
    bar.close()

    # 7. the final model
    steps_done = history[-1]["step"] if history else start_step
    completed = interrupted is None and steps_done >= total_steps
    if completed:
        check_finite_weights(model, steps_done, "the final model", last_checkpoint)
        scale.save_final(out, model, tokenizer, config, dist)
    dist.barrier()
    result = TrainResult(
        output_dir=out, steps_done=steps_done, total_steps=total_steps, completed=completed,
        interrupted=interrupted, last_metrics=history[-1] if history else None,
        tokens_per_second=tokens_done / train_seconds if train_seconds else 0.0,
        wall_time_s=time.perf_counter() - started, peak_memory_bytes=peak_memory(dist.device),
        reference_cache=ref.path if ref is not None else None,
        reference_reused=bool(ref is not None and ref.reused),
        checkpoint=last_checkpoint if interrupted else None, tokens_per_microbatch=budget,
        predicted_peak_bytes=memory.plan.predicted_allocated_bytes if memory.plan else None,
        history=history)
    if dist.rank == 0:
        (out / SUMMARY_NAME).write_text(json.dumps(summary_dict(result), indent=2))
    say.summary(result)
    return result


def _enable_packed_attention(model, backend: str) -> str:
    from altpo.model.packed_attention import enable_packed_attention

    try:
        return enable_packed_attention(model, backend)
    except ValueError as err:
        raise UserError(f"--attention {backend}: {err}") from None
