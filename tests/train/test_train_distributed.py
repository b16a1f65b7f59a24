"""Data parallel: ``torchrun --nproc-per-node 2`` (gloo, CPU) reaches the 1-process weights.

Both runs take the same global batch each step (step contents depend on (seed, step) only); in
the 2-process run each rank computes its share (its own forget pairs and its own slots of the
retain draw) and DDP sums the gradients. The weights must agree to fp32 rounding.
"""

import torch
from safetensors.torch import load_file

from altpo.data.step_sampling import StepSampler
from altpo.train import train
from altpo.train.config import TrainConfig
from helpers import base_settings, build_model_folder, cli_flags, torchrun


def test_two_gloo_processes_reach_the_one_process_weights(tofu_dir, tmp_path):
    model_dir = build_model_folder(tofu_dir, tmp_path / "model")
    settings = base_settings(tofu_dir, model_dir, tmp_path / "one", max_steps=3, lr=2e-3)
    one = train(TrainConfig(**settings))
    assert one.completed

    # the ranks of the 2-process run draw different retain rows in every step
    sampler = StepSampler(20, 24, 4, seed=0)
    for step in range(3):
        r0, r1 = sampler.rows(step, 0, 2), sampler.rows(step, 1, 2)
        assert r0.retain != r1.retain and r0.retain + r1.retain == sampler.rows(step).retain

    torchrun("-m", "altpo.cli", "train", *cli_flags({**settings, "output": str(tmp_path / "two")}))

    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    start = load_file(str(model_dir / "model.safetensors"))
    for name in a:
        moved = float((a[name] - start[name]).abs().max())
        assert moved > 1e-3, name  # the step really changed this tensor
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * max(1.0, moved))
