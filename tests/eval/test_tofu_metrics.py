"""TOFU metric functions against hand-computed cases, scipy / rouge_score, and open-unlearning's
published logs (recomputing its aggregates from its own per-row values)."""

import json
import math
import zlib

import numpy as np
import pytest
import scipy.stats

from altpo.eval import metrics as M

RETAIN90 = "eval_logs/tofu_Llama-3.2-1B-Instruct_retain90/TOFU_EVAL.json"
FULL = "eval_logs/tofu_Llama-3.2-1B-Instruct_full/evals_forget10/TOFU_EVAL.json"


# ----------------------------------------------------------------------------- probabilities


def test_probability_metric_single_and_multi_answer_rows():
    rng = np.random.default_rng(1)
    single = rng.uniform(0.1, 3.0, 6)
    out = M.probability_metric(list(single))
    assert list(out["value_by_index"]) == [str(i) for i in range(6)]
    np.testing.assert_allclose([v["prob"] for v in out["value_by_index"].values()], np.exp(-single), rtol=1e-15)
    assert out["agg_value"] == pytest.approx(np.exp(-single).mean(), rel=1e-14)

    multi = rng.uniform(0.1, 3.0, (4, 5))
    out = M.probability_metric([list(r) for r in multi])
    assert out["value_by_index"]["2"]["avg_loss"] == pytest.approx(list(multi[2]), rel=1e-15)
    # mean over rows of the mean over the row's answers
    assert out["agg_value"] == pytest.approx(np.exp(-multi).mean(axis=1).mean(), rel=1e-14)


def test_normalised_probability_hand_case():
    out = M.normalised_probability_metric([0.2, 0.5], [[0.1, 0.1, 0.2], [0.25, 0.25]])
    assert out["value_by_index"]["0"]["prob"] == pytest.approx(0.2 / 0.6, rel=1e-9)
    assert out["value_by_index"]["1"]["prob"] == pytest.approx(0.5, rel=1e-9)
    assert out["agg_value"] == pytest.approx((1 / 3 + 0.5) / 2, rel=1e-9)


# ----------------------------------------------------------------------------- truth ratio


def test_truth_ratio_hand_case():
    # row 0: P(correct) = 1/2, both wrong answers 1/4 -> TR = 0.5
    # row 1: correct loss 1, wrong losses 0.5 and 1.5 (mean 1) -> TR = 1
    correct = [math.log(2), 1.0]
    wrong = [[math.log(4), math.log(4)], [0.5, 1.5]]
    tr = M.truth_ratios(correct, wrong)
    np.testing.assert_allclose(tr, [0.5, 1.0], rtol=1e-9)
    forget = M.truth_ratio_metric(correct, wrong, "closer_to_1_better")
    assert forget["agg_value"] == pytest.approx((0.5 + 1.0) / 2, rel=1e-9)
    assert forget["value_by_index"]["0"] == {"score": pytest.approx(0.5, rel=1e-9)}
    retain = M.truth_ratio_metric(correct, wrong, "true_better")
    assert retain["agg_value"] == pytest.approx((0.5 + 0.0) / 2, abs=1e-9)


def test_truth_ratio_random_against_float64_reference():
    rng = np.random.default_rng(2)
    correct = rng.uniform(0.2, 4.0, 50)
    wrong = rng.uniform(0.2, 4.0, (50, 5))
    ref = np.exp(-wrong.mean(axis=1)) / np.exp(-correct)
    got = M.truth_ratio_metric(list(correct), [list(w) for w in wrong], "closer_to_1_better")
    np.testing.assert_allclose([v["score"] for v in got["value_by_index"].values()], ref, rtol=1e-8)
    assert got["agg_value"] == pytest.approx(np.mean(np.minimum(ref, 1 / ref)), rel=1e-8)
    got = M.truth_ratio_metric(list(correct), [list(w) for w in wrong], "true_better")
    assert got["agg_value"] == pytest.approx(np.mean(np.clip(1 - ref, 0, None)), rel=1e-8)
    with pytest.raises(ValueError, match="aggregator"):
        M.truth_ratio_metric(list(correct), [list(w) for w in wrong], "mean")


# ----------------------------------------------------------------------------- forget quality


