"""Probes of a hostile user: odd model folders, a learning rate that cannot move a weight, and
SIGTERM / SIGINT during the reference computation and during the first checkpoint write. Each
ends in a clear message before the model loads, or in correct behaviour with nothing lost."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from altpo.errors import UserError
from altpo.train import train
from altpo.train.config import TrainConfig
from train_fixtures import base_settings, build_model_folder
from paths import TOFU_FIXTURE


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return build_model_folder(TOFU_FIXTURE, tmp_path_factory.mktemp("tiny_hostile_model"))


def _config(model_dir, out, **overrides):
    return TrainConfig(**base_settings(TOFU_FIXTURE, model_dir, out, **overrides))


def _no_model_load(monkeypatch):
    import altpo.train.loop as loop

    monkeypatch.setattr(loop, "load_causal_lm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _variant(base: Path, folder: Path) -> Path:
    return Path(shutil.copytree(base, folder))


# ------------------------------------------------------------------------------------------------
# model folders


def test_a_tokenizer_without_a_pad_token_trains(base_model, tmp_path):
    model = _variant(base_model, tmp_path / "model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (model / name).exists():
            _edit_json(model / name, pad_token=None)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).pad_token is None  # the case under test
    result = train(_config(model, tmp_path / "run", max_steps=2))
    assert result.completed and torch.isfinite(torch.tensor(result.last_metrics["loss"]))


def test_a_tokenizer_without_a_chat_template_is_refused_before_the_model_loads(tmp_path,
                                                                               monkeypatch):
    model = build_model_folder(TOFU_FIXTURE, tmp_path / "model", chat_template=False)
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match="has no chat template"):
        train(_config(model, tmp_path / "run"))


def _resized(base: Path, folder: Path, rows: int) -> Path:
    from transformers import AutoModelForCausalLM

    model = _variant(base, folder)
    m = AutoModelForCausalLM.from_pretrained(model)
    m.resize_token_embeddings(rows)
    m.save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == rows
    return model


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_the_model_loads(
        base_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(base_model))
    model = _resized(base_model, tmp_path / "model", tokens - 100)
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=f"the tokenizer has {tokens} tokens but --model .* has "
                                        f"{tokens - 100} embedding rows"):
        train(_config(model, tmp_path / "run"))


def test_an_embedding_larger_than_the_tokenizer_trains(base_model, tmp_path):
    from transformers import AutoTokenizer

    model = _resized(base_model, tmp_path / "model",
                     len(AutoTokenizer.from_pretrained(base_model)) + 100)
    assert train(_config(model, tmp_path / "run", max_steps=2)).completed


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads_train_resume_and_save_as_they_came(base_model, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model = _variant(base_model, tmp_path / "model")
    m = AutoModelForCausalLM.from_pretrained(model)
    m.config.tie_word_embeddings = tied
    if tied:  # one matrix for both, saved once
        m.lm_head.weight = m.get_input_embeddings().weight
    m.save_pretrained(model)
    out = tmp_path / "run"
    first = train(_config(model, out, max_steps=4, save_every=1),
                  on_step=lambda r: os.kill(os.getpid(), signal.SIGTERM) if r["step"] == 2 else None)
    assert first.interrupted == "SIGTERM" and first.steps_done == 3  # noticed after step 3
    assert train(_config(model, out, max_steps=4, save_every=1, resume=True)).completed
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.tie_word_embeddings is tied
    same = saved.lm_head.weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    assert same is tied


def test_a_config_naming_another_architecture_is_refused(base_model, tmp_path):
    model = _variant(base_model, tmp_path / "model")
    _edit_json(model / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError, match=r"weights do not fit the GPT2LMHeadModel that its config.json "
                                        r"describes \(\d+ weight\(s\) missing from the files"):
        train(_config(model, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_architectures_field_alone_does_not_decide_the_class(base_model, tmp_path):
    """model_type picks the class; a wrong ``architectures`` list loads the same weights."""
    model = _variant(base_model, tmp_path / "model")
    _edit_json(model / "config.json", architectures=["BertForMaskedLM"])
    runs = [train(_config(m, tmp_path / f"run{i}", max_steps=1)) for i, m in enumerate((base_model, model))]
    assert runs[0].last_metrics["loss"] == runs[1].last_metrics["loss"]


# ------------------------------------------------------------------------------------------------
# a learning rate that cannot move a weight


def test_a_learning_rate_below_float_resolution_is_refused(base_model, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=r"--lr 1e-300 is too small to change the weights"):
        train(_config(base_model, tmp_path / "run", lr=1e-300))


# ------------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_reference_computation_stops_cleanly(base_model, tmp_path, monkeypatch,
                                                                 sig):
    import altpo.train.reference_cache as rc

    real = rc.sequence_logprobs

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(rc, "sequence_logprobs", signalled)
    out = tmp_path / "run"
    # Ctrl-C as a terminal delivers it: a test runner started in the background inherits SIGINT
    # ignored, and then the signal this test sends would do nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_config(base_model, out, max_steps=2))
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".altpo-train.lock"]
    assert train(_config(base_model, out, max_steps=2)).completed  # the same command again


@pytest.mark.parametrize("where", ["scoring", "writing"])
def test_sigterm_during_the_sharded_reference_stops_cleanly(base_model, tmp_path, monkeypatch, where):
    """--parallel fsdp (one process, gloo): SIGTERM while the shards score the reference, or right
    after the cache's temporary file is written, stops the run with nothing (half-)written."""
    import altpo.train.fsdp as fsdp
    import altpo.train.reference_cache as rc

    module, name = (fsdp, "sharded_sequence_logprobs") if where == "scoring" else (rc, "save_file")
    real = getattr(module, name)

    def signalled(*args, **kwargs):
        if where == "scoring":
            os.kill(os.getpid(), signal.SIGTERM)
        result = real(*args, **kwargs)
        if where == "writing":
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, signalled)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM while the reference log-probs were computed"):
        train(_config(base_model, out, max_steps=2, parallel="fsdp"))
    monkeypatch.undo()
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".altpo-train.lock"]
    assert train(_config(base_model, out, max_steps=2, parallel="fsdp")).completed  # again


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_first_checkpoint_write_saves_and_resumes(base_model, tmp_path,
                                                                      monkeypatch, sig):
    import altpo.train.checkpoint as ck

    real, sent = ck._save_model_folder, []

    def signalled(folder, model, tokenizer):
        if not sent:
            sent.append(folder)
            os.kill(os.getpid(), sig)
        real(folder, model, tokenizer)

    monkeypatch.setattr(ck, "_save_model_folder", signalled)
    out = tmp_path / "run"
    first = train(_config(base_model, out, max_steps=4, save_every=1))
    monkeypatch.undo()
    assert first.interrupted == signal.Signals(sig).name and first.steps_done == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert ck.checkpoint_problem(out / "checkpoints" / "step-00000001") is None  # finished whole
    again = train(_config(base_model, out, max_steps=4, save_every=1, resume=True))
    assert again.completed
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_reference_cache_gets_the_usual_file_mode(base_model, tmp_path):
    old = os.umask(0o022)
    try:
        assert train(_config(base_model, tmp_path / "run", max_steps=1)).completed
    finally:
        os.umask(old)
    mode = (tmp_path / "run" / "reference_logprobs.safetensors").stat().st_mode & 0o777
    assert mode == 0o644, oct(mode)  # readable by the group, as model files are
