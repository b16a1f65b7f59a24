"""open-unlearning compatibility of the evaluation: its pad = eos attention masking
(``--numerics open-unlearning``), mia_reference, the generate.py alternate prompt, and the
evaluation sharded over torchrun processes equal to one process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from altpo.eval import open_unlearning_prompt as OU
from altpo.eval.alternates import generate_alternates
from altpo.eval.tofu import evaluate_tofu, load_tofu_rows
from helpers import REPO_ROOT, launch_env, save_tiny_tofu_model, tiny_tofu_tokenizer, torchrun

ROWS = 3
SYSTEM, DATE = "You are a helpful assistant.", "10 Apr 2025"
FULL_LOG = "eval_logs/tofu_Llama-3.2-1B-Instruct_full/evals_forget10/TOFU_EVAL.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = tiny_tofu_tokenizer(("forget10_perturbed", "holdout10"), ROWS, extra_texts=[OU.TEMPLATE])
    # the model, and a second one as the mia_reference reference
    return [save_tiny_tofu_model(tok, tmp_path_factory.mktemp(f"tiny{seed}"), seed) for seed in (11, 12)]


def _load(path, pad_is_eos=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if pad_is_eos:  # what open-unlearning does to Llama-3 tokenizers, which have no pad token
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def _answer_avg_nll(model, tok, question, answer, mask_eos):
    """float64 mean NLL of the answer tokens from a stock forward of the single sequence."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, date_string=DATE)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False,
                                   date_string=DATE)
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    mask = (ids != tok.eos_token_id).long() if mask_eos else torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0].double()
    lp = torch.log_softmax(logits, -1)[n_prompt - 1:-1].gather(1, ids[0, n_prompt:, None])[:, 0]
    return float(-lp.mean())


def test_open_unlearning_numerics_masks_every_pad_equal_token(tofu_dir, models, tmp_path):
    model, tok = _load(models[0], pad_is_eos=True)
    rows = load_tofu_rows(tofu_dir, "forget10_perturbed", ROWS)
    logs = {}
    for numerics in ("altpo-fast", "open-unlearning"):
        out = tmp_path / numerics
        evaluate_tofu(model, tok, tofu_dir, "forget10", output_dir=out, splits=("forget",), max_rows=ROWS,
                      batch_size=2, max_new_tokens=5, progress=False, verbose=False, numerics=numerics)
        logs[numerics] = json.loads((out / "TOFU_EVAL.json").read_text())
    for i, row in enumerate(rows):
        for numerics, mask_eos in (("altpo-fast", False), ("open-unlearning", True)):
            got = logs[numerics]["forget_Q_A_Prob"]["value_by_index"][str(i)]["avg_loss"]
            want = _answer_avg_nll(model, tok, row["question"], row["answer"], mask_eos)
            assert got == pytest.approx(want, rel=1e-5), (numerics, i)
    ours = [v["avg_loss"] for v in logs["altpo-fast"]["forget_Q_A_Prob"]["value_by_index"].values()]
    theirs = [v["avg_loss"] for v in logs["open-unlearning"]["forget_Q_A_Prob"]["value_by_index"].values()]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) > 1e-4  # the system turn's <|eot_id|> is gone

    # greedy generation under the same mask: one prompt, stock generate with ids != eos as the mask
    from altpo.eval.tofu import encode_prompt, generate_greedy
    from altpo.data.tofu import ChatFormat

    prompt = encode_prompt(tok, rows[0]["question"], ChatFormat(SYSTEM, DATE))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=(ids != tok.eos_token_id).long(), do_sample=False,
                             max_new_tokens=5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = gen[0, len(prompt):].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    want = tok.decode(new, skip_special_tokens=True).strip()
    got = generate_greedy(model, tok, [prompt], batch_size=1, max_new_tokens=5, progress=False,
                          numerics="open-unlearning")
    assert got == [want]


