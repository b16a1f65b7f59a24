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
its share of every step (DistributedDataParallel, gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint_state,
    load_model_weights,
    remove_run_outputs,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    save_final_model,
)
from .cli import UserError
from .master_weights import MixedPrecisionAdamW, NonFiniteGradientError
from .optimizer_in_backward import optimizer_step_in_backward
from .packing import UnitTooLongError, forget_units, num_loss_tokens, pack_micro_batches, retain_units
from .reference_logprobs_cache import (
    ReferenceLogprobs,
    cache_key,
    compute_reference_logprobs,
    load_reference_logprobs,
    model_fingerprint,
    save_reference_logprobs,
)
from .step_sampling import StepSampler
from .tofu_data import (
    AltPOData,
    ChatFormat,
    build_altpo_data,
    check_chat_template,
    load_alternates,
    load_tofu_split,
    truncation_report,
)
from .train_config import (
    DEFAULT_CPU_TOKENS_PER_MICROBATCH,
    DEFAULT_GPU_TOKENS_PER_MICROBATCH,
    TRAJECTORY_SETTINGS,
    TrainConfig,
)
from .train_step import PackedAltPOLoss, StepStats, forward_backward

REF_CACHE_NAME = "reference_logprobs.safetensors"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "train_summary.json"


class NonFiniteLossError(UserError):
    """The loss or gradient became NaN or infinite; no update was applied for that step."""


@dataclass
class TrainResult:
    """What :func:`train` did. ``history`` holds every step's metrics record of this process."""

    output_dir: Path
    steps_done: int
    total_steps: int
    completed: bool
    interrupted: str | None = None
    last_metrics: dict | None = None
    tokens_per_second: float = 0.0
    wall_time_s: float = 0.0
    peak_memory_bytes: int | None = None
    reference_cache: Path | None = None
    reference_reused: bool = False
    checkpoint: Path | None = None
    tokens_per_microbatch: int = 0
    predicted_peak_bytes: int | None = None
    history: list[dict] = field(default_factory=list)


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
    dist = _Distributed.setup(config.device)
    try:
        with _transformers_bars(enabled=not config.quiet and dist.rank == 0):
            return _train(config, dist, on_step)
    finally:
        dist.cleanup()


