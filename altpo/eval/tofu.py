"""TOFU evaluation of a causal LM, written in open-unlearning's ``TOFU_EVAL.json`` format.

    from altpo.eval.tofu import evaluate_tofu
    summary = evaluate_tofu(model, tokenizer, "locuslab/TOFU", "forget10",
                            retain_logs="fixtures/tofu/eval_logs/tofu_Llama-3.2-1B-Instruct_retain90",
                            output_dir="eval_out")

The model turns into per-row statistics here (answer log-probs through the fused
``altpo_kernels.linear_logprobs``, greedy generations, teacher-forced argmax predictions); the
metric definitions themselves live in ``altpo.eval.metrics``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from altpo.eval import metrics as M
from altpo.eval.mia import MIA_GROUPS, mia_entries
from altpo.eval.scoring import (  # noqa: F401  (re-exported: the public names of evaluation)
    EVAL_NUMERICS,
    Scorer,
    answer_probabilities,
    check_chat_tokenizer,
    check_numerics,
    encode_prompt,
    generate_greedy,
)
from altpo.eval.sharding import Shards
import altpo.progress as bars
from altpo.sources import looks_like_hub_id
from altpo.data.tofu import (
    DEFAULT_DATE_STRING,
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    ChatFormat,
    encode_qa,
    load_tofu_split,
    split_file,
)

# Metric groups, the TOFU files each one reads ({forget} = the forget split name), and the
# metrics each one writes.
METRIC_GROUPS = ("forget", "retain", "ra", "wf", "mia", "gradnorm", "memorization", "reference")
# what runs when no groups are named: everything that needs no second model
DEFAULT_METRIC_GROUPS = METRIC_GROUPS[:-1]
_GROUP_FILES = {
    "forget": ("{forget}_perturbed",),
    "retain": ("retain_perturbed",),
    "ra": ("real_authors_perturbed",),
    "wf": ("world_facts_perturbed",),
    "mia": ("{forget}", "{holdout}"),
    "gradnorm": ("{forget}", "{holdout}"),
    "memorization": ("{forget}_perturbed",),
    "reference": ("{forget}", "{holdout}"),
}

HEADLINE_METRICS = (
    "forget_quality",
    "model_utility",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "privleak",
    "extraction_strength",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
)


# ---------------------------------------------------------------------------------------------
# Data and chat encoding (shared with the trainer through altpo.data.tofu, so evaluation scores
# exactly the tokens training sees: labels on the answer and its end-of-turn token only)


def required_splits(forget_split: str, splits: Sequence[str] = (), holdout_split: str | None = None) -> list[str]:
    """The TOFU split files the metric groups ``splits`` (default: all) read."""
    groups = [g for g in METRIC_GROUPS if g in (splits or DEFAULT_METRIC_GROUPS)]
    holdout = holdout_split or (
        _holdout_name(forget_split) if set(MIA_GROUPS) & set(groups) else None)
    return sorted({f.format(forget=forget_split, holdout=holdout) for g in groups for f in _GROUP_FILES[g]})


def check_tofu_source(data, names: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` naming every split missing from a local TOFU folder.

    Hub ids are not checked here (that needs the network); loading reports them instead.
    """
    if looks_like_hub_id(str(data)):
        return
    folder = Path(os.path.expanduser(str(data)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"TOFU data folder {folder} does not exist; pass a folder of TOFU JSON Lines files "
            "(e.g. fixtures/tofu) or a hub id such as locuslab/TOFU"
        )
    missing = [n for n in names if split_file(folder, n) is None]
    if missing:
        forget = sorted(p.stem for p in folder.glob("forget*.json") if not p.stem.endswith("_perturbed"))
        hint = (f"; the forget splits it has: {', '.join(forget)} (--forget-split)"
                if any(n.startswith(("forget", "holdout")) for n in missing) and forget else "")
        raise FileNotFoundError(
            f"TOFU data folder {folder} lacks {', '.join(n + '.json' for n in missing)}{hint}; "
            "use a folder with the full TOFU layout (see docs/evaluation.md) or fewer metric groups"
        )


def load_tofu_rows(data, name: str, max_rows: int | None = None) -> list[dict]:
    """Rows of one TOFU split (local JSON Lines folder or hub id), the first ``max_rows`` only
    when given."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    rows = load_tofu_split(str(data), name)
    return rows if max_rows is None else rows[:max_rows]


class TofuDataError(ValueError):
    """A TOFU split or retain-model log that lacks what a metric needs."""


def _require_fields(rows: Sequence[Mapping], fields: Sequence[str], split: str) -> None:
    for i, row in enumerate(rows):
        for f in fields:
            if f not in row:
                raise TofuDataError(f"row {i} of TOFU split {split} has no field {f!r}; fields: {sorted(row)}")


# ---------------------------------------------------------------------------------------------
# Retain-model logs


def load_retain_logs(retain_logs) -> dict:
    """The retain model's ``TOFU_EVAL.json`` (a folder holding it, the file, or the dict itself)."""
    if isinstance(retain_logs, Mapping):
        logs = dict(retain_logs)
        if _retain_truth_ratios(logs) is None and _retain_min_k_auc(logs) is None:
            raise TofuDataError(
                "the retain-model logs have neither forget_truth_ratio.value_by_index nor "
                "mia_min_k.agg_value; pass open-unlearning's TOFU_EVAL.json of the retain model"
            )
        return logs
    p = Path(os.path.expanduser(str(retain_logs)))
    if p.is_dir():
        p = p / "TOFU_EVAL.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"retain-model logs not found at {p}; pass the folder holding the retain model's "
            "TOFU_EVAL.json (e.g. fixtures/tofu/eval_logs/tofu_Llama-3.2-1B-Instruct_retain90)"
        )
    try:
        logs = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TofuDataError(f"{p} is not valid JSON ({err.msg}); it should be an open-unlearning TOFU_EVAL.json") from err
    if not isinstance(logs, dict):
        raise TofuDataError(f"{p} should hold a JSON object of metrics (open-unlearning's TOFU_EVAL.json)")
    if _retain_truth_ratios(logs) is None and _retain_min_k_auc(logs) is None:
        raise TofuDataError(
            f"{p} has neither forget_truth_ratio.value_by_index nor mia_min_k.agg_value; pass "
            "open-unlearning's TOFU_EVAL.json of the retain model"
        )
    return logs