def test_forget_quality_is_the_ks_p_value():
    # fully separated samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, rel=1e-9)
    assert M.forget_quality([0.3, 0.7, 1.1], [0.3, 0.7, 1.1]) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0.0, 1.0, 80), rng.lognormal(0.3, 1.0, 120)
    assert M.forget_quality(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).pvalue, rel=1e-12)
    # open-unlearning's helper tests 1/TR instead; the KS statistic is invariant to that
    assert M.forget_quality(a, b) == pytest.approx(
        scipy.stats.ks_2samp(1 / (a + 1e-10), 1 / (b + 1e-10)).pvalue, rel=1e-9)


# ----------------------------------------------------------------------------- model utility


def test_model_utility_is_harmonic_mean_of_nine_parts():
    rng = np.random.default_rng(4)
    values = rng.uniform(0.05, 1.0, 9)
    parts = dict(zip(M.MODEL_UTILITY_PARTS, values))
    assert M.model_utility(parts) == pytest.approx(9 / np.sum(1 / values), rel=1e-12)
    assert M.model_utility(parts) == pytest.approx(scipy.stats.hmean(values), rel=1e-12)
    # hand case: eight parts of 1/2 and one of 1/4 -> 9 / (16 + 4)
    hand = dict.fromkeys(M.MODEL_UTILITY_PARTS, 0.5)
    hand["wf_Truth_Ratio"] = 0.25
    assert M.model_utility(hand) == pytest.approx(9 / 20, rel=1e-12)
    assert M.model_utility({**parts, "ra_Q_A_ROUGE": 0.0}) == 0.0
    with pytest.raises(ValueError, match="retain_Q_A_ROUGE"):
        M.model_utility({k: v for k, v in parts.items() if k != "retain_Q_A_ROUGE"})


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_l_recall_hand_case_and_against_rouge_score():
    from rouge_score import rouge_scorer

    # LCS of "the cat sat on the mat" and "the cat was on a mat" is "the cat on mat": 4 of 6
    s = M.rouge_scores("the cat was on a mat", "The cat sat on the mat")
    assert s["rougeL_recall"] == pytest.approx(4 / 6)
    assert s["rougeL_f1"] == pytest.approx(2 * (4 / 6) * (4 / 6) / (4 / 6 + 4 / 6))
    # stemming: "running dogs" matches "run dog"
    assert M.rouge_scores("run dog", "running dogs")["rougeL_recall"] == pytest.approx(1.0)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rng = np.random.default_rng(5)
    words = "author born wrote novel prize city mother father teacher genre book the in of".split()
    gens = [" ".join(rng.choice(words, rng.integers(3, 15))) for _ in range(20)]
    gts = [" ".join(rng.choice(words, rng.integers(3, 15))) for _ in range(20)]
    out = M.rouge_metric(gens, gts)
    ref = [scorer.score(gt, gen) for gt, gen in zip(gts, gens)]
    for i, r in enumerate(ref):
        rec = out["value_by_index"][str(i)]
        assert rec["rougeL_recall"] == pytest.approx(r["rougeL"].recall, abs=1e-15)
        assert rec["rouge1_recall"] == pytest.approx(r["rouge1"].recall, abs=1e-15)
        assert rec["generation"] == gens[i] and rec["ground_truth"] == gts[i]
    assert out["agg_value"] == pytest.approx(np.mean([r["rougeL"].recall for r in ref]), rel=1e-12)


# ----------------------------------------------------------------------------- MIA, privleak


def test_min_k_score_hand_case():
    # lowest 40% of 5 tokens = the 2 lowest: -5 and -3 -> 4
    assert M.min_k_score([-1.0, -5.0, -3.0, -0.5, -2.0], 0.4) == pytest.approx(4.0)
    # fewer tokens than 1/k: at least one token is kept
    assert M.min_k_score([-1.0, -2.0], 0.4) == pytest.approx(2.0)
    assert M.min_k_score([], 0.4) == 0.0


def test_min_k_plus_plus_hand_case():
    lp = [-1.0, -4.0, -2.0]
    mu = [-1.5, -2.0, -2.0]
    var = [0.25, 4.0, 1e-9]  # the last variance is clamped to 1e-6
    z = [(-1.0 + 1.5) / 0.5, (-4.0 + 2.0) / 2.0, 0.0]
    assert M.min_k_plus_plus_score(lp, mu, var, 0.4) == pytest.approx(-min(z))


