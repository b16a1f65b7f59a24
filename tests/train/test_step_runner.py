"""The step runner and the schedule are chosen once per run, from the settings alone."""

from types import SimpleNamespace

import pytest

from altpo.errors import UserError
from altpo.train.schedule import Schedule
from altpo.train.step_runner import InBackwardSteps, OpenUnlearningSteps, PlainSteps, choose_step_runner


def _choose(numerics="altpo-fast", in_backward=False, world=1):
    return choose_step_runner(SimpleNamespace(numerics=numerics),
                              SimpleNamespace(optimizer_in_backward=in_backward),
                              SimpleNamespace(world=world))


def test_the_runner_follows_the_settings():
    assert _choose() is PlainSteps
    assert _choose(world=4) is PlainSteps
    assert _choose(in_backward=True) is InBackwardSteps
    assert _choose(numerics="open-unlearning", world=2) is OpenUnlearningSteps


def test_runners_that_cannot_run_are_refused_with_the_fix():
    with pytest.raises(UserError, match="use --optimizer-in-backward off under torchrun"):
        _choose(in_backward=True, world=2)
    with pytest.raises(UserError, match="--numerics open-unlearning needs --optimizer-in-backward off"):
        _choose(numerics="open-unlearning", in_backward=True)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    config = SimpleNamespace(lr=2.0, max_steps=0, epochs=2.0, warmup_epochs=0.5)
    schedule = Schedule.for_run(config, steps_per_epoch=10)
    assert (schedule.total_steps, schedule.warmup_steps) == (20, 5)
    # warm-up: 0, 0.4, ..., then from 2.0 at step 5 down by 2.0 / 15 per step
    assert [schedule.lr_at(s) for s in (0, 1, 5)] == pytest.approx([0.0, 0.4, 2.0])
    assert schedule.lr_at(11) == pytest.approx(2.0 * 9 / 15)
    assert schedule.lr_at(20) == 0.0
    capped = Schedule.for_run(SimpleNamespace(lr=1.0, max_steps=3, epochs=9.0, warmup_epochs=0.0), 10)
    assert capped.total_steps == 3 and capped.lr_at(0) == 1.0


def test_the_reference_enters_at_one_place():
    from altpo.train.parallel import ScaleOut
    from altpo.train.reference_cache import step_reference

    none = step_reference(SimpleNamespace(method="gradascent", reference="cached"), ScaleOut(), None,
                          None, "", None, 0, None, None, None)
    assert none.logprobs is None and none.fill is None
    assert none.key is None and none.path is None and not none.reused
    with pytest.raises(UserError, match="--parallel auto chose fsdp.*use --reference cached"):
        step_reference(SimpleNamespace(method="altpo", reference="resident"), ScaleOut(fsdp=True),
                       None, None, "", None, 0, None, None, None)