def _retain_truth_ratios(logs: Mapping) -> list[float] | None:
    try:
        return [float(v["score"]) for v in logs["forget_truth_ratio"]["value_by_index"].values()]
    except (KeyError, TypeError):
        return None


def _retain_min_k_auc(logs: Mapping) -> float | None:
    try:
        return float(logs["mia_min_k"]["agg_value"])
    except (KeyError, TypeError):
        return None


def check_retain_logs_match(logs: Mapping, forget_split: str, forget_rows: int) -> None:
    """Raise :class:`TofuDataError` when ``logs`` hold truth ratios for another number of forget
    questions than ``forget_split``'s ``forget_rows``."""
    ratios = _retain_truth_ratios(logs)
    if ratios is None or len(ratios) == forget_rows:
        return
    guess = {40: "forget01", 200: "forget05", 400: "forget10"}.get(len(ratios))
    made_on = f" (the size of {guess})" if guess else ""
    raise TofuDataError(
        f"the retain-model logs hold truth ratios for {len(ratios)} forget questions{made_on}, but "
        f"--forget-split {forget_split} has {forget_rows}: they were made on another forget split, "
        "and forget_quality against them would mean nothing. Pass the logs of the retain model of "
        f"this split (e.g. the retain{100 - int(''.join(c for c in forget_split if c.isdigit()) or 0):02d} "
        "model's TOFU_EVAL.json), or leave out --retain-logs")


# ---------------------------------------------------------------------------------------------
# The runner


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def _holdout_name(forget_split: str) -> str:
    if "forget" not in forget_split:
        raise ValueError(f"cannot derive a holdout split from {forget_split!r}; pass holdout_split=")
    return forget_split.replace("forget", "holdout")