def test_mia_auc_hand_case_and_mann_whitney():
    # holdout above forget in 3 of the 4 pairs
    assert M.mia_auc([1.0, 2.0], [3.0, 1.5]) == pytest.approx(0.75)
    assert M.mia_auc([1.0], [1.0]) == pytest.approx(0.5)  # a tie counts one half
    assert M.mia_auc([5.0, 6.0], [1.0, 2.0]) == pytest.approx(0.0)
    rng = np.random.default_rng(6)
    f, h = rng.normal(0, 1, 37), np.round(rng.normal(0.4, 1, 53), 1)  # rounding makes ties
    u = scipy.stats.mannwhitneyu(h, f).statistic
    assert M.mia_auc(f, h) == pytest.approx(u / (37 * 53), rel=1e-12)
    entry = M.mia_metric(list(f), list(h))
    assert entry["auc"] == entry["agg_value"]
    assert entry["forget"]["agg_value"] == pytest.approx(f.mean())
    assert len(entry["holdout"]["value_by_index"]) == 53


def test_privleak_hand_case():
    # (1 - 0.99) vs (1 - 0.4): (0.01 - 0.6) / 0.6 * 100
    assert M.privleak(0.99, 0.4) == pytest.approx((0.01 - 0.6) / 0.6 * 100, rel=1e-8)
    assert M.privleak(0.4, 0.4) == pytest.approx(0.0, abs=1e-8)


def test_zlib_score():
    text = "Hsiao Yun-Hwa was born in Taipei."
    assert M.zlib_score(2.0, text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))


# ----------------------------------------------------------------------------- memorisation


def _extraction_strength_loop(p, y):
    """open-unlearning's definition, written as its search loop."""
    n = len(y)
    if n == 0:
        return 0.0
    k = 0
    for k in range(n):
        if list(p[k:]) == list(y[k:]):
            break
    return 1 - k / n