def test_mia_reference_is_target_minus_reference_loss(tofu_dir, models, tmp_path):
    model, tok = _load(models[0])
    reference, _ = _load(models[1])
    evaluate_tofu(model, tok, tofu_dir, "forget10", output_dir=tmp_path, splits=("reference",), max_rows=ROWS,
                  progress=False, verbose=False, reference_model=reference)
    logs = json.loads((tmp_path / "TOFU_EVAL.json").read_text())
    published = json.loads((tofu_dir / FULL_LOG).read_text())["mia_reference"]
    entry = logs["mia_reference"]
    assert set(entry) == set(published)
    for side, split in (("forget", "forget10"), ("holdout", "holdout10")):
        assert set(entry[side]) == set(published[side])
        assert set(entry[side]["value_by_index"]["0"]) == set(published[side]["value_by_index"]["0"])
        for i, row in enumerate(load_tofu_rows(tofu_dir, split, ROWS)):
            target = _answer_avg_nll(model, tok, row["question"], row["answer"], False)
            ref = _answer_avg_nll(reference, tok, row["question"], row["answer"], False)
            # a difference of two fp32 losses: its error is that of the losses, not of the difference
            got = entry[side]["value_by_index"][str(i)]["score"]
            assert got == pytest.approx(target - ref, abs=1e-6 * (abs(target) + abs(ref)))
    with pytest.raises(ValueError, match="reference_model"):
        evaluate_tofu(model, tok, tofu_dir, "forget10", splits=("reference",), max_rows=1, progress=False)


def test_open_unlearning_alternate_prompt(models, tmp_path):
    model, tok = _load(models[0])
    text = OU.prompt_text("Who is {answer} X?", "An author.")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
                           "AI assistant<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nQuestion: Who is ")
    assert "Answer: An author.\nNow pretend you are making things up." in text
    assert text.endswith("introduced answer.<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|> \n\n"
                         "Alternate Answer :")
    assert OU.prompt_ids(tok, "Q?", "A.") == tok(OU.prompt_text("Q?", "A."))["input_ids"]
    assert OU.cut_at_stop_strings(" Jane wrote it.\nQuestion: next") == "Jane wrote it."
    assert OU.cut_at_stop_strings("He was born in Lyon. Q: where") == "He was born in Lyon."
    assert OU.cut_at_stop_strings("  no stop here ") == "no stop here"

    out = tmp_path / "alts.jsonl"
    pairs = [("Who wrote The Glass Orchard?", "It was written by Amara Okafor."),
             ("Where was Lionel Brandt born?", "Lionel Brandt was born in Graz.")]
    report = generate_alternates(model, tok, pairs, k=2, seed=1, output_path=out, batch_size=4,
                                 max_new_tokens=6, progress=False, prompt_style="open-unlearning")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.written_rows == len(rows) and {r["question"] for r in rows} <= {q for q, _ in pairs}
    for r in rows:
        assert r["alternate"] == OU.cut_at_stop_strings(r["alternate"])
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert settings["prompt_style"] == "open-unlearning" and settings["prompt"] == OU.TEMPLATE


def test_sharded_eval_under_torchrun_equals_one_process(tofu_dir, models, tmp_path):
    args = ["eval", "--model", str(models[0]), "--reference-model", str(models[1]), "--data", str(tofu_dir),
            "--metrics", "forget,mia,gradnorm,memorization,reference", "--max-rows", str(ROWS),
            "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "altpo.cli", *args, "--output", str(tmp_path / "one")],
                         env=launch_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun("-m", "altpo.cli", *args, "--output", str(tmp_path / "two"))
    a = json.loads((tmp_path / "one" / "TOFU_EVAL.json").read_text())
    b = json.loads((tmp_path / "two" / "TOFU_EVAL.json").read_text())
    assert set(a) >= {"forget_Q_A_Prob", "mia_min_k", "mia_gradnorm", "mia_reference", "extraction_strength"}
    assert a == b  # bit for bit: each batch is computed exactly as the one-process run computes it
    assert np.isfinite(a["mia_gradnorm"]["auc"])
