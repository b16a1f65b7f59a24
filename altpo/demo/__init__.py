"""The offline end-to-end demo: made-up authors, tiny models, alternates, AltPO, evaluation."""

from altpo.demo.run import DemoError, run_demo

__all__ = ["run_demo", "DemoError"]
