"""The offline end-to-end demo: made-up authors, tiny models, alternates, AltPO, evaluation."""

__all__ = ["run_demo", "DemoError"]


def __getattr__(name):
    """``run_demo`` loads with the demo (and torch) on first use, so ``altpo-fast demo --help``,
    which reads only the recipes' names, does not pay for torch."""
    if name in __all__:
        from altpo.demo import run

        return getattr(run, name)
    raise AttributeError(f"module 'altpo.demo' has no attribute {name!r}")
