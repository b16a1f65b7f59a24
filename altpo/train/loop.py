"""The AltPO training loop: ``train(config) -> TrainResult``.

Read :func:`run` top to bottom; it is the whole run, in numbered phases:

1. settle the output folder (fresh, ``--overwrite`` or ``--resume``) and fail early on bad input;
2. load the tokenizer and the TOFU rows, tokenise them with the chat template, and the sampler;
3. load the model, its memory settings, the scale-out strategy and the step runner, chosen once;
4. the strategy places the weights (one process, DDP, FSDP2; LoRA; optimizer states in host
   memory: :class:`altpo.train.parallel.ScaleOut`);
5. reference log-probs, at one place (:func:`altpo.train.reference_cache.step_reference`);
6. AdamW with exact bf16 updates, and (on ``--resume``) the checkpoint's weights, optimizer state
   and RNG; only then is anything written;
7. the steps: the runner (:mod:`altpo.train.step_runner`) packs each step's rows, runs forward and
   backward with step-level normalisers, all-reduces across ranks and updates; then log and
   checkpoint;
8. save the final ``save_pretrained`` folder.

Several processes: launch the same command with ``torchrun --nproc-per-node N``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from altpo.model.fingerprint import model_fingerprint
from altpo.model.loading import load_causal_lm
from altpo.train.checkpoint import Checkpoints
from altpo.train.config import TrainConfig
from altpo.train.distributed import Distributed
from altpo.train.epoch_eval import EpochEvaluator
from altpo.train.finite_weights import check_finite_weights
from altpo.train.input_fingerprints import check_resume_inputs, input_fingerprints
from altpo.train.memory import explain_oom, memory_settings, train_dtype
from altpo.train.model_setup import prepare_model
from altpo.train.output_lock import output_lock
from altpo.train.parallel import ScaleOut
from altpo.train.preflight import preflight
from altpo.train.reference_cache import step_reference
from altpo.train.report import NonFiniteLossError, Printer, StepLog, TrainResult, summary_dict, transformers_bars
from altpo.train.run_data import load_run_data
from altpo.train.run_folder import METRICS_NAME, SUMMARY_NAME, check_output_folder, checkpoint_master_mode, start_outputs
from altpo.train.run_manifest import check_output_is_not_an_input
from altpo.train.schedule import Schedule
from altpo.train.signals import stop_signals
from altpo.train.step_runner import choose_step_runner

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
            return run(config, dist, on_step)
    except RuntimeError as err:
        stalled = dist.stall_error(err)
        if stalled is None:
            raise
        raise stalled from None
    finally:
        dist.cleanup()


def run(config: TrainConfig, dist: Distributed, on_step=None) -> TrainResult:
    """The whole run on this process (see the module docstring); ``train`` sets up around it."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    say = Printer(quiet=config.quiet or dist.rank != 0)
    out = Path(config.output).expanduser()

    # 1. the output folder and early checks: decide before any expensive work, change nothing yet
    preflight(config, dist, out, say)
    resume_from = check_output_folder(out, config, say)

    # 2. tokenizer, data, and the rows of every step
    run_data = load_run_data(config, dist, say)
    data, sampler, tokenizer = run_data.data, run_data.sampler, run_data.tokenizer
    schedule = Schedule.for_run(config, sampler.steps_per_epoch)

    # 3. the model; its memory settings (the planner's, on a GPU, where asked for); the strategy
    #    (one process, ddp or fsdp; LoRA; optimizer offload) and the step runner, chosen once
    dtype = train_dtype(config.dtype, dist.device)
    model = load_causal_lm(config.model, dtype)
    model_hash = model_fingerprint(model)
    inputs = input_fingerprints(config, tokenizer, run_data.forget_rows, run_data.retain_rows,
                                run_data.alternates, data, model_hash, dtype)
    if resume_from is not None:
        check_resume_inputs(resume_from, inputs, say)
    scale = ScaleOut.choose(config, model, dtype, dist)
    memory = memory_settings(config, model, dtype, dist.device, data, sampler,
                             checkpoint_master_mode(resume_from), dist.world, **scale.plan_options())
    step_runner = choose_step_runner(config, memory, dist)

    # 4. the strategy puts the weights in place (this device; FSDP shards once it builds);
    #    packed attention and activation checkpointing
    with explain_oom(config, memory):
        scale.place(model, dist)
    prepare_model(model, config, memory, dtype, dist, say, masked_key_id=data.masked_key_id)

    # 5. reference log-probs, with the starting weights (before any update or checkpoint load)
    with explain_oom(config, memory):
        reference = step_reference(config, scale, model, data, model_hash, dtype,
                                   memory.tokens_per_microbatch, out, dist, say)
        modules = scale.build(model, config, dist)  # LoRA adapters go in after the reference

    # 6. optimizer and, on --resume, the checkpoint; only now is anything changed on disk
    optimizer, start_step = scale.optimizer(model, config, memory, resume_from)
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {start_step} of {schedule.total_steps})")
    model.train()
    start_outputs(out, config, dist.rank, start_step)
    checkpoints = Checkpoints(scale, out, model, tokenizer, optimizer, config, schedule,
                              reference.key, inputs, dist, last=resume_from)
    runner = step_runner(config, data, dist, memory, modules, optimizer, reference, checkpoints)
    evaluator = (EpochEvaluator(config, tokenizer, out, dist.rank, dist.world)
                 if config.eval_every_epoch else None)

    # 7. the steps
    log = StepLog(out / METRICS_NAME, dist.rank, say.progress(schedule.total_steps, start_step),
                  on_step, dist.device)
    interrupted, interrupted_at = None, None
    with stop_signals() as stop, explain_oom(config, memory):
        for step in range(start_step, schedule.total_steps):
            t0 = time.perf_counter()
            lr = schedule.lr_at(step)
            stats = runner.run(step, sampler.rows(step, dist.rank, dist.world), lr, stop)
            log.add(step + 1, sampler.steps_per_epoch, lr, stats, time.perf_counter() - t0)
            if evaluator is not None:
                evaluator.after_step(model, step + 1, sampler.steps_per_epoch, say)
            done = step + 1
            if stats.stop_requested and done < schedule.total_steps:
                interrupted = stop.signal_name or "signal"
                interrupted_at = checkpoints.save(done)
                dist.barrier()
                break
            if config.save_every and done % config.save_every == 0 and done < schedule.total_steps:
                checkpoints.save(done)
    log.bar.close()

    # 8. the final model
    steps_done = log.steps_done(start_step)
    completed = interrupted is None and steps_done >= schedule.total_steps
    if completed:
        check_finite_weights(model, steps_done, "the final model", checkpoints.last)
        scale.save_final(out, model, tokenizer, config, dist)
    dist.barrier()
    result = log.result(
        output_dir=out, steps_done=steps_done, total_steps=schedule.total_steps,
        completed=completed, interrupted=interrupted, wall_time_s=time.perf_counter() - started,
        reference_cache=reference.path, reference_reused=reference.reused,
        checkpoint=interrupted_at, tokens_per_microbatch=memory.tokens_per_microbatch,
        predicted_peak_bytes=memory.plan.predicted_allocated_bytes if memory.plan else None)
    if dist.rank == 0:
        (out / SUMMARY_NAME).write_text(json.dumps(summary_dict(result), indent=2))
    say.summary(result)
    return result
