"""TOFU metrics as pure functions of per-row statistics, in open-unlearning's output layout.

Nothing here touches a model: the runner (``altpo.eval.tofu``) turns a model into per-row
statistics (average answer NLL, per-token log-probs, greedy generations, argmax predictions),
and these functions turn the statistics into the metric dictionaries that open-unlearning writes
to ``TOFU_EVAL.json``:

- a *row metric* is ``{"agg_value": float, "value_by_index": {"0": {...}, "1": {...}, ...}}``
  with the row index as a string key;
- an *aggregate metric* (forget_quality, model_utility, privleak) is ``{"agg_value": float}``;
- an *MIA metric* is ``{"forget": row metric, "holdout": row metric, "auc": float,
  "agg_value": float}``.

Each definition follows open-unlearning's TOFU evaluation, including its small epsilons and its
quirks (documented where they matter), so numbers compare directly with its published logs.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np

# open-unlearning's guard against division by zero, kept so ratios near 0 match its logs.
EPS = 1e-10

# The nine parts of model utility, as open-unlearning's TOFU config lists them.
MODEL_UTILITY_PARTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)

TRUTH_RATIO_AGGREGATORS = ("closer_to_1_better", "true_better")


def _index_dict(records: Iterable) -> dict:
    return {str(i): r for i, r in enumerate(records)}


def _row_mean(values) -> float:
    """Mean over a row's answers when it has several (perturbed answers), else the value."""
    if isinstance(values, (list, tuple, np.ndarray)):
        if len(values) == 0:
            raise ValueError("a row has an empty list of answers; every row needs at least one")
        return float(np.mean(np.asarray(values, dtype=np.float64)))
    return float(values)


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def probability_metric(avg_losses: Sequence) -> dict:
    """``*_Q_A_Prob`` / ``*_PARA_Prob`` / ``*_PERT_Prob``: ``prob = exp(-avg_loss)`` per answer.

    Args:
        avg_losses: per row, the mean NLL over the answer tokens (the end-of-turn token
            included), or a list of them for rows with several answers (perturbed answers).

    Returns the row metric; each row stores ``{"prob", "avg_loss"}`` (lists for multi-answer
    rows). ``agg_value`` is the mean over rows of each row's mean probability.
    """
    if len(avg_losses) == 0:
        raise ValueError("avg_losses is empty: the split has no rows to score")
    records, row_probs = [], []
    for loss in avg_losses:
        if isinstance(loss, (list, tuple, np.ndarray)):
            losses = [float(x) for x in loss]
            probs = [math.exp(-x) for x in losses]
            records.append({"prob": probs, "avg_loss": losses})
            row_probs.append(float(np.mean(probs)))
        else:
            p = math.exp(-float(loss))
            records.append({"prob": p, "avg_loss": float(loss)})
            row_probs.append(p)
    return {"agg_value": float(np.mean(row_probs)), "value_by_index": _index_dict(records)}


def truth_ratios(correct_avg_losses: Sequence, wrong_avg_losses: Sequence) -> np.ndarray:
    """Per-row truth ratio ``P(wrong) / P(correct)`` with length-normalised probabilities.

    ``P(x) = exp(-avg_loss(x))``; with several wrong answers their average losses are averaged
    first (a geometric mean of their probabilities), as open-unlearning does.
    """
    if len(correct_avg_losses) != len(wrong_avg_losses):
        raise ValueError(
            f"correct_avg_losses has {len(correct_avg_losses)} rows but wrong_avg_losses has "
            f"{len(wrong_avg_losses)}; both must describe the same rows"
        )
    correct = np.array([_row_mean(x) for x in correct_avg_losses], dtype=np.float64)
    wrong = np.array([_row_mean(x) for x in wrong_avg_losses], dtype=np.float64)
    return np.exp(-wrong) / (np.exp(-correct) + EPS)


def aggregate_truth_ratios(ratios, aggregator: str) -> float:
    """``closer_to_1_better`` (forget: mean of min(TR, 1/TR)) or ``true_better`` (mean of max(0, 1-TR))."""
    tr = np.asarray(ratios, dtype=np.float64)
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS))))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - tr)))
    raise ValueError(f"aggregator must be one of {TRUTH_RATIO_AGGREGATORS}, got {aggregator!r}")