def test_extraction_strength_and_exact_memorization():
    y = [5, 6, 7, 8, 9, 10]
    assert M.extraction_strength_score(y, y) == 1.0
    assert M.extraction_strength_score([5, 6, 0, 8, 9, 10], y) == pytest.approx(0.5)  # suffix from 3
    assert M.extraction_strength_score([5, 6, 7, 8, 9, 0], y) == pytest.approx(1 / 6)  # the quirk
    assert M.exact_memorization_score([5, 6, 0, 8, 9, 0], y) == pytest.approx(4 / 6)
    assert M.exact_memorization_score([], []) is None
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        y = rng.integers(0, 3, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
        assert M.extraction_strength_score(p, y) == pytest.approx(_extraction_strength_loop(p, y))


def test_summary_drops_null_metrics():
    logs = {"b": {"agg_value": 0.5}, "a": {"agg_value": None}, "c": {"agg_value": 2.0, "value_by_index": {}}}
    assert M.summary_from_eval(logs) == {"b": 0.5, "c": 2.0}


# ----------------------------------------------------------------------------- published logs


def _scores(entry, field="score"):
    return [v[field] for v in entry["value_by_index"].values()]


def test_reproduces_open_unlearning_aggregates_from_its_own_rows(tofu_dir):
    """Every aggregate of the published logs, recomputed from the logs' per-row values."""
    retain = json.loads((tofu_dir / RETAIN90).read_text())
    full = json.loads((tofu_dir / FULL).read_text())
    for logs in (retain, full):
        for name in ("forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "retain_Q_A_Prob",
                     "ra_Q_A_PERT_Prob", "wf_Q_A_Prob"):
            got = M.probability_metric(_scores(logs[name], "avg_loss"))
            assert got["agg_value"] == pytest.approx(logs[name]["agg_value"], rel=1e-6), name
        para, pert = _scores(logs["forget_Q_A_PARA_Prob"], "avg_loss"), _scores(logs["forget_Q_A_PERT_Prob"], "avg_loss")
        got = M.truth_ratio_metric(para, pert, "closer_to_1_better")
        assert got["agg_value"] == pytest.approx(logs["forget_truth_ratio"]["agg_value"], rel=1e-9)
        np.testing.assert_allclose(_scores(got), _scores(logs["forget_truth_ratio"]), rtol=1e-9)
        for prefix, correct in (("retain", "retain_Q_A_PARA_Prob"), ("ra", "ra_Q_A_Prob"), ("wf", "wf_Q_A_Prob")):
            got = M.truth_ratio_metric(_scores(logs[correct], "avg_loss"),
                                       _scores(logs[f"{prefix}_Q_A_PERT_Prob"], "avg_loss"), "true_better")
            assert got["agg_value"] == pytest.approx(logs[f"{prefix}_Truth_Ratio"]["agg_value"], rel=1e-9)
        for prefix in ("ra", "wf"):
            got = M.normalised_probability_metric(_scores(logs[f"{prefix}_Q_A_Prob"], "prob"),
                                                  _scores(logs[f"{prefix}_Q_A_PERT_Prob"], "prob"))
            assert got["agg_value"] == pytest.approx(logs[f"{prefix}_Q_A_Prob_normalised"]["agg_value"], rel=1e-9)
        parts = {k: logs[k]["agg_value"] for k in M.MODEL_UTILITY_PARTS}
        assert M.model_utility(parts) == pytest.approx(logs["model_utility"]["agg_value"], rel=1e-12)
        for attack in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm"):
            auc = M.mia_auc(_scores(logs[attack]["forget"]), _scores(logs[attack]["holdout"]))
            assert auc == pytest.approx(logs[attack]["auc"], rel=1e-9), attack
        for name in ("forget_Q_A_ROUGE", "ra_Q_A_ROUGE"):
            rows = list(logs[name]["value_by_index"].values())[:40]
            for r in rows:
                s = M.rouge_scores(r["generation"], r["ground_truth"])
                assert s["rougeL_recall"] == pytest.approx(r["rougeL_recall"], abs=1e-12)
                assert s["rouge1_recall"] == pytest.approx(r["rouge1_recall"], abs=1e-12)
    fq = M.forget_quality(_scores(full["forget_truth_ratio"]), _scores(retain["forget_truth_ratio"]))
    assert fq == pytest.approx(full["forget_quality"]["agg_value"], rel=1e-6)
    leak = M.privleak(full["mia_min_k"]["agg_value"], retain["mia_min_k"]["agg_value"])
    assert leak == pytest.approx(full["privleak"]["agg_value"], rel=1e-9)
    # the retain model's own privleak is measured against an AUC of 0.5
    assert M.privleak(retain["mia_min_k"]["agg_value"], 0.5) == pytest.approx(retain["privleak"]["agg_value"], rel=1e-9)


def test_published_mia_aucs_recomputed_from_their_rows(tofu_dir):
    """The full model's six MIA AUCs (gradnorm and reference included) from the log's own per-row
    scores, to 1e-9, by the project's AUC and independently by the Mann-Whitney U statistic."""
    full = json.loads((tofu_dir / FULL).read_text())
    attacks = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm", "mia_reference")
    for attack in attacks:
        forget, holdout = _scores(full[attack]["forget"]), _scores(full[attack]["holdout"])
        auc = M.mia_auc(forget, holdout)
        assert abs(auc - full[attack]["auc"]) < 1e-9, attack
        u = scipy.stats.mannwhitneyu(holdout, forget).statistic / (len(forget) * len(holdout))
        assert abs(u - full[attack]["auc"]) < 1e-9, attack
        assert M.mia_metric(forget, holdout)["agg_value"] == auc
    # gradnorm scores are positive norms: a flipped sign would give 1 - AUC (0.0015)
    gradnorm = _scores(full["mia_gradnorm"]["forget"]) + _scores(full["mia_gradnorm"]["holdout"])
    assert min(gradnorm) > 0 and full["mia_gradnorm"]["auc"] > 0.99
    flipped = M.mia_auc([-x for x in _scores(full["mia_gradnorm"]["forget"])],
                        [-x for x in _scores(full["mia_gradnorm"]["holdout"])])
    assert abs(flipped - (1 - full["mia_gradnorm"]["auc"])) < 1e-9


def test_reference_attack_score_is_target_minus_reference_loss():
    from altpo.eval.mia import reference_scores

    rng = np.random.default_rng(3)
    target, ref = rng.random(7) * 3, rng.random(7) * 3
    np.testing.assert_allclose(reference_scores(target, ref), target - ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference losses"):
        reference_scores(target, ref[:3])
