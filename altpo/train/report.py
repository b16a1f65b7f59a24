"""What a run tells: its result, each step's metrics record, the progress bar, the summary."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from altpo.errors import UserError
from altpo.progress import LOG_INTERVAL_S, progress_bar
from altpo.train.step import StepStats


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


@contextmanager
def transformers_bars(enabled: bool):
    """transformers' own loading/saving bars on or off (training turns them off: only our bars)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def non_finite_message(step: int, stats: StepStats, grad_norm: float, checkpoint) -> str:
    where = (f"the last good checkpoint is {checkpoint} (continue with --resume after changing "
             "what caused it)" if checkpoint else "no checkpoint was written yet (--save-every N "
             "writes them)")
    if math.isfinite(stats.loss):
        what = (f"the gradient norm became non-finite at step {step} (gradient norm {grad_norm}; "
                f"the loss {stats.loss} was finite: forget part {stats.forget_loss}, retain part "
                f"{stats.retain_loss})")
    else:
        what = (f"the loss became non-finite at step {step} (loss {stats.loss}, forget part "
                f"{stats.forget_loss}, retain part {stats.retain_loss})")
    return (f"{what}; the update was not applied and the final model was not written; {where}. "
            "Lower --lr, check the data, or train in fp32 weights (--dtype fp32)")


def metrics_record(step: int, steps_per_epoch: int, lr: float, stats: StepStats, step_time: float,
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
        "alternate_logp_mean": stats.chosen_logp_sum / pairs,
        "forget_logp_mean": stats.forget_logp_sum / pairs,
        "tokens": stats.num_tokens,
        "sequences": stats.num_sequences,
        "micro_batches": stats.num_micro_batches,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(stats.num_tokens / step_time, 1) if step_time > 0 else None,
        "memory_bytes": peak_memory(device),
    }


def summary_dict(result: TrainResult) -> dict:
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


def peak_memory(device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:
        return None


def gib(n) -> str:
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
            f"mem {gib(record['memory_bytes'])}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


class _PlainSteps:
    """Step progress for a log file: plain lines, no carriage returns: the first and the last
    step, and in between at most one line every ``LOG_INTERVAL_S`` seconds, with the rate and the
    time left."""

    def __init__(self, total, initial, clock=time.monotonic):
        self.total, self.done, self.first = total, initial, initial
        self.clock = clock
        self.started = self.last = clock()

    def update(self, record):
        self.done += 1
        now = self.clock()
        ends = self.done in (self.first + 1, self.total)
        if not ends and now - self.last < LOG_INTERVAL_S:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.started, 1e-9)
        left = (f", about {(self.total - self.done) / rate:.0f}s left"
                if self.done < self.total and rate > 0 else "")
        print(f"step {self.done}/{self.total}: loss {record['loss']:.4f} (forget "
              f"{record['forget_loss']:.4f}, retain {record['retain_loss']:.4f}) "
              f"{record['tokens_per_s'] or 0:.0f} tok/s mem {gib(record['memory_bytes'])} "
              f"({rate:.2f} steps/s{left})", file=sys.stderr, flush=True)

    def close(self):
        pass


def interactive() -> bool:
    """Whether progress goes to a terminal (bars) rather than a file or pipe (plain lines)."""
    return sys.stderr.isatty()


class Printer:
    """Notes and bars on rank 0 unless quiet (plain lines when stderr is not a terminal); the
    summary on stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        if self.quiet:
            return _NullBar()
        return progress_bar(total=total, desc=desc, unit="seq", leave=True)

    def progress(self, total: int, initial: int):
        if self.quiet:
            return _NullBar()
        return _StepBar(total, initial) if interactive() else _PlainSteps(total, initial)

    def summary(self, result: TrainResult) -> None:
        if self.quiet:
            return
        m = result.last_metrics or {}
        state = ("finished" if result.completed else
                 f"interrupted ({result.interrupted})" if result.interrupted else "stopped")
        lines = [
            f"AltPO training {state}: {result.steps_done}/{result.total_steps} steps in "
            f"{result.wall_time_s:.1f} s, {result.tokens_per_second:.0f} tokens/s, peak memory "
            f"{gib(result.peak_memory_bytes)}",
        ]
        if result.predicted_peak_bytes is not None:
            lines.append(f"  memory: predicted peak {gib(result.predicted_peak_bytes)} (memory "
                         f"plan), measured {gib(result.peak_memory_bytes)} "
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


class StepLog:
    """What each step leaves: its metrics record in ``metrics.jsonl`` (rank 0), the progress bar,
    the caller's ``on_step``, and this process's history and throughput."""

    def __init__(self, path: Path, rank: int, bar, on_step=None, device=None):
        self.path, self.rank, self.bar, self.on_step, self.device = path, rank, bar, on_step, device
        self.history: list[dict] = []
        self.tokens, self.seconds = 0, 0.0

    def add(self, step: int, steps_per_epoch: int, lr: float, stats: StepStats, step_time: float) -> dict:
        """Record step ``step`` (1-based); returns its metrics record."""
        self.tokens += stats.num_tokens
        self.seconds += step_time
        record = metrics_record(step, steps_per_epoch, lr, stats, step_time, self.device)
        self.history.append(record)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.update(record)
        if self.on_step is not None:
            self.on_step(record)
        return record

    def steps_done(self, start_step: int) -> int:
        return self.history[-1]["step"] if self.history else start_step

    def result(self, **fields) -> TrainResult:
        """The run's :class:`TrainResult`: ``fields`` plus this log's history and throughput."""
        return TrainResult(last_metrics=self.history[-1] if self.history else None,
                           tokens_per_second=self.tokens / self.seconds if self.seconds else 0.0,
                           peak_memory_bytes=peak_memory(self.device), history=self.history,
                           **fields)
