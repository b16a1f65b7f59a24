"""FSDP2 (``--parallel fsdp``) under ``torchrun --nproc-per-node 2`` (gloo, CPU) on a tiny Llama.

One process and two sharded processes take the same global batch each step, so the loss of every
step and every weight after 3 steps must agree to fp32 rounding; the sharded reference pass must
give the unsharded cache; a DCP checkpoint must resume to the uninterrupted weights on the same
number of processes and on another; LoRA must train only the adapters, the same ones on one
process and on two sharded ones.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from altpo.train import train
from altpo.train.config import TrainConfig
from helpers import TOFU_FIXTURE, base_settings, build_model_folder, cli_flags, torchrun


def _torchrun(settings: dict, **overrides) -> None:
    torchrun("-m", "altpo.cli", "train", *cli_flags({**settings, **overrides}))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder, name="model.safetensors"):
    return load_file(str(folder / name))


def _copy_checkpointed_run(src, dst):
    """A run folder as an interrupted run leaves it: checkpoints, settings, metrics, cache."""
    dst.mkdir()
    for name in ("checkpoints", "train_config.json", "metrics.jsonl", "reference_logprobs.safetensors"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run and the 2-process FSDP run (checkpoint at step 2) of the same settings."""
    tofu_dir = TOFU_FIXTURE
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = build_model_folder(tofu_dir, tmp / "model")
    settings = base_settings(tofu_dir, model_dir, tmp / "one", max_steps=3, lr=2e-3)
    assert train(TrainConfig(**settings)).completed
    _torchrun(settings, output=str(tmp / "two"), parallel="fsdp", save_every=2, keep_checkpoints=0)
    return tmp, model_dir, settings


def test_fsdp_step_equals_the_one_process_step(runs):
    tmp, model_dir, _ = runs
    one, two = tmp / "one", tmp / "two"
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)),
                               rtol=1e-6, atol=1e-6)
    a, b, start = _weights(one), _weights(two), _weights(model_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        moved = float((a[name] - start[name]).abs().max())
        assert moved > 1e-3, name  # the steps really changed this tensor
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * max(1.0, moved))
    # the sharded reference pass wrote the cache the one-process pass wrote
    ra, rb = _weights(one, "reference_logprobs.safetensors"), _weights(two, "reference_logprobs.safetensors")
    for key in ("forget", "alternates"):
        assert ra[key].abs().min() > 0
        torch.testing.assert_close(rb[key], ra[key], rtol=1e-5, atol=1e-5)
    # the gathered final model loads with transformers and is the trained one
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(two))
    for name, p in loaded.state_dict().items():
        if name in b:
            assert torch.equal(p, b[name]), name


def test_fsdp_resume_equals_uninterrupted(runs):
    tmp, model_dir, settings = runs
    two = tmp / "two"
    ckpt = two / "checkpoints" / "step-00000002"
    assert (ckpt / "sharded").is_dir() and json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    # same number of processes
    _copy_checkpointed_run(two, tmp / "resumed2")
    _torchrun(settings, output=str(tmp / "resumed2"), parallel="fsdp", save_every=2,
              keep_checkpoints=0, resume=True)
    # one process: DCP reshards the 2-process checkpoint
    _copy_checkpointed_run(two, tmp / "resumed1")
    resumed = train(TrainConfig(**{**settings, "output": str(tmp / "resumed1"), "parallel": "fsdp",
                                   "save_every": 2, "keep_checkpoints": 0, "resume": True}))
    assert resumed.completed and resumed.history[0]["step"] == 3
    ref = _weights(two)
    for folder, tol in ((tmp / "resumed2", 0.0), (tmp / "resumed1", 1e-6)):
        got = _weights(folder)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=tol, atol=tol)
        assert _losses(folder) == pytest.approx(_losses(two), rel=1e-6)


def test_lora_trains_only_adapters_alike_on_one_and_two_sharded_processes(runs):
    tmp, model_dir, settings = runs
    lora = dict(lora_rank=4, lora_alpha=8.0, merge=True, lr=1e-2)
    one = train(TrainConfig(**{**settings, **lora, "output": str(tmp / "lora1"), "save_every": 2}))
    assert one.completed
    # after 2 steps every base weight is the starting one bit for bit, the adapters moved
    start = _weights(model_dir)
    at2 = _weights(tmp / "lora1" / "checkpoints" / "step-00000002")
    base = {n.replace(".base_layer", ""): t for n, t in at2.items() if ".lora_" not in n}
    assert sorted(base) == sorted(start)
    for name, t in base.items():
        assert torch.equal(t, start[name]), name
    assert any(".lora_B" in n and t.abs().max() > 0 for n, t in at2.items())
    _torchrun(settings, **lora, output=str(tmp / "lora2"), parallel="fsdp")
    a = _weights(tmp / "lora1" / "adapter", "adapter_model.safetensors")
    b = _weights(tmp / "lora2" / "adapter", "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * 2  # 2 layers x 7 targets x (A, B)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)  # fp32 tolerance (docs/design.md section 3: ~1e-5) after sharded steps
    assert max(float(a[n].abs().max()) for n in a if "lora_B" in n) > 1e-4  # B started at 0

    # the merged model is base + (alpha / r) B A on the targets and the base weights elsewhere
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp / "lora1")).state_dict()
    scale = lora["lora_alpha"] / lora["lora_rank"]
    for name, w in merged.items():
        if name not in start:
            continue
        module = name.rsplit(".", 1)[0]
        key_a = f"base_model.model.{module}.lora_A.weight"
        if key_a in a:
            delta = scale * a[key_a.replace("lora_A", "lora_B")].double() @ a[key_a].double()
            torch.testing.assert_close(w.double(), start[name].double() + delta, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(w, start[name]), name  # untouched, bit for bit
