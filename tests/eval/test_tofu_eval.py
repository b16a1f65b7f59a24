"""The TOFU evaluation runner on a tiny random Llama and the first rows of the TOFU fixture's data:
output layout against open-unlearning's published retain90 log, and the numbers against an
independent float64 computation from the model's full logits."""

import json

import numpy as np
import pytest
import scipy.stats
import torch

from altpo.cli import main as cli_main
from altpo.eval.tofu import evaluate_tofu, load_tofu_rows
from helpers import save_tiny_tofu_model, tiny_tofu_tokenizer
ROWS = 4
NEW_TOKENS = 6
RETAIN90 = "eval_logs/tofu_Llama-3.2-1B-Instruct_retain90"
SYSTEM, DATE = "You are a helpful assistant.", "10 Apr 2025"





@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tok = tiny_tofu_tokenizer(("forget10_perturbed", "retain_perturbed", "real_authors_perturbed",
                               "world_facts_perturbed", "holdout10"), ROWS)
    return save_tiny_tofu_model(tok, tmp_path_factory.mktemp("tiny_llama"), 11)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def evaluated(tofu_dir, tiny_model_dir, tmp_path_factory):
    model, tok = _load(tiny_model_dir)
    out = tmp_path_factory.mktemp("eval_out")
    summary = evaluate_tofu(model, tok, tofu_dir, "forget10", retain_logs=tofu_dir / RETAIN90, output_dir=out,
                            batch_size=8, max_new_tokens=NEW_TOKENS, max_rows=ROWS, progress=False)
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    return model, tok, summary, logs, out