def truth_ratio_metric(correct_avg_losses: Sequence, wrong_avg_losses: Sequence, aggregator: str) -> dict:
    """``forget_truth_ratio`` / ``*_Truth_Ratio``: per-row ``{"score": TR}`` and the aggregate.

    The forget set uses ``closer_to_1_better`` (a model that never learnt the facts finds true
    and false answers about equally likely); retain, real authors and world facts use
    ``true_better``.
    """
    if aggregator not in TRUTH_RATIO_AGGREGATORS:
        raise ValueError(f"aggregator must be one of {TRUTH_RATIO_AGGREGATORS}, got {aggregator!r}")
    tr = truth_ratios(correct_avg_losses, wrong_avg_losses)
    if tr.size == 0:
        raise ValueError("no rows to compute truth ratios on")
    return {
        "agg_value": aggregate_truth_ratios(tr, aggregator),
        "value_by_index": _index_dict({"score": float(x)} for x in tr),
    }


def normalised_probability_metric(correct_probs: Sequence[float], wrong_probs: Sequence) -> dict:
    """``ra_Q_A_Prob_normalised`` / ``wf_Q_A_Prob_normalised``: ``p_c / (p_c + Σ p_wrong)``.

    Args:
        correct_probs: per row, ``exp(-avg_loss)`` of the correct answer.
        wrong_probs: per row, the list of ``exp(-avg_loss)`` of the wrong (perturbed) answers.
    """
    if len(correct_probs) != len(wrong_probs):
        raise ValueError(
            f"correct_probs has {len(correct_probs)} rows but wrong_probs has {len(wrong_probs)}"
        )
    if len(correct_probs) == 0:
        raise ValueError("no rows to normalise")
    correct = np.asarray(correct_probs, dtype=np.float64)
    wrong = np.array([float(np.sum(np.asarray(w, dtype=np.float64))) for w in wrong_probs])
    probs = correct / (correct + wrong + EPS)
    return {
        "agg_value": float(np.mean(probs)),
        "value_by_index": _index_dict({"prob": float(p)} for p in probs),
    }


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        # rouge_score logs through absl at INFO for every call on some versions.
        logging.getLogger("absl").setLevel(logging.WARNING)
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return _SCORER


def rouge_scores(generation: str, ground_truth: str) -> dict:
    """``{"rouge1_recall", "rougeL_f1", "rougeL_recall"}`` of a generation against the answer.

    rouge-score with the Porter stemmer; recall is measured against the ground truth (the
    reference), so a long generation that contains the whole answer scores 1.
    """
    s = _rouge_scorer().score(ground_truth, generation)
    return {
        "rouge1_recall": float(s["rouge1"].recall),
        "rougeL_f1": float(s["rougeL"].fmeasure),
        "rougeL_recall": float(s["rougeL"].recall),
    }


def rouge_metric(generations: Sequence[str], ground_truths: Sequence[str],
                 inputs: Sequence[str] | None = None) -> dict:
    """``*_Q_A_ROUGE``: per-row ROUGE records (with input, ground truth and generation); the
    aggregate is the mean ROUGE-L recall."""
    if len(generations) != len(ground_truths):
        raise ValueError(
            f"{len(generations)} generations but {len(ground_truths)} ground truths; they must pair up"
        )
    if len(generations) == 0:
        raise ValueError("no generations to score")
    inputs = list(inputs) if inputs is not None else [""] * len(generations)
    records = []
    for inp, gt, gen in zip(inputs, ground_truths, generations):
        rec = rouge_scores(gen, gt)
        rec.update({"input": inp, "ground_truth": gt, "generation": gen})
        records.append(rec)
    return {
        "agg_value": float(np.mean([r["rougeL_recall"] for r in records])),
        "value_by_index": _index_dict(records),
    }


def forget_quality(forget_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value between this model's forget truth ratios and those
    of a model never trained on the forget set (the retain model). High is good: 1 means the two
    distributions cannot be told apart."""
    from scipy.stats import ks_2samp

    a = np.asarray(forget_truth_ratios, dtype=np.float64)
    b = np.asarray(retain_truth_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs truth ratios from both models; one of them is empty")
    return float(ks_2samp(a, b).pvalue)


def model_utility(parts: Mapping[str, float]) -> float:
    """Harmonic mean of the nine retain / real-author / world-fact values (``MODEL_UTILITY_PARTS``).

    A single zero part makes the utility zero, as the harmonic mean does.
    """
    missing = [k for k in MODEL_UTILITY_PARTS if k not in parts]
    if missing:
        raise ValueError(f"model_utility needs all nine parts; missing {', '.join(missing)}")
    values = np.array([float(parts[k]) for k in MODEL_UTILITY_PARTS], dtype=np.float64)
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"model_utility parts must be finite and >= 0, got {dict(zip(MODEL_UTILITY_PARTS, values))}")
    if np.any(values == 0):
        return 0.0
    return float(len(values) / np.sum(1.0 / values))


def min_k_score(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-k% attack score: minus the mean of the lowest ``k`` fraction of token log-probs.

    At least one token is used; an empty row scores 0 (open-unlearning's convention).
    """
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))
    if lp.size == 0:
        return 0.0
    n = max(1, int(lp.size * k))
    return float(-np.mean(lp[:n]))