@contextmanager
def _transformers_bars(enabled: bool):
    """transformers' own loading/saving bars follow --quiet (and rank 0)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _train(config: TrainConfig, dist: "_Distributed", on_step) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    say = _Printer(quiet=config.quiet or dist.rank != 0)
    out = Path(config.output).expanduser()

    # 1. the output folder: decide before any expensive work, change nothing yet
    resume_from = _check_output_folder(out, config)

    # 2. tokenizer and data
    tokenizer = _load_tokenizer(config)
    fmt = ChatFormat(config.system_prompt or None, config.date_string)
    forget_rows = load_tofu_split(config.data, config.forget_split)
    retain_rows = load_tofu_split(config.data, config.retain_split)[: config.max_retain_rows]
    # alternates are checked against the whole split, then cut with it
    alternates = load_alternates(config.alternates, forget_rows)[: config.max_forget_rows]
    forget_rows = forget_rows[: config.max_forget_rows]
    data = build_altpo_data(tokenizer, forget_rows, alternates, retain_rows, fmt=fmt,
                            max_length=config.max_length)
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
    sampler = StepSampler(data.num_pairs, len(data.retain), config.batch_size, config.seed,
                          data.pair_question)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    warmup_steps = int(round(config.warmup_epochs * sampler.steps_per_epoch))

    # 3. the model, and the memory settings (the planner's, on a GPU, where asked for)
    dtype = _train_dtype(config.dtype, dist.device)
    model, model_hash = _load_model(config, dtype, need_hash=config.reference == "cached")
    saved_mode = _checkpoint_master_mode(resume_from)
    memory = _memory_settings(config, model, dtype, dist.device, data, sampler, saved_mode,
                              dist.world)
    with _explain_oom(config, memory):
        model.to(dist.device)
    attention = _enable_packed_attention(model, config.attention)
    budget = memory.tokens_per_microbatch
    if memory.optimizer_in_backward and dist.world > 1:
        raise UserError("--optimizer-in-backward on does not work with several processes: DDP "
                        "all-reduces gradients in one backward of the whole model, while the "
                        "update in backward needs each layer's gradient reduced before its update; "
                        "use --optimizer-in-backward off under torchrun")
    if memory.checkpointing != "none":
        from .activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model, memory.checkpointing)
    say(f"model {config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')} on {dist.device}, attention {attention}, "
        f"{budget} tokens per micro-batch, checkpointing {memory.checkpointing}, master weights "
        f"{memory.master_weights}, optimizer in backward "
        f"{'on' if memory.optimizer_in_backward else 'off'}, {dist.world} process(es)")
    if memory.plan is not None:
        say(f"memory plan: predicted peak {_gib(memory.plan.predicted_allocated_bytes)} of "
            f"{_gib(memory.plan.gpu_memory_bytes)} free ({memory.source})")

    # 4. reference log-probs (with the starting weights, before any update or checkpoint load)
    ref, ref_model = None, None
    ref_path = Path(config.ref_cache).expanduser() if config.ref_cache else out / REF_CACHE_NAME
    with _explain_oom(config, memory):
        if config.reference == "cached":
            key = cache_key(model_hash, data.reference_fingerprint(), dtype)
            ref = _reference_logprobs(model, data, key, ref_path, budget, config, dist, say)
        else:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # 5. optimizer, schedule, resume
    if resume_from is not None:
        load_model_weights(model, resume_from)
    optimizer = MixedPrecisionAdamW(
        model.named_parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps, weight_decay=config.weight_decay, master_weights=memory.master_weights)
    start_step = 0
    if resume_from is not None:
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
    loss_module = PackedAltPOLoss(model, beta=config.beta, alpha=config.alpha, gamma=config.gamma,
                                  loss_backend=config.loss_backend)
    step_module, no_sync = loss_module, None
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            loss_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        no_sync = step_module.no_sync
    fill_reference = _resident_reference(ref_model, config, budget) if ref_model is not None else None

    # outputs: only now that everything loaded is anything changed on disk
    metrics_path = out / METRICS_NAME
    if dist.rank == 0:
        if config.overwrite:
            remove_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        _trim_metrics(metrics_path, start_step)

    def save(step: int) -> Path | None:
        if dist.rank != 0:
            return None
        state = {"step": step, "epoch": step / sampler.steps_per_epoch, "total_steps": total_steps,
                 "warmup_steps": warmup_steps, "lr_next": lr_at(step),
                 "data_position": {"epoch": step // sampler.steps_per_epoch,
                                   "step_in_epoch": step % sampler.steps_per_epoch},
                 "settings": config.to_dict(),
                 "reference_key": ref.key if ref is not None else None,
                 "master_weights": optimizer.mode}
        tensors = {**optimizer.state_tensors(), **rng_state_tensors()}
        return save_checkpoint(out, step, model=model, tokenizer=tokenizer, tensors=tensors,
                               state=state, keep=config.keep_checkpoints or None)

    # 6. the steps
    history: list[dict] = []
    last_checkpoint = resume_from
    interrupted = None
    tokens_done, train_seconds = 0, 0.0
    bar = say.progress(total_steps, start_step)
    with _stop_signals() as stop, _explain_oom(config, memory):
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rows = sampler.rows(step, dist.rank, dist.world)
            units = forget_units(data, rows.pairs, *((ref.alternates, ref.forget) if ref else ()))
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
                    raise NonFiniteLossError(_non_finite_message(
                        step + 1, err.stats, err.norm, last_checkpoint)) from None
                stop_requested = stop.requested
            else:
                stats = forward_backward(
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
                        _non_finite_message(step + 1, stats, err.norm, last_checkpoint)) from None

            step_time = time.perf_counter() - t0
            tokens_done += stats.num_tokens
            train_seconds += step_time
            record = _metrics_record(step + 1, sampler.steps_per_epoch, lr, stats, step_time,
                                     dist.device)
            history.append(record)
            if dist.rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(record)
            if on_step is not None:
                on_step(record)

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
    if completed and dist.rank == 0:
        save_final_model(out, model, tokenizer)
    dist.barrier()
    result = TrainResult(
        output_dir=out, steps_done=steps_done, total_steps=total_steps, completed=completed,
        interrupted=interrupted, last_metrics=history[-1] if history else None,
        tokens_per_second=tokens_done / train_seconds if train_seconds else 0.0,
        wall_time_s=time.perf_counter() - started, peak_memory_bytes=_peak_memory(dist.device),
        reference_cache=ref.path if ref is not None else None,
        reference_reused=bool(ref is not None and ref.reused),
        checkpoint=last_checkpoint if interrupted else None, tokens_per_microbatch=budget,
        predicted_peak_bytes=memory.plan.predicted_allocated_bytes if memory.plan else None,
        history=history)
    if dist.rank == 0:
        (out / SUMMARY_NAME).write_text(json.dumps(_summary_dict(result), indent=2))
    say.summary(result)
    return result


# ================================================================================================
# output folder, tokenizer, model


def _check_output_folder(out: Path, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); raises when the folder is not usable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    earlier_run = out.is_dir() and any(
        (out / name).exists() for name in ("config.json", "checkpoints", METRICS_NAME, CONFIG_NAME))
    if config.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume "
                            "(checkpoints are written with --save-every N and on interruption)")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved = state.get("settings", {})
        changed = [k for k in TRAJECTORY_SETTINGS if k in saved and saved[k] != getattr(config, k)]
        if changed:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed[:5])
            raise UserError(f"--resume: settings differ from the checkpoint's ({detail}); resume with "
                            f"the same settings, or start a new run in another --output")
        return ckpt
    if earlier_run and not config.overwrite:
        raise UserError(f"--output {out} already holds a run; add --resume to continue it, "
                        "--overwrite to start over, or choose another folder")
    return None


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    name = config.tokenizer or config.model
    flag = "--tokenizer" if config.tokenizer else "--model"
    if _looks_like_local_path(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"{flag} {name}: folder not found; pass a save_pretrained folder or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists() else name)
    except Exception as err:
        raise UserError(f"could not load a tokenizer from {flag} {name} ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    check_chat_template(tokenizer, f"the tokenizer of {flag} {name}")
    return tokenizer


def _train_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def _load_model(config: TrainConfig, dtype, *, need_hash: bool):
    """The model (on the CPU) and, when asked, the fingerprint of its weights."""
    from transformers import AutoModelForCausalLM

    name = config.model
    if _looks_like_local_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise UserError(f"--model {name}: folder not found; pass a save_pretrained folder or a hub id")
        if not (folder / "config.json").is_file():
            raise UserError(f"--model {name}: no config.json in the folder; it must be a "
                            "save_pretrained model folder")
        name = str(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as err:
        raise UserError(f"could not load --model {config.model} ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    model.config.use_cache = False
    model_hash = model_fingerprint(model) if need_hash else None
    return model, model_hash


def _enable_packed_attention(model, backend: str) -> str:
    from .packed_attention import enable_packed_attention

    try:
        return enable_packed_attention(model, backend)
    except ValueError as err:
        raise UserError(f"--attention {backend}: {err}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# ================================================================================================
# memory: micro-batch budget, checkpointing, out-of-memory


@dataclass
class _MemorySettings:
    tokens_per_microbatch: int
    checkpointing: str          # none | layers | offload
    master_weights: str         # fp32 | kahan | none
    optimizer_in_backward: bool = False
    plan: object = None         # altpo.memory_plan.MemoryPlan when the planner was used
    source: str = "settings"

    def forward_context(self, device):
        if self.checkpointing != "offload":
            return None
        from .activation_checkpointing import offload_saved_tensors

        return lambda: offload_saved_tensors(True, device)


_CHECKPOINTING = {"on": "layers", "off": "none", "offload": "offload"}


def _checkpoint_master_mode(checkpoint: Path | None) -> str | None:
    """The master-weights mode a checkpoint's optimizer state was saved in."""
    if checkpoint is None:
        return None
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("master_weights")


