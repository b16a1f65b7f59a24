"""Training: the loop (``loop``) and the parts it uses, one module each: settings (``config``),
the packed forward/backward of one step (``step``), exact bf16 AdamW (``master_weights``), the
update inside backward (``optimizer_in_backward``), checkpoints (``checkpoint``), the cached
reference log-probs (``reference_cache``), memory settings (``memory``, which asks the planner in
:mod:`altpo.plan`), the output folder (``run_folder``), several processes (``distributed``),
signals (``signals``) and what a run prints and records (``report``).

    from altpo.train import train, TrainConfig
"""

from altpo.train.config import TrainConfig

_LOOP_NAMES = ("train", "TrainResult", "NonFiniteLossError")


def __getattr__(name):
    """The loop's names load with the loop (and torch) on first use, so that code reading only the
    settings (``altpo-fast train --help``) does not pay for torch."""
    if name in _LOOP_NAMES:
        from altpo.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'altpo.train' has no attribute {name!r}")


__all__ = ["train", "TrainConfig", "TrainResult", "NonFiniteLossError"]
