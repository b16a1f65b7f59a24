"""An eval made during training (--eval-every-epoch) records what ``altpo-fast eval`` records, plus
which weights it scored: the run, the epoch and the optimizer step."""

import hashlib
import json
from pathlib import Path

import torch
import transformers

from altpo.cli import main as cli_main
from altpo.eval.output import PROVENANCE_NAME
from altpo.train import train
from altpo.train.config import TrainConfig
from train_fixtures import base_settings, build_model_folder

EPOCH_STEPS = 5  # 4 questions x 5 alternates = 20 pairs, batch 4


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_epoch_eval_records_the_step_settings_versions_and_split_hashes(tofu_dir, tmp_path):
    model_dir = build_model_folder(tofu_dir, tmp_path / "model")
    out = tmp_path / "run"
    settings = base_settings(tofu_dir, model_dir, out, max_steps=EPOCH_STEPS, eval_every_epoch="mia",
                             eval_max_rows=3)
    assert train(TrainConfig(**settings)).completed
    folder = out / "evals" / "epoch-1"
    record = json.loads((folder / PROVENANCE_NAME).read_text())

    # which weights: the run, the epoch and the step; the evaluated weights are the final model's
    # (one epoch, so the last step), not the starting model's
    training = record["training"]
    assert (training["epoch"], training["step"], training["steps_per_epoch"]) == (1, EPOCH_STEPS, EPOCH_STEPS)
    assert Path(training["run"]) == out.resolve() and training["starting_model"] == str(model_dir)

    # the same record from altpo-fast eval on the saved final model and on the starting model
    for name, model in (("final", out), ("start", model_dir)):
        assert cli_main(["eval", "--model", str(model), "--data", str(tofu_dir), "--forget-split",
                         "forget01", "--output", str(tmp_path / name), "--metrics", "mia",
                         "--max-rows", "3", "--dtype", "fp32", "--quiet"]) == 0
    final = json.loads((tmp_path / "final" / PROVENANCE_NAME).read_text())
    start = json.loads((tmp_path / "start" / PROVENANCE_NAME).read_text())
    assert record["model_weights_sha256"] == final["model_weights_sha256"]
    assert record["model_weights_sha256"] != start["model_weights_sha256"]
    # every field the CLI's record has, the epoch eval's has too (and they agree where they should)
    assert set(final) <= set(record), set(final) - set(record)
    assert set(final["settings"]) <= set(record["settings"]), set(final["settings"]) - set(record["settings"])
    for key in ("forget_split", "metrics", "numerics", "max_rows", "max_new_tokens", "dtype",
                "retain_logs", "date_string"):
        assert record["settings"][key] == final["settings"][key], key
    assert record["data_splits"] == final["data_splits"]
    assert record["packages"] == final["packages"]

    # the split files: the MIA group reads forget01 and holdout01, hashed as they are on disk
    splits = record["data_splits"]
    assert set(splits) == {"forget01", "holdout01"}
    for name, entry in splits.items():
        path = Path(entry["file"])
        assert path.parent == Path(tofu_dir).resolve() and path.stem == name
        assert entry["sha256"] == _sha256(path) and entry["bytes"] == path.stat().st_size
    # the releases that computed it
    assert record["packages"]["torch"] == torch.__version__
    assert record["packages"]["transformers"] == transformers.__version__
    # the result files it describes
    for name in ("TOFU_EVAL.json", "TOFU_SUMMARY.json"):
        assert record["files"][name] == _sha256(folder / name)