def _memory_settings(config: TrainConfig, model, dtype, device, data, sampler,
                     saved_master_mode: str | None, world: int = 1) -> _MemorySettings:
    """Token budget, checkpointing and master weights: the flags, else the planner, else defaults.

    The planner (``altpo.memory_plan``) runs on a CUDA device when any of the three is ``auto``,
    against the memory free before the model is moved there. On a CPU, ``auto`` means a fixed
    budget, no checkpointing and fp32 master weights. A resumed run keeps the master-weights mode
    its optimizer state was saved in.
    """
    need = _largest_unit_tokens(data, config.batch_size)
    fixed_tokens = config.micro_batch_tokens()
    master = config.master_weights
    if master == "auto" and saved_master_mode is not None:
        master = saved_master_mode
    checkpointing = _CHECKPOINTING.get(config.gradient_checkpointing, "auto")
    in_backward = {"on": True, "off": False}.get(config.optimizer_in_backward, "auto")
    if in_backward == "auto" and world > 1:
        in_backward = False  # the update in backward is single-process (see optimizer_in_backward)
    wants_plan = "auto" in (checkpointing, master, in_backward) or fixed_tokens is None
    plan = None
    if wants_plan and device.type == "cuda":
        plan = _plan_memory(config, model, dtype, device, data, sampler, need, fixed_tokens,
                            checkpointing, master, in_backward)
    if plan is not None:
        tokens = fixed_tokens or plan.tokens_per_microbatch
        checkpointing = plan.checkpointing_mode if checkpointing == "auto" else checkpointing
        master = plan.master_weights if master == "auto" else master
        in_backward = plan.optimizer_in_backward if in_backward == "auto" else in_backward
        source = "altpo.memory_plan"
    else:
        tokens = fixed_tokens or (DEFAULT_GPU_TOKENS_PER_MICROBATCH if device.type == "cuda"
                                  else DEFAULT_CPU_TOKENS_PER_MICROBATCH)
        tokens = max(tokens, need) if fixed_tokens is None else tokens
        checkpointing = "none" if checkpointing == "auto" else checkpointing
        master = "fp32" if master == "auto" else master
        in_backward = False if in_backward == "auto" else in_backward
        source = "defaults"
    if need > tokens:
        raise UserError(
            f"--tokens-per-microbatch {tokens} is too small: a forget answer and its alternates must "
            f"share a micro-batch and the largest such group has {need} tokens; raise "
            f"--tokens-per-microbatch to at least {need}, or lower --max-length")
    return _MemorySettings(tokens, checkpointing, master, bool(in_backward), plan, source)


