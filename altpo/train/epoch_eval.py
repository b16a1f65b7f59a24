"""Evaluation during training: ``--eval-every-epoch GROUPS`` and ``--keep-best METRIC``.

After every epoch each process evaluates its share of the chosen TOFU metric groups (the work is
sharded as ``altpo-fast eval`` shards it under torchrun, and the result equals a one-process
evaluation); rank 0 writes ``OUTPUT/evals/epoch-N/TOFU_EVAL.json``, ``TOFU_SUMMARY.json`` and
``EVAL_PROVENANCE.json`` in the format of ``altpo-fast eval`` (the record also names the run, the
epoch and the step), and, with ``--keep-best``, saves the model to ``OUTPUT/best/``
whenever the epoch beats the best so far (``best/best.json`` says which epoch and value).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from altpo.errors import UserError

# Epoch evaluations use altpo-fast eval's defaults for these (recorded in each EVAL_PROVENANCE.json).
EPOCH_NUMERICS = "altpo-fast"
EPOCH_MAX_NEW_TOKENS = 200
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}  # eval's --dtype
EPOCH_GROUPS = ("forget", "retain", "ra", "wf", "mia", "gradnorm", "memorization")
DIRECTIONS = ("max", "min", "zero")
DEFAULT_DIRECTION = {
    "forget_quality": "max", "model_utility": "max", "forget_Q_A_Prob": "min", "forget_Q_A_ROUGE": "min",
    "extraction_strength": "min", "exact_memorization": "min", "privleak": "zero",
    "retain_Q_A_Prob": "max", "retain_Q_A_ROUGE": "max",
}


def metric_groups(metric: str) -> set[str]:
    """The metric groups that produce ``metric`` (all of them are needed)."""
    if metric == "model_utility":
        return {"retain", "ra", "wf"}
    if metric == "privleak":
        return {"mia"}
    if metric in ("extraction_strength", "exact_memorization"):
        return {"memorization"}
    if metric == "mia_gradnorm":
        return {"gradnorm"}
    if metric.startswith("mia_"):
        return {"mia"}
    for group in ("forget", "retain", "ra", "wf"):
        if metric.startswith(group + "_"):
            return {group}
    raise UserError(f"--keep-best {metric}: not a TOFU metric this trainer evaluates (e.g. forget_quality, "
                    "model_utility, forget_Q_A_Prob, privleak, extraction_strength)")


def parse_groups(text: str) -> list[str]:
    groups = [g.strip() for g in str(text).split(",") if g.strip()]
    bad = [g for g in groups if g not in EPOCH_GROUPS]
    if bad or not groups:
        raise UserError(f"--eval-every-epoch: unknown metric group(s) {', '.join(bad) or '(none given)'}; "
                        f"choose from {', '.join(EPOCH_GROUPS)}")
    return groups


def parse_keep_best(text: str) -> tuple[str, str]:
    """``(metric, direction)`` of ``METRIC`` or ``METRIC:max|min|zero``."""
    metric, _, direction = str(text).partition(":")
    metric, direction = metric.strip(), direction.strip() or DEFAULT_DIRECTION.get(metric.strip(), "")
    if direction not in DIRECTIONS:
        raise UserError(f"--keep-best {text}: say which way is better, {metric}:max, {metric}:min or "
                        f"{metric}:zero (closest to 0)")
    return metric, direction


def check_epoch_eval(config) -> None:
    """Every user-fixable problem of the evaluation-during-training settings."""
    if config.eval_every_epoch is None:
        raise UserError("--keep-best needs --eval-every-epoch (the metric comes from the epoch evaluations)")
    groups = parse_groups(config.eval_every_epoch)
    if config.eval_max_rows is not None and int(config.eval_max_rows) < 1:
        raise UserError(f"--eval-max-rows must be at least 1, got {config.eval_max_rows}")
    if config.eval_retain_logs is not None and not Path(os.path.expanduser(config.eval_retain_logs)).exists():
        raise UserError(f"--eval-retain-logs {config.eval_retain_logs} does not exist; pass the retain model's "
                        "TOFU_EVAL.json or its folder")
    if config.keep_best is not None:
        metric, _ = parse_keep_best(config.keep_best)
        missing = metric_groups(metric) - set(groups)
        if missing:
            raise UserError(f"--keep-best {metric} needs the metric group(s) {', '.join(sorted(missing))} in "
                            f"--eval-every-epoch")
        if metric in ("forget_quality", "privleak") and config.eval_retain_logs is None:
            raise UserError(f"--keep-best {metric} needs --eval-retain-logs (the retain model's TOFU_EVAL.json)")


def is_better(value: float | None, best: float | None, direction: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    if direction == "max":
        return value > best
    if direction == "min":
        return value < best
    return abs(value) < abs(best)


class EpochEvaluator:
    """Runs the epoch evaluations of one training run (every rank calls it at the same steps)."""

    def __init__(self, config, tokenizer, output: Path, rank: int, world: int):
        self.config, self.tokenizer, self.output = config, tokenizer, Path(output)
        self.groups = parse_groups(config.eval_every_epoch)
        self.keep = parse_keep_best(config.keep_best) if config.keep_best else None
        self.rank, self.world = rank, world
        self.best: float | None = None
        best_file = self.output / "best" / "best.json"
        if self.keep and config.resume and best_file.is_file():  # a resumed run must beat the best so far
            self.best = json.loads(best_file.read_text()).get("value")

    def provenance(self, model, epoch: int, step: int, steps_per_epoch: int) -> dict:
        """The record ``altpo-fast eval`` writes (``EVAL_PROVENANCE.json``), for the weights after
        ``step`` optimizer steps: the run, epoch and step name them; the settings are the ones
        this evaluation used."""
        from altpo.eval.output import provenance
        from altpo.eval.tofu import required_splits

        c = self.config
        return provenance(
            model_path=None, model=model, tokenizer_path=c.tokenizer or c.model, data=c.data,
            splits=required_splits(c.forget_split, self.groups),
            settings={"forget_split": c.forget_split, "holdout_split": None, "metrics": self.groups,
                      "numerics": EPOCH_NUMERICS, "max_rows": c.eval_max_rows,
                      "max_new_tokens": EPOCH_MAX_NEW_TOKENS,
                      "dtype": _DTYPE_NAMES.get(str(next(model.parameters()).dtype)),
                      "retain_logs": c.eval_retain_logs, "reference_model": None,
                      "system_prompt": c.system_prompt, "date_string": c.date_string,
                      "loss_backend": c.loss_backend},
            training={"run": str(self.output.resolve()), "starting_model": c.model, "epoch": epoch,
                      "step": step, "steps_per_epoch": steps_per_epoch, "world_size": self.world})

    def after_step(self, model, done: int, steps_per_epoch: int, say=print) -> dict | None:
        """At the end of an epoch (``done`` steps), evaluate and maybe keep the model."""
        if steps_per_epoch < 1 or done % steps_per_epoch:
            return None
        from altpo.eval.sharding import Shards
        from altpo.eval.tofu import evaluate_tofu
        from altpo.train.checkpoint import save_final_model

        epoch = done // steps_per_epoch
        folder = self.output / "evals" / f"epoch-{epoch}"
        c = self.config
        record = self.provenance(model, epoch, done, steps_per_epoch) if self.rank == 0 else None
        summary = evaluate_tofu(
            model, self.tokenizer, c.data, c.forget_split, retain_logs=c.eval_retain_logs,
            output_dir=folder, system_prompt=c.system_prompt or None, date_string=c.date_string,
            splits=self.groups, max_rows=c.eval_max_rows, max_new_tokens=EPOCH_MAX_NEW_TOKENS,
            progress=False, verbose=False, backend=c.loss_backend, numerics=EPOCH_NUMERICS,
            shards=Shards(self.rank, self.world), provenance=record)
        model.train()
        if self.keep is None:
            if self.rank == 0:
                say(f"epoch {epoch}: evaluation written to {folder}")
            return summary
        metric, direction = self.keep
        value = summary.get(metric)
        if is_better(value, self.best, direction):
            self.best = value
            if self.rank == 0:
                best = self.output / "best"
                save_final_model(best, model, self.tokenizer)
                (best / "best.json").write_text(json.dumps(
                    {"epoch": epoch, "step": done, "metric": metric, "direction": direction, "value": value},
                    indent=2))
                say(f"epoch {epoch}: {metric} {value:.6g}, the best so far: model saved to {best}")
        elif self.rank == 0:
            say(f"epoch {epoch}: {metric} {value}, best stays {self.best}")
        return summary