def _independent_answer_logprobs(model, tok, question, answer):
    """Full-vocabulary float64 log-probs of the answer tokens (answer + <|eot_id|>), with the
    prompt / answer boundary found from the rendered chat text, not from the project's encoder."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, date_string=DATE)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False,
                                   date_string=DATE)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(ids[n_prompt:])
    rows = logp[n_prompt - 1:len(ids) - 1]
    return rows.gather(1, target[:, None])[:, 0].numpy(), rows.argmax(-1).numpy(), target.numpy(), rows


def test_writes_every_key_of_the_published_log(evaluated, tofu_dir):
    _, _, summary, logs, out = evaluated
    published = json.loads((tofu_dir / RETAIN90 / "TOFU_EVAL.json").read_text())
    assert sorted(logs) == sorted(published)
    for name, entry in published.items():
        assert set(logs[name]) == set(entry), name
        if "value_by_index" in entry:
            assert list(logs[name]["value_by_index"]) == [str(i) for i in range(ROWS)], name
            assert set(logs[name]["value_by_index"]["0"]) == set(entry["value_by_index"]["0"]), name
        if name.startswith("mia_"):
            for side in ("forget", "holdout"):
                assert set(logs[name][side]) == set(entry[side])
                assert len(logs[name][side]["value_by_index"]) == ROWS
    assert list(logs) == sorted(logs)
    saved = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert saved == summary
    assert summary == {k: v["agg_value"] for k, v in logs.items() if v["agg_value"] is not None}
    assert set(summary) >= {"forget_quality", "model_utility", "privleak", "extraction_strength"}


def test_probabilities_match_full_logit_float64_reference(evaluated, tofu_dir):
    model, tok, _, logs, _ = evaluated
    forget = load_tofu_rows(tofu_dir, "forget10_perturbed", ROWS)
    for i, row in enumerate(forget):
        lp, _, _, _ = _independent_answer_logprobs(model, tok, row["question"], row["answer"])
        rec = logs["forget_Q_A_Prob"]["value_by_index"][str(i)]
        assert rec["avg_loss"] == pytest.approx(-lp.mean(), rel=1e-5)
        assert rec["prob"] == pytest.approx(np.exp(lp.mean()), rel=1e-5)
        pert = [-_independent_answer_logprobs(model, tok, row["question"], a)[0].mean()
                for a in row["perturbed_answer"]]
        np.testing.assert_allclose(logs["forget_Q_A_PERT_Prob"]["value_by_index"][str(i)]["avg_loss"], pert,
                                   rtol=1e-5)
    ra = load_tofu_rows(tofu_dir, "real_authors_perturbed", ROWS)[1]
    lp_c = _independent_answer_logprobs(model, tok, ra["question"], ra["answer"])[0].mean()
    lp_w = [_independent_answer_logprobs(model, tok, ra["question"], a)[0].mean() for a in ra["perturbed_answer"]]
    norm = np.exp(lp_c) / (np.exp(lp_c) + np.sum(np.exp(lp_w)))
    assert logs["ra_Q_A_Prob_normalised"]["value_by_index"]["1"]["prob"] == pytest.approx(norm, rel=1e-5)
    tr = np.exp(np.mean(lp_w)) / np.exp(lp_c)
    assert logs["ra_Truth_Ratio"]["value_by_index"]["1"]["score"] == pytest.approx(tr, rel=1e-4)


def test_token_level_metrics_match_full_logit_reference(evaluated, tofu_dir):
    model, tok, _, logs, _ = evaluated
    forget = load_tofu_rows(tofu_dir, "forget10", ROWS)
    holdout = load_tofu_rows(tofu_dir, "holdout10", ROWS)
    scores = {}
    for side, rows in (("forget", forget), ("holdout", holdout)):
        scores[side] = []
        for i, row in enumerate(rows):
            lp, am, target, full = _independent_answer_logprobs(model, tok, row["question"], row["answer"])
            lp, am, target, full = lp[:-1], am[:-1], target[:-1], full[:-1]  # no end-of-turn token
            n = max(1, int(len(lp) * 0.4))
            min_k = -np.sort(lp)[:n].mean()
            assert logs["mia_min_k"][side]["value_by_index"][str(i)]["score"] == pytest.approx(min_k, rel=1e-5)
            p = full.exp()
            mu = (p * full).sum(-1).numpy()
            sd = np.sqrt(np.maximum(((p * full.square()).sum(-1).numpy() - mu ** 2), 1e-6))
            mkpp = -np.sort((lp - mu) / sd)[:n].mean()
            assert logs["mia_min_k_plus_plus"][side]["value_by_index"][str(i)]["score"] == pytest.approx(mkpp, rel=1e-4)
            scores[side].append(min_k)
            if side == "forget":
                k = next((k for k in range(len(target)) if (am[k:] == target[k:]).all()), len(target) - 1)
                es = logs["extraction_strength"]["value_by_index"][str(i)]["score"]
                assert es == pytest.approx(1 - k / len(target))
                em = logs["exact_memorization"]["value_by_index"][str(i)]["score"]
                assert em == pytest.approx(np.mean(am == target))
    auc = scipy.stats.mannwhitneyu(scores["holdout"], scores["forget"]).statistic / ROWS ** 2
    assert logs["mia_min_k"]["auc"] == pytest.approx(auc)
    retain_auc = json.loads((tofu_dir / RETAIN90 / "TOFU_EVAL.json").read_text())["mia_min_k"]["agg_value"]
    assert logs["privleak"]["agg_value"] == pytest.approx(((1 - auc) - (1 - retain_auc)) / (1 - retain_auc) * 100,
                                                          rel=1e-6)


def test_gradnorm_matches_autograd_of_the_hf_loss(evaluated, tofu_dir):
    model, tok, _, logs, _ = evaluated
    row = load_tofu_rows(tofu_dir, "holdout10", ROWS)[2]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, date_string=DATE)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["answer"]}], tokenize=False,
                                   date_string=DATE)
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, : len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
    labels[0, -1] = -100  # the end-of-turn token is left out, as in open-unlearning
    params = list(model.parameters())
    loss = model(ids, labels=labels).loss
    grads = torch.autograd.grad(loss, params)
    expected = torch.stack([g.norm() for g in grads]).mean().item()
    assert expected > 0  # open-unlearning's sign: +norm, so an unseen row (big update) scores high
    assert logs["mia_gradnorm"]["holdout"]["value_by_index"]["2"]["score"] == pytest.approx(expected, rel=1e-4)


def test_rouge_and_forget_quality(evaluated, tofu_dir):
    from rouge_score import rouge_scorer

    _, _, summary, logs, _ = evaluated
    forget = load_tofu_rows(tofu_dir, "forget10_perturbed", ROWS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for i, row in enumerate(forget):
        rec = logs["forget_Q_A_ROUGE"]["value_by_index"][str(i)]
        assert rec["ground_truth"] == row["answer"]
        assert rec["input"].endswith(row["question"] + "assistant\n\n")
        assert rec["rougeL_recall"] == pytest.approx(scorer.score(row["answer"], rec["generation"])["rougeL"].recall)
    ours = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
    published = json.loads((tofu_dir / RETAIN90 / "TOFU_EVAL.json").read_text())
    theirs = [v["score"] for v in published["forget_truth_ratio"]["value_by_index"].values()]
    assert summary["forget_quality"] == pytest.approx(scipy.stats.ks_2samp(ours, theirs).pvalue, rel=1e-9)
    parts = [summary[k] for k in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                                  "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                                  "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]
    expected_mu = 0.0 if min(parts) == 0 else scipy.stats.hmean(parts)
    assert summary["model_utility"] == pytest.approx(expected_mu, rel=1e-12)


def test_without_retain_logs_skips_forget_quality_and_privleak(tofu_dir, tiny_model_dir, tmp_path, capsys):
    model, tok = _load(tiny_model_dir)
    summary = evaluate_tofu(model, tok, tofu_dir, "forget10", output_dir=tmp_path, splits=("forget", "mia"),
                            max_rows=2, max_new_tokens=2, progress=False)
    logs = json.loads((tmp_path / "TOFU_EVAL.json").read_text())
    assert logs["forget_quality"] == {"agg_value": None} and logs["privleak"] == {"agg_value": None}
    assert "forget_quality" not in summary and "privleak" not in summary and "model_utility" not in summary
    assert "forget_Q_A_Prob" in summary and "mia_min_k" in summary
    err = capsys.readouterr()
    text = err.out + err.err
    assert "forget_quality skipped" in text and "privleak skipped" in text


def test_cli_eval_writes_files_and_reports_missing_inputs(tofu_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "evals"
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--data", str(tofu_dir), "--forget-split", "forget10",
                   "--retain-logs", str(tofu_dir / RETAIN90), "--output", str(out), "--metrics", "forget",
                   "--max-rows", "2", "--max-new-tokens", "2", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert 0.0 <= summary["forget_quality"] <= 1.0
    assert "forget_quality" in capsys.readouterr().out
    # refuses to overwrite, and names each missing input before loading anything
    cases = [
        (["--model", str(tiny_model_dir), "--data", str(tofu_dir), "--output", str(out)], "--overwrite"),
        (["--model", str(tmp_path / "nope"), "--data", str(tofu_dir), "--output", str(tmp_path / "o")], "--model"),
        (["--model", str(tiny_model_dir), "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "--data"),
        (["--model", str(tiny_model_dir), "--data", str(tofu_dir), "--retain-logs", str(tmp_path / "nope"),
          "--output", str(tmp_path / "o")], "--retain-logs"),
        (["--model", str(tiny_model_dir), "--data", str(tofu_dir), "--metrics", "forget,bogus",
          "--output", str(tmp_path / "o")], "bogus"),
    ]
    for argv, needle in cases:
        assert cli_main(["eval", *argv]) == 2
        assert needle in capsys.readouterr().err
