"""Kill a tiny training run with SIGKILL at 20 moments (random ones, and several inside checkpoint
writes), resume after each, and reach the uninterrupted run's weights bit for bit.

A random kill comes at a random time within about two steps (scaled by the measured step time, so
the run does not end first on a fast machine) after the attempt logged its first step: inside a
step, a checkpoint write, a metrics write or the next start-up.

The runs are forked from a server process that imported the trainer once, so each restart costs
the run's own start-up, not Python's imports; every run, the uninterrupted one included, uses one
thread, so the arithmetic is the same in all of them.
"""

import json
import multiprocessing
import random
import time

import torch
from safetensors.torch import load_file

import fault_child
from helpers import base_settings

KILLS = 20
STEPS = 40


def _last_record(out) -> dict:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError, IndexError):
        return {}  # missing, or a torn line: no progress seen yet


def _last_step(out) -> int:
    return _last_record(out).get("step", 0)


def _checkpoint_steps(out) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []


def test_twenty_kills_then_resume_reach_the_uninterrupted_weights(tofu_dir, model_dir, tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["altpo.train.loop", "fault_child"])
    settings = base_settings(tofu_dir, model_dir, tmp_path / "whole", max_steps=STEPS,
                             save_every=1, keep_checkpoints=2)

    def start(out, resume, phase=None):
        run = {**settings, "output": str(out), "resume": resume, "overwrite": not resume}
        p = ctx.Process(target=fault_child.run, args=(run, phase))
        p.start()
        return p

    whole = start(tmp_path / "whole", resume=False)  # runs beside the killed one

    out = tmp_path / "killed"
    rng = random.Random(12)
    inside = {i: fault_child.PHASES[n % len(fault_child.PHASES)]
              for n, i in enumerate(sorted(rng.sample(range(KILLS), 8)))}
    kills, phases_hit = 0, []
    while kills < KILLS:
        resume = bool(_checkpoint_steps(out))
        before = _last_step(out) if resume else 0
        phase = inside.get(kills)
        p = start(out, resume, phase)
        if phase:  # it kills itself inside its first checkpoint write
            p.join(300)
            phases_hit.append(phase)
        else:  # a random moment within about two steps after the run has made progress
            deadline = time.monotonic() + 300
            while p.is_alive() and _last_step(out) <= before and time.monotonic() < deadline:
                time.sleep(0.005)
            step_time = _last_record(out).get("step_time_s", 0.05)
            time.sleep(rng.uniform(0.0, 2.0 * step_time))  # in a step, a save, or a metrics write
            p.kill()
            p.join(60)
        assert p.exitcode == -9, f"kill {kills} ({phase or 'random'}): exit code {p.exitcode}"
        assert not (out / "config.json").exists(), "the run finished before all kills"
        kills += 1
        # what a kill may leave is never taken for a checkpoint: every step-N folder is whole
        for step in _checkpoint_steps(out):
            assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()

    last = start(out, resume=bool(_checkpoint_steps(out)))
    last.join(300)
    whole.join(300)
    assert last.exitcode == 0 and whole.exitcode == 0
    assert sorted(set(phases_hit)) == sorted(fault_child.PHASES)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".tmp-*"))

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
