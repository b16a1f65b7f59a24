"""The model a run trains is never touched by the run: ``--output`` may not be, lie inside or
contain ``--model``; ``--overwrite`` removes only what an earlier run listed in its manifest; a
folder that holds some other model is never emptied."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
from altpo.train.output_lock import LOCK_NAME
from altpo.train.run_manifest import RUN_MANIFEST
from train_fixtures import base_settings, build_model_folder
from paths import TOFU_FIXTURE


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory):
    return build_model_folder(TOFU_FIXTURE, tmp_path_factory.mktemp("tiny_input_model"))


@pytest.fixture
def model_dir(pristine_model, tmp_path):
    """A copy per test: a test that fails must not damage the next test's model."""
    return Path(shutil.copytree(pristine_model, tmp_path / "model"))


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_model_load(monkeypatch):
    import altpo.train.loop as loop

    monkeypatch.setattr(loop, "load_causal_lm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def _config(tofu_dir, model_dir, out, **overrides):
    return TrainConfig(**base_settings(tofu_dir, model_dir, out, **overrides))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "containing", "link"])
def test_an_output_over_the_input_model_is_refused(tofu_dir, model_dir, tmp_path, monkeypatch,
                                                   where, overwrite):
    before = _tree(model_dir)
    if where == "same":
        out, model = model_dir, model_dir
    elif where == "inside":
        out, model = model_dir / "run", model_dir
    elif where == "containing":
        out, model = tmp_path, model_dir
    else:
        out, model = tmp_path / "link-to-model", model_dir
        out.symlink_to(model_dir)
    expected = {"same": "is", "inside": "lies inside", "containing": "contains", "link": "is"}[where]
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=f"--output .* {expected} --model .*destroy its own input"):
        train(_config(tofu_dir, model, out, overwrite=overwrite))
    assert _tree(model_dir) == before
    assert not (model_dir / LOCK_NAME).exists()
    assert not (model_dir / "run").exists()


def test_a_folder_holding_another_model_is_refused_even_with_overwrite(tofu_dir, model_dir,
                                                                      pristine_model, tmp_path,
                                                                      monkeypatch):
    other = Path(shutil.copytree(pristine_model, tmp_path / "other-model"))
    before = _tree(other)
    _no_model_load(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds a model that no run of this tool wrote "
                                            r"\(config\.json, model\.safetensors; no \.altpo-run\.json lists them"):
            train(_config(tofu_dir, model_dir, other, overwrite=overwrite))
    assert _tree(other) == before


def test_overwrite_removes_only_what_the_run_listed(tofu_dir, model_dir, tmp_path):
    out = tmp_path / "run"
    assert train(_config(tofu_dir, model_dir, out, max_steps=2, save_every=1)).completed
    listed = json.loads((out / RUN_MANIFEST).read_text())["files"]
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "train_config.json",
                 "checkpoints", "train_summary.json"):
        assert name in listed
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match=r"already holds a run of this tool \(checkpoints up to step 1, "
                                        r"a finished model\); .*--overwrite"):
        train(_config(tofu_dir, model_dir, out, max_steps=1))
    assert train(_config(tofu_dir, model_dir, out, max_steps=1, overwrite=True)).completed
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "plots" / "loss.png").read_bytes() == b"\x89PNG"
    assert not (out / "checkpoints").exists()  # the first run's checkpoint was listed, so removed
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_an_output_that_is_a_file_is_named_as_one(tofu_dir, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("keep")
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match="--output .*out.txt exists and is a file, not a folder"):
        train(_config(tofu_dir, model_dir, out, overwrite=True))
    assert out.read_text() == "keep"


def test_an_output_linked_to_another_run_says_where_it_points(tofu_dir, model_dir, tmp_path,
                                                             monkeypatch):
    first = tmp_path / "first"
    assert train(_config(tofu_dir, model_dir, first, max_steps=1)).completed
    before = _tree(first)
    link = tmp_path / "second"
    os.symlink(first, link)
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=f"second \\(a link to {first}\\) already holds a run"):
        train(_config(tofu_dir, model_dir, link, max_steps=1))
    assert _tree(first) == before
