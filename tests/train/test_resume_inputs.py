"""``--resume`` continues only on the inputs the checkpoint was trained on: contents, not paths."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
from train_fixtures import ALTERNATES, base_settings, build_model_folder


def _inputs(tofu_dir, folder):
    """A private copy of model, data and alternates, so the test may rewrite them."""
    build_model_folder(tofu_dir, folder / "model")
    (folder / "data").mkdir()
    for split in ("forget01", "retain99"):
        shutil.copy(tofu_dir / f"{split}.json", folder / "data" / f"{split}.json")
    shutil.copy(tofu_dir / ALTERNATES, folder / "alternates.jsonl")
    return folder


def _settings(tofu_dir, folder, out, **overrides):
    return base_settings(tofu_dir, folder / "model", out, data=str(folder / "data"),
                         alternates=str(folder / "alternates.jsonl"), max_steps=2, save_every=1,
                         **overrides)


def _rewrite_jsonl(path, change):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps(change(i, r)) + "\n" for i, r in enumerate(rows)))


def test_resume_refuses_changed_inputs_and_accepts_moved_ones(tofu_dir, tmp_path):
    src = _inputs(tofu_dir, tmp_path / "src")
    out = tmp_path / "run"
    first = train(TrainConfig(**_settings(tofu_dir, src, out)))
    assert first.completed

    # the same contents at other paths: resume goes on (paths are not the inputs)
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    again = train(TrainConfig(**_settings(tofu_dir, moved, out, resume=True)))
    assert again.completed

    # rewrite every input in place: same paths, other contents
    _rewrite_jsonl(moved / "alternates.jsonl",
                   lambda i, r: {k: "Made up: " + v if k in ("alternate", "sub_answer") else v
                                 for k, v in r.items()})
    _rewrite_jsonl(moved / "data" / "retain99.json",
                   lambda i, r: {**r, "answer": r["answer"] + " Indeed."} if i == 0 else r)
    weights = load_file(str(moved / "model" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(moved / "model" / "model.safetensors"), metadata={"format": "pt"})
    tok_cfg = moved / "model" / "tokenizer_config.json"
    template_file = moved / "model" / "chat_template.jinja"
    if template_file.exists():
        template_file.write_text(template_file.read_text().replace("<|eot_id|>", "<|eot_id|>\n"))
    else:
        cfg = json.loads(tok_cfg.read_text())
        cfg["chat_template"] = cfg["chat_template"].replace("<|eot_id|>", "<|eot_id|>\n")
        tok_cfg.write_text(json.dumps(cfg))

    with pytest.raises(UserError) as err:
        train(TrainConfig(**_settings(tofu_dir, moved, out, resume=True)))
    message = str(err.value)
    assert message.startswith("--resume: the inputs differ")
    for changed in ("model weights", "retain split rows", "alternates", "chat template", "tokens"):
        assert changed in message, message
    assert "forget split rows" not in message and "settings" not in message.split("changed")[0]


def test_resume_refuses_a_changed_setting_by_name(tofu_dir, tmp_path):
    src = _inputs(tofu_dir, tmp_path / "src")
    out = tmp_path / "run"
    train(TrainConfig(**_settings(tofu_dir, src, out)))
    with pytest.raises(UserError, match=r"settings differ from the checkpoint's \(beta: 0.5 -> 0.25\)"):
        train(TrainConfig(**_settings(tofu_dir, src, out, resume=True, beta=0.25)))


def test_resume_refuses_a_compute_dtype_that_resolved_differently(tofu_dir, tmp_path, monkeypatch):
    """The settings are the same strings (--dtype auto), so comparing settings cannot see it; the
    dtype that auto resolved to (here as on a device with bf16) differs, and only the checkpoint's
    input fingerprints catch it."""
    import altpo.train.loop as loop

    src = _inputs(tofu_dir, tmp_path / "src")
    out = tmp_path / "run"
    assert train(TrainConfig(**_settings(tofu_dir, src, out, dtype="auto"))).completed
    real = loop.train_dtype
    monkeypatch.setattr(loop, "train_dtype",
                        lambda name, device: torch.bfloat16 if name == "auto" else real(name, device))
    with pytest.raises(UserError) as err:
        train(TrainConfig(**_settings(tofu_dir, src, out, dtype="auto", resume=True)))
    message = str(err.value)
    assert message.startswith("--resume: the inputs differ") and "compute dtype" in message
    assert "settings differ" not in message