def min_k_plus_plus_score(token_logprobs, vocab_mean, vocab_var, k: float = 0.4) -> float:
    """Min-k%++ score: token log-probs standardised by the mean and variance of the log-prob under
    the model's own next-token distribution (variance clamped at 1e-6), then the min-k% score."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.size == 0:
        return 0.0
    mu = np.asarray(vocab_mean, dtype=np.float64)
    var = np.maximum(np.asarray(vocab_var, dtype=np.float64), 1e-6)
    return min_k_score((lp - mu) / np.sqrt(var), k)


def zlib_score(avg_loss: float, text: str) -> float:
    """zlib attack score: the average answer NLL divided by the zlib-compressed answer length."""
    return float(avg_loss) / len(zlib.compress(text.encode("utf-8")))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC of telling holdout (label 1) from forget (label 0) rows by their attack score.

    Scores are "higher = less likely a member" (a loss), so the AUC is near 1 when the model
    clearly memorised the forget set and near 0.5 when it cannot tell the two apart. Equal to
    ``sklearn.metrics.roc_auc_score(labels, scores)``: the Mann-Whitney U statistic with ties
    counted one half, divided by the number of pairs.
    """
    from scipy.stats import rankdata

    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc needs at least one forget and one holdout score")
    ranks = rankdata(np.concatenate([f, h]))
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


def score_metric(scores: Sequence) -> dict:
    """A row metric of ``{"score": x}`` records; the aggregate is the mean of the non-None scores."""
    vals = [float(s) for s in scores if s is not None]
    return {
        "agg_value": float(np.mean(vals)) if vals else None,
        "value_by_index": _index_dict({"score": None if s is None else float(s)} for s in scores),
    }


def mia_metric(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> dict:
    """An MIA entry in open-unlearning's layout: both row metrics, ``auc`` and ``agg_value`` (= auc)."""
    auc = mia_auc(forget_scores, holdout_scores)
    return {
        "forget": score_metric(forget_scores),
        "holdout": score_metric(holdout_scores),
        "auc": auc,
        "agg_value": auc,
    }


def privleak(forget_auc: float, retain_auc: float) -> float:
    """Privacy leakage in percent: the relative gap between this model's and the retain model's
    min-k MIA AUC, on ``1 - AUC``: ``((1-a) - (1-r)) / (1-r) * 100``. 0 is ideal; strongly
    negative means the forget set is still recognisably memorised."""
    score, ref = 1.0 - float(forget_auc), 1.0 - float(retain_auc)
    return (score - ref) / (ref + EPS) * 100.0


def extraction_strength_score(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Extraction strength of one answer: ``1 - k/n`` for the smallest ``k`` such that the greedy
    (teacher-forced) predictions match the labels on the whole suffix ``k..n-1``.

    As in open-unlearning, when not even the last token matches ``k`` stays at ``n - 1`` (the
    last index its search tries), so such a row scores ``1/n`` rather than 0; an empty row
    scores 0.
    """
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must have the same length")
    n = y.size
    if n == 0:
        return 0.0
    # mismatch positions; the suffix after the last mismatch is all-correct
    wrong = np.nonzero(p != y)[0]
    k = 0 if wrong.size == 0 else min(int(wrong[-1]) + 1, n - 1)
    return 1.0 - k / n


def exact_memorization_score(predictions: Sequence[int], labels: Sequence[int]):
    """Fraction of answer tokens the model predicts exactly (teacher-forced argmax); None when
    the answer has no tokens."""
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must have the same length")
    if y.size == 0:
        return None
    return float(np.mean(p == y))


def summary_from_eval(eval_logs: Mapping[str, Mapping]) -> dict:
    """``TOFU_SUMMARY.json``: every metric's ``agg_value``, leaving out the ones that are None."""
    out = {}
    for name in sorted(eval_logs):
        value = _finite_or_none(eval_logs[name].get("agg_value"))
        if value is not None:
            out[name] = value
    return out