def _plan_memory(config, model, dtype, device, data, sampler, need, fixed_tokens, checkpointing,
                 master, in_backward):
    try:
        from . import memory_plan
    except ImportError:  # the planner is optional: defaults apply without it
        return None
    free = int(torch.cuda.mem_get_info(device)[0])
    # tokens of one step: the largest of the first epoch's steps (the update in backward keeps
    # every micro-batch's activations of a step, so a step above the plan's would not fit)
    tokens_per_step = 0
    for step in range(min(sampler.steps_per_epoch, 256)):
        rows = sampler.rows(step)
        units = forget_units(data, rows.step_pairs)
        if config.alpha > 0:
            units += retain_units(data, rows.step_retain)
        tokens_per_step = max(tokens_per_step, sum(u.num_tokens for u in units))
    try:
        plan = memory_plan.plan_memory(
            model.config, free, tokens_per_microbatch=fixed_tokens or "auto",
            checkpointing=checkpointing, master_weights=master, reference=config.reference,
            optimizer_in_backward=in_backward, tokens_per_step=max(tokens_per_step, need),
            max_seq_len=need, weight_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    except ValueError as err:
        raise UserError(f"memory plan: {err}") from None
    if not plan.fits:
        smallest = (f"; the smallest budget that fits is {_gib(plan.smallest_budget_bytes)} with "
                    + ", ".join(f"{k}={v}" for k, v in (plan.smallest_budget_settings or {}).items())
                    if plan.smallest_budget_bytes else "")
        notes = "".join(f"; {n}" for n in plan.notes)
        raise UserError(
            f"the memory plan does not fit: it needs {_gib(plan.total_bytes)} and {device} has "
            f"{_gib(free)} free{smallest}{notes}. Run `altpo-fast plan --model {config.model}` "
            "for the table, or set --tokens-per-microbatch, --gradient-checkpointing, "
            "--master-weights and --optimizer-in-backward yourself")
    return plan


def _largest_unit_tokens(data: AltPOData, batch_size: int) -> int:
    """Tokens of the largest group that must share a micro-batch (a forget answer and its
    alternates in one step), or of the longest retain row."""
    alts: dict[int, list[int]] = {}
    for p, q in enumerate(data.pair_question):
        alts.setdefault(q, []).append(len(data.alternates[p].input_ids))
    worst = max(len(data.forget[q].input_ids) + sum(sorted(lens, reverse=True)[:batch_size])
                for q, lens in alts.items())
    return max(worst, max((len(r.input_ids) for r in data.retain), default=0))


@contextmanager
def _explain_oom(config: TrainConfig, memory: _MemorySettings):
    try:
        yield
    except torch.OutOfMemoryError:
        hints = [f"lower --tokens-per-microbatch (now {memory.tokens_per_microbatch})"]
        if memory.checkpointing == "none":
            hints.append("add --gradient-checkpointing on")
        if memory.master_weights == "fp32":
            hints.append("use --master-weights kahan (2 bytes/param instead of 4)")
        if not memory.optimizer_in_backward:
            hints.append("add --optimizer-in-backward on (no whole-model gradients)")
        if config.reference == "resident":
            hints.append("use --reference cached (no second model)")
        hints.append("run `altpo-fast plan` to see what fits")
        raise UserError("the device ran out of memory; " + "; ".join(hints)) from None
    except UnitTooLongError as err:
        raise UserError(f"{err}; raise --tokens-per-microbatch to at least {err.tokens}") from None


def _peak_memory(device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:
        return None


# ================================================================================================
# reference log-probs


def _reference_logprobs(model, data, key, path: Path, budget, config, dist, say) -> ReferenceLogprobs:
    # rank 0 decides for everyone: a rank that looked on its own could see the file rank 0 has
    # just written and skip the barrier the others wait in
    ref = load_reference_logprobs(path, key) if dist.rank == 0 else None
    if dist.broadcast_flag(ref is not None):
        if ref is None:
            ref = load_reference_logprobs(path, key)
        if ref is None:
            raise UserError(f"reference cache {path} is not readable from rank {dist.rank}; "
                            "all processes need the same filesystem")
        say(f"reference log-probs: reusing {path}")
        return ref
    if dist.rank == 0:
        n = len(data.forget) + len(data.alternates)
        bar = say.bar(n, "reference log-probs")
        ref = compute_reference_logprobs(model, data, key, tokens_per_microbatch=budget,
                                         loss_backend=config.loss_backend, progress=bar.update)
        bar.close()
        ref.path = path
        save_reference_logprobs(path, ref, {"model": config.model, "forget_split": config.forget_split,
                                            "alternates": config.alternates})
        say(f"reference log-probs: computed {n} sequences, cached in {path}")
    dist.barrier()
    if dist.rank != 0:
        ref = load_reference_logprobs(path, key)
        if ref is None:
            raise UserError(f"reference cache {path} is not readable from rank {dist.rank}; "
                            "all processes need the same filesystem")
    return ref


def _resident_reference(ref_model, config: TrainConfig, budget: int):
    """A ``before_forward`` hook that scores each micro-batch's pairs with the resident reference."""
    from altpo_kernels import linear_logprobs

    from .train_step import last_hidden_states, output_weight

    @torch.no_grad()
    def fill(mb):
        if mb.num_pairs == 0:
            return mb
        hidden = last_hidden_states(ref_model, mb)
        token_logp = linear_logprobs(hidden, output_weight(ref_model), mb.labels,
                                     backend=config.loss_backend)
        per_seq = torch.zeros(len(mb.seq_lens), dtype=torch.float32, device=hidden.device)
        per_seq.index_add_(0, mb.seq_ids, token_logp.float())
        mb.ref_win_logps = per_seq[mb.win_seqs]
        mb.ref_lose_logps = per_seq[mb.lose_seqs]
        return mb

    return fill


# ================================================================================================
# distributed plumbing


@dataclass
class _Distributed:
    rank: int
    world: int
    device: torch.device
    created_group: bool = False

    @classmethod
    def setup(cls, device_setting: str) -> "_Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_setting == "auto":
            device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(device_setting)
            except RuntimeError:
                raise UserError(f"--device {device_setting}: not a device name (cpu, cuda, cuda:N)") from None
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise UserError(f"--device {device_setting}: no CUDA device is available; use --device cpu")
                if device.index is None:
                    device = torch.device(f"cuda:{local}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        created = False
        if world > 1:
            import torch.distributed as tdist

            if not tdist.is_initialized():
                tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         rank=rank, world_size=world)
                created = True
        return cls(rank, world, device, created)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if self.world == 1:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([float(flag) if self.rank == 0 else 0.0], device=self.device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def sum_stats(self, stats: StepStats, stop: bool) -> tuple[StepStats, bool]:
        """The step's totals over all ranks, and whether any rank was asked to stop."""
        if self.world == 1:
            return stats, stop
        import torch.distributed as tdist

        t = torch.cat([stats.as_tensor(self.device),
                       torch.tensor([float(stop)], dtype=torch.float64, device=self.device)])
        tdist.all_reduce(t)
        return StepStats.from_tensor(t[:-1].cpu()), bool(t[-1].item() > 0)

    def cleanup(self) -> None:
        if self.created_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


# ================================================================================================
# stopping, metrics, printing


class _StopFlag:
    requested = False
    signal_name: str | None = None


@contextmanager
def _stop_signals():
    """SIGTERM / SIGINT ask the loop to finish the step, save a checkpoint and return.

    A second Ctrl-C aborts at once. Only the main thread can install handlers; elsewhere the
    defaults stay.
    """
    flag = _StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal_name = signal.Signals(signum).name
        print(f"\n{flag.signal_name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        previous.clear()
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _non_finite_message(step: int, stats: StepStats, grad_norm: float, checkpoint) -> str:
    where = (f"the last good checkpoint is {checkpoint} (continue with --resume after changing "
             "what caused it)" if checkpoint else "no checkpoint was written yet (--save-every N "
             "writes them)")
    return (f"the loss became non-finite at step {step} (loss {stats.loss}, forget part "
            f"{stats.forget_loss}, retain part {stats.retain_loss}, gradient norm {grad_norm}); "
            f"the update was not applied and the final model was not written; {where}. Lower "
            "--lr, check the data, or train in fp32 weights (--dtype fp32)")


def _metrics_record(step: int, steps_per_epoch: int, lr: float, stats: StepStats, step_time: float,
                    device) -> dict:
    pairs = max(stats.num_pairs, 1)
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        "lr": lr,
        "loss": stats.loss,
        "forget_loss": stats.forget_loss,
        "retain_loss": stats.retain_loss,
        "grad_norm": stats.grad_norm,
        "delta_mean": stats.delta_sum / pairs,
        "alternate_logp_mean": stats.alternate_logp_sum / pairs,
        "forget_logp_mean": stats.forget_logp_sum / pairs,
        "tokens": stats.num_tokens,
        "sequences": stats.num_sequences,
        "micro_batches": stats.num_micro_batches,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(stats.num_tokens / step_time, 1) if step_time > 0 else None,
        "memory_bytes": _peak_memory(device),
    }


def _trim_metrics(path: Path, keep_up_to: int) -> None:
    """On resume, drop records of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    if keep_up_to == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_up_to]
    path.write_text("".join(line + "\n" for line in kept))


def _summary_dict(result: TrainResult) -> dict:
    return {
        "output_dir": str(result.output_dir), "steps_done": result.steps_done,
        "total_steps": result.total_steps, "completed": result.completed,
        "interrupted": result.interrupted, "tokens_per_second": result.tokens_per_second,
        "wall_time_s": result.wall_time_s, "peak_memory_bytes": result.peak_memory_bytes,
        "reference_cache": str(result.reference_cache) if result.reference_cache else None,
        "reference_reused": result.reference_reused,
        "tokens_per_microbatch": result.tokens_per_microbatch,
        "predicted_peak_bytes": result.predicted_peak_bytes,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "last_metrics": result.last_metrics,
    }


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


class _NullBar:
    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _StepBar:
    def __init__(self, total, initial):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record):
        self.bar.set_postfix_str(
            f"loss {record['loss']:.4f} (forget {record['forget_loss']:.4f}, retain "
            f"{record['retain_loss']:.4f}) {record['tokens_per_s'] or 0:.0f} tok/s "
            f"mem {_gib(record['memory_bytes'])}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


class _Printer:
    """Notes and bars on rank 0 unless quiet; the summary on stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        if self.quiet:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)

    def progress(self, total: int, initial: int):
        return _NullBar() if self.quiet else _StepBar(total, initial)

    def summary(self, result: TrainResult) -> None:
        if self.quiet:
            return
        m = result.last_metrics or {}
        state = ("finished" if result.completed else
                 f"interrupted ({result.interrupted})" if result.interrupted else "stopped")
        lines = [
            f"AltPO training {state}: {result.steps_done}/{result.total_steps} steps in "
            f"{result.wall_time_s:.1f} s, {result.tokens_per_second:.0f} tokens/s, peak memory "
            f"{_gib(result.peak_memory_bytes)}",
        ]
        if result.predicted_peak_bytes is not None:
            lines.append(f"  memory: predicted peak {_gib(result.predicted_peak_bytes)} (memory "
                         f"plan), measured {_gib(result.peak_memory_bytes)} "
                         "(torch.cuda.max_memory_allocated)")
        if m:
            lines.append(f"  last step: loss {m['loss']:.4f} = forget {m['forget_loss']:.4f} x "
                         f"gamma + retain {m['retain_loss']:.4f} x alpha; mean delta "
                         f"{m['delta_mean']:.4f}")
        if result.reference_cache:
            lines.append(f"  reference log-probs: {result.reference_cache} "
                         f"({'reused' if result.reference_reused else 'computed'})")
        if result.completed:
            lines.append(f"  model: {result.output_dir} (AutoModelForCausalLM.from_pretrained)")
        if result.checkpoint:
            lines.append(f"  checkpoint: {result.checkpoint} (continue with --resume)")
        print("\n".join(lines), flush=True)