def _check_metric_arguments(splits, numerics, reference_model, batch_size, max_new_tokens, min_k) -> None:
    unknown = [s for s in splits if s not in METRIC_GROUPS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {METRIC_GROUPS}; got {list(splits)}")
    check_numerics(numerics)
    if "reference" in splits and reference_model is None:
        raise ValueError("the reference metric group (mia_reference) needs reference_model=, a model "
                         "to compare losses with (open-unlearning uses the retain model)")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not 0 < min_k <= 1:
        raise ValueError(f"min_k must be in (0, 1], got {min_k}")


class _MetricRun:
    """One model's statistics for the metrics: average answer losses and greedy ROUGE."""

    def __init__(self, model, tokenizer, scorer: Scorer, fmt: ChatFormat, *, batch_size: int,
                 max_new_tokens: int, progress: bool, numerics: str, shards: Shards):
        self.model, self.tokenizer, self.scorer, self.fmt = model, tokenizer, scorer, fmt
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.progress, self.numerics, self.shards = progress, numerics, shards

    def avg_losses(self, rows, key, desc, vocab=False):
        """Per row: avg NLL of row[key] (a string or a list of strings)."""
        flat = []
        for r in rows:
            answers = r[key] if isinstance(r[key], list) else [r[key]]
            flat += [(r["question"], a) for a in answers]
        stats = iter(self.scorer.score(flat, desc, vocab))
        out = []
        for r in rows:
            if isinstance(r[key], list):
                out.append([next(stats).avg_loss for _ in r[key]])
            else:
                out.append(next(stats).avg_loss)
        return out

    def rouge(self, rows, desc):
        tokenizer, fmt = self.tokenizer, self.fmt
        prompts = [encode_prompt(tokenizer, r["question"], fmt) for r in rows]
        gens = generate_greedy(self.model, tokenizer, prompts, batch_size=self.batch_size,
                               max_new_tokens=self.max_new_tokens, progress=self.progress, desc=desc,
                               numerics=self.numerics, shards=self.shards)
        inputs = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        truths = []
        for r in rows:
            labels = encode_qa(tokenizer, r["question"], r["answer"], fmt=fmt).labels
            answer_ids = [t for t in labels if t != IGNORE_INDEX]
            truths.append(tokenizer.decode(answer_ids, skip_special_tokens=True).strip())
        return M.rouge_metric(gens, truths, inputs)


def _forget_metrics(run: _MetricRun, rows, name: str, forget_split: str, retain, max_rows, verbose) -> dict:
    """The forget group: Q_A_Prob, PARA/PERT, truth ratio, ROUGE and forget_quality."""
    _require_fields(rows, ("question", "answer", "paraphrased_answer", "perturbed_answer"), name)
    logs = {"forget_Q_A_Prob": M.probability_metric(run.avg_losses(rows, "answer", "forget_Q_A_Prob"))}
    para = run.avg_losses(rows, "paraphrased_answer", "forget_Q_A_PARA_Prob")
    pert = run.avg_losses(rows, "perturbed_answer", "forget_Q_A_PERT_Prob")
    logs["forget_Q_A_PARA_Prob"] = M.probability_metric(para)
    logs["forget_Q_A_PERT_Prob"] = M.probability_metric(pert)
    logs["forget_truth_ratio"] = M.truth_ratio_metric(para, pert, "closer_to_1_better")
    logs["forget_Q_A_ROUGE"] = run.rouge(rows, "forget_Q_A_ROUGE")
    ref = _retain_truth_ratios(retain) if retain is not None else None
    if ref is not None and max_rows is None:
        check_retain_logs_match(retain, forget_split, len(rows))
    if ref is None:
        _say("forget_quality skipped: it needs the retain model's logs (--retain-logs) with "
             "forget_truth_ratio", verbose)
        logs["forget_quality"] = {"agg_value": None}
    else:
        ours = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
        logs["forget_quality"] = {"agg_value": M.forget_quality(ours, ref)}
    return logs


# metric group -> (key prefix, TOFU split, the field holding the correct answer)
_UTILITY_GROUPS = {
    "retain": ("retain", "retain_perturbed", "paraphrased_answer"),
    "ra": ("ra", "real_authors_perturbed", "answer"),
    "wf": ("wf", "world_facts_perturbed", "answer"),
}


def _utility_metrics(run: _MetricRun, group: str, rows) -> dict:
    """One of the retain, real-authors and world-facts groups."""
    prefix, split, correct_key = _UTILITY_GROUPS[group]
    _require_fields(rows, ("question", "answer", correct_key, "perturbed_answer"), split)
    logs = {}
    qa = run.avg_losses(rows, "answer", f"{prefix}_Q_A_Prob")
    logs[f"{prefix}_Q_A_Prob"] = M.probability_metric(qa)
    pert = run.avg_losses(rows, "perturbed_answer", f"{prefix}_Q_A_PERT_Prob")
    logs[f"{prefix}_Q_A_PERT_Prob"] = M.probability_metric(pert)
    if group == "retain":
        correct = run.avg_losses(rows, correct_key, "retain_Q_A_PARA_Prob")
        logs["retain_Q_A_PARA_Prob"] = M.probability_metric(correct)
    else:
        correct = qa
        logs[f"{prefix}_Q_A_Prob_normalised"] = M.normalised_probability_metric(
            [math.exp(-x) for x in qa], [[math.exp(-x) for x in w] for w in pert]
        )
    logs[f"{prefix}_Truth_Ratio"] = M.truth_ratio_metric(correct, pert, "true_better")
    logs[f"{prefix}_Q_A_ROUGE"] = run.rouge(rows, f"{prefix}_Q_A_ROUGE")
    return logs


def _memorization_metrics(scorer: Scorer, rows, name: str) -> dict:
    _require_fields(rows, ("question", "answer"), name)
    stats = scorer.score([(r["question"], r["answer"]) for r in rows], "extraction_strength", vocab=True)
    # like open-unlearning, the end-of-turn token is left out of the token-level scores
    return {
        "extraction_strength": M.score_metric(
            [M.extraction_strength_score(s.argmax[:-1], s.labels[:-1]) for s in stats]),
        "exact_memorization": M.score_metric(
            [M.exact_memorization_score(s.argmax[:-1], s.labels[:-1]) for s in stats]),
    }


def _mia_sides(data, forget_split: str, holdout: str) -> dict:
    sides = {}
    for side, name in (("forget", forget_split), ("holdout", holdout)):
        _require_fields(data[name], ("question", "answer"), name)
        sides[side] = [(r["question"], r["answer"]) for r in data[name]]
    return sides


def _privleak(logs: Mapping, retain, verbose: bool) -> dict:
    ref_auc = _retain_min_k_auc(retain) if retain is not None else None
    if ref_auc is None:
        _say("privleak skipped: it needs the retain model's logs (--retain-logs) with mia_min_k", verbose)
        return {"agg_value": None}
    return {"agg_value": M.privleak(logs["mia_min_k"]["agg_value"], ref_auc)}


def compute_tofu_metrics(model, tokenizer, data_dir, forget_split: str = "forget10", *,
                         retain_logs=None, batch_size: int = 16, max_new_tokens: int = 200,
                         system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                         date_string: str | None = DEFAULT_DATE_STRING,
                         splits: Sequence[str] = DEFAULT_METRIC_GROUPS, holdout_split: str | None = None,
                         max_rows: int | None = None, min_k: float = 0.4, progress: bool = True,
                         verbose: bool = True, backend: str = "auto", numerics: str = "altpo-fast",
                         reference_model=None, shards: Shards | None = None) -> dict:
    """All requested TOFU metrics as the ``TOFU_EVAL.json`` dictionary (see ``evaluate_tofu``)."""
    _check_metric_arguments(splits, numerics, reference_model, batch_size, max_new_tokens, min_k)
    shards = shards if shards is not None else Shards.from_process_group()
    check_chat_tokenizer(tokenizer)
    groups = [g for g in METRIC_GROUPS if g in splits]
    holdout = holdout_split or (
        _holdout_name(forget_split) if set(MIA_GROUPS) & set(groups) else None)
    names = required_splits(forget_split, groups, holdout)
    check_tofu_source(data_dir, names)
    retain = load_retain_logs(retain_logs) if retain_logs is not None else None
    data = {n: load_tofu_rows(data_dir, n, max_rows) for n in names}

    was_training = model.training
    model.eval()
    fmt = ChatFormat(system_prompt or None, date_string)
    scorer = Scorer(model, tokenizer, batch_size=batch_size, fmt=fmt, progress=progress, backend=backend,
                    numerics=numerics, shards=shards)
    run = _MetricRun(model, tokenizer, scorer, fmt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=progress, numerics=numerics, shards=shards)
    reference_scorer = None
    if reference_model is not None and "reference" in groups:
        reference_was_training = reference_model.training
        reference_model.eval()
        reference_scorer = Scorer(reference_model, tokenizer, batch_size=batch_size, fmt=fmt,
                                  progress=progress, backend=backend, numerics=numerics, shards=shards)
    logs: dict[str, Any] = {}
    try:
        if "forget" in groups:
            name = f"{forget_split}_perturbed"
            logs.update(_forget_metrics(run, data[name], name, forget_split, retain, max_rows, verbose))
        for group in _UTILITY_GROUPS:
            if group in groups:
                logs.update(_utility_metrics(run, group, data[_UTILITY_GROUPS[group][1]]))
        if all(g in groups for g in ("retain", "ra", "wf")):
            logs["model_utility"] = {
                "agg_value": M.model_utility({k: logs[k]["agg_value"] for k in M.MODEL_UTILITY_PARTS})
            }
        else:
            _say("model_utility skipped: it needs the retain, ra and wf metric groups", verbose)
        if "memorization" in groups:
            name = f"{forget_split}_perturbed"
            logs.update(_memorization_metrics(scorer, data[name], name))
        if set(MIA_GROUPS) & set(groups):
            logs.update(mia_entries(model, tokenizer, groups, _mia_sides(data, forget_split, holdout),
                                    scorer=scorer, fmt=fmt, backend=backend, progress=progress, min_k=min_k,
                                    reference_scorer=reference_scorer, numerics=numerics, shards=shards))
        if "mia" in groups:
            logs["privleak"] = _privleak(logs, retain, verbose)
    finally:
        if was_training:
            model.train()
        if reference_scorer is not None and reference_was_training:
            reference_model.train()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {k: logs[k] for k in sorted(logs)}


def _clean(obj):
    """Python floats for JSON; NaN and infinities become null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _json_text(obj) -> str:
    return json.dumps(_clean(obj), indent=4)


def format_headline_table(summary: Mapping[str, float], retain_logs: Mapping | None = None) -> str:
    """The headline metrics as a text table, with the retain model's values when given."""
    rows = [("metric", "this model") + (("retain model",) if retain_logs else ())]
    for name in HEADLINE_METRICS:
        ours = summary.get(name)
        theirs = None
        if retain_logs:
            theirs = (retain_logs.get(name) or {}).get("agg_value")
        if ours is None and theirs is None:
            continue
        fmt = lambda v: "-" if v is None else (f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")  # noqa: E731
        rows.append((name, fmt(ours)) + ((fmt(theirs),) if retain_logs else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate_tofu(model, tokenizer, data_dir, forget_split: str = "forget10", *, retain_logs=None,
                  output_dir=None, batch_size: int = 16, max_new_tokens: int = 200,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                  date_string: str | None = DEFAULT_DATE_STRING,
                  splits: Sequence[str] = DEFAULT_METRIC_GROUPS, holdout_split: str | None = None,
                  max_rows: int | None = None, min_k: float = 0.4, progress: bool = True,
                  verbose: bool = True, backend: str = "auto", numerics: str = "altpo-fast",
                  reference_model=None, shards: Shards | None = None,
                  provenance: dict | None = None) -> dict:
    """Evaluate ``model`` on TOFU as open-unlearning does; return the summary (metric -> value).

    Args:
        model: a transformers causal LM (``model.model`` backbone + ``lm_head``), already on its
            device and in its dtype.
        tokenizer: its tokenizer, with a chat template.
        data_dir: a folder of TOFU JSON Lines files (``forget10_perturbed.json``, ...) or a hub
            id (``locuslab/TOFU``, through ``datasets``).
        forget_split: ``forget01``, ``forget05`` or ``forget10``.
        retain_logs: the retain model's ``TOFU_EVAL.json`` (its folder, the file or the loaded
            dict); needed for forget_quality and privleak, which are otherwise skipped (null).
        output_dir: where to write ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` (nothing is
            written when None).
        batch_size: sequences per forward pass and prompts per ``generate`` call.
        max_new_tokens: greedy generation budget for the ROUGE metrics.
        system_prompt, date_string: the chat template's system prompt and date (None: omitted).
        splits: metric groups to compute, a subset of ``METRIC_GROUPS``: ``forget`` (Q_A_Prob,
            PARA/PERT, truth ratio, ROUGE, forget_quality), ``retain``, ``ra`` (real authors),
            ``wf`` (world facts), ``mia`` (loss, zlib, min-k, min-k++ MIA AUCs and privleak),
            ``gradnorm`` (the GradNorm MIA: one backward pass per row), ``memorization``
            (extraction strength, exact memorisation), ``reference`` (the reference-model MIA,
            which needs ``reference_model``; not in the default set). model_utility needs
            retain, ra and wf.
        holdout_split: the MIA holdout split (default: ``forget`` replaced by ``holdout``).
        max_rows: use only the first rows of every split (quick checks, tests).
        min_k: the fraction of lowest-probability tokens for the min-k% attacks.
        progress: tqdm bars; verbose: print skipped metrics and the headline table.
        backend: ``altpo_kernels.linear_logprobs`` backend.
        numerics: ``altpo-fast`` (padding masked by position) or ``open-unlearning`` (every
            token equal to the pad token masked out of attention, as its collator does; with
            pad = eos that includes each in-sequence end-of-turn token).
        reference_model: the model ``mia_reference`` compares with (open-unlearning: the retain
            model), on the same device, sharing ``tokenizer``.
        shards: split the work over ``torchrun`` processes (default: the running process group,
            if any). Every rank returns the whole summary; only rank 0 writes and prints.
        provenance: what was evaluated (:func:`altpo.eval.output.provenance`), written beside the
            results as ``EVAL_PROVENANCE.json`` with their hashes.
    """
    shards = shards if shards is not None else Shards.from_process_group()
    retain = load_retain_logs(retain_logs) if retain_logs is not None else None
    if output_dir is not None:
        out = Path(output_dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output_dir {out} exists and is not a folder; choose another path")
    with bars.third_party_bars(progress and bars.interactive()):  # datasets' and transformers' bars
        logs = compute_tofu_metrics(
            model, tokenizer, data_dir, forget_split, retain_logs=retain, batch_size=batch_size,
            max_new_tokens=max_new_tokens, system_prompt=system_prompt, date_string=date_string,
            splits=splits, holdout_split=holdout_split, max_rows=max_rows, min_k=min_k,
            progress=progress, verbose=verbose and shards.rank == 0, backend=backend,
            numerics=numerics, reference_model=reference_model, shards=shards,
        )
    summary = M.summary_from_eval(logs)
    if shards.rank != 0:
        return summary
    if output_dir is not None:
        from altpo.eval.output import write_results

        write_results(out, _json_text(logs), _json_text(summary), provenance)
    if verbose:
        print(format_headline_table(summary, retain))
        if output_dir is not None:
            print(f"wrote {out / 'TOFU_EVAL.json'} and {out / 'TOFU_SUMMARY.json'}")
    return summary
