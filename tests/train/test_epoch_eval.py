"""Evaluation during training: --eval-every-epoch writes evals/epoch-N/ in altpo-fast eval's format,
--keep-best keeps the best epoch's model beside the final one, on one process and under torchrun."""

import json

import pytest
import torch

from altpo.errors import UserError
from altpo.eval.tofu import evaluate_tofu
from altpo.train import train
from altpo.train.config import TrainConfig
from altpo.train.epoch_eval import is_better, parse_keep_best
from helpers import base_settings, build_model_folder, cli_flags, torchrun

EPOCH_STEPS = 5  # 4 questions x 5 alternates = 20 pairs, batch 4


def test_every_epoch_evaluated_and_best_model_kept(tofu_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_model_folder(tofu_dir, tmp_path / "model")
    out = tmp_path / "run"
    # mia: no generation, so the CPU test stays short (the metric groups share one code path)
    settings = base_settings(tofu_dir, model_dir, out, max_steps=2 * EPOCH_STEPS, eval_every_epoch="mia",
                             eval_max_rows=3, keep_best="mia_loss:max")
    result = train(TrainConfig(**settings))
    assert result.completed
    summaries = {}
    for epoch in (1, 2):
        folder = out / "evals" / f"epoch-{epoch}"
        logs = json.loads((folder / "TOFU_EVAL.json").read_text())
        summaries[epoch] = json.loads((folder / "TOFU_SUMMARY.json").read_text())
        assert len(logs["mia_loss"]["forget"]["value_by_index"]) == 3
        assert summaries[epoch]["mia_loss"] == logs["mia_loss"]["agg_value"]
    losses = {e: json.loads((out / "evals" / f"epoch-{e}" / "TOFU_EVAL.json").read_text())["mia_loss"]
              for e in (1, 2)}
    assert losses[1]["forget"]["value_by_index"] != losses[2]["forget"]["value_by_index"]
    best_epoch = max(summaries, key=lambda e: (summaries[e]["mia_loss"], -e))  # ties keep the earlier
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["epoch"] == best_epoch and best["value"] == summaries[best_epoch]["mia_loss"]
    assert (out / "model.safetensors").exists() and (out / "best" / "model.safetensors").exists()

    # the kept model is the one that scored that value
    model = AutoModelForCausalLM.from_pretrained(out / "best", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "best")
    evaluate_tofu(model, tok, tofu_dir, "forget01", splits=("mia",), max_rows=3, progress=False,
                  verbose=False, output_dir=tmp_path / "again")
    again = json.loads((tmp_path / "again" / "TOFU_EVAL.json").read_text())["mia_loss"]["forget"]["value_by_index"]
    for epoch, logs in losses.items():
        close = all(v["score"] == pytest.approx(logs["forget"]["value_by_index"][i]["score"], rel=1e-5)
                    for i, v in again.items())
        assert close == (epoch == best_epoch), epoch


def test_epoch_eval_settings_are_checked(tofu_dir, tmp_path):
    def config(**kw):
        return TrainConfig(**base_settings(tofu_dir, tmp_path, tmp_path / "o", **kw))

    for kw, needle in (
        (dict(keep_best="model_utility"), "--keep-best needs --eval-every-epoch"),
        (dict(eval_every_epoch="forget,bogus"), "bogus"),
        (dict(eval_every_epoch="forget", keep_best="model_utility"), "ra, retain, wf"),
        (dict(eval_every_epoch="forget", keep_best="forget_quality"), "--eval-retain-logs"),
        (dict(eval_every_epoch="mia", keep_best="mia_loss"), "mia_loss:max"),
        (dict(eval_every_epoch="forget", eval_max_rows=0), "--eval-max-rows"),
    ):
        with pytest.raises(UserError, match=needle):
            config(**kw).validate()
    assert parse_keep_best("privleak") == ("privleak", "zero")
    assert parse_keep_best("mia_loss:min") == ("mia_loss", "min")
    assert is_better(-3.0, 5.0, "zero") and not is_better(4.0, 5.0, "max") and is_better(1.0, None, "min")
    assert not is_better(float("nan"), 1.0, "min")


def test_epoch_eval_under_torchrun(tofu_dir, tmp_path):
    model_dir = build_model_folder(tofu_dir, tmp_path / "model")
    settings = base_settings(tofu_dir, model_dir, tmp_path / "one", max_steps=EPOCH_STEPS, eval_every_epoch="mia",
                             eval_max_rows=3, keep_best="mia_min_k:min")
    train(TrainConfig(**settings))
    torchrun("-m", "altpo.cli", "train", *cli_flags({**settings, "output": str(tmp_path / "two")}))
    one = json.loads((tmp_path / "one" / "evals" / "epoch-1" / "TOFU_SUMMARY.json").read_text())
    two = json.loads((tmp_path / "two" / "evals" / "epoch-1" / "TOFU_SUMMARY.json").read_text())
    assert set(one) == set(two)
    for name in one:  # the two runs' weights agree to fp32 rounding (test_train_distributed)
        assert two[name] == pytest.approx(one[name], rel=1e-3, abs=1e-4), name
    assert json.loads((tmp_path / "two" / "best" / "best.json").read_text())["epoch"] == 1
