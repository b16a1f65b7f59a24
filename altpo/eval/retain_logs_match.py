"""The retain model's logs must come from the same forget split as the evaluation.

forget_quality compares this model's per-question truth ratios on the forget split with the
retain model's; logs made on another split (forget10's 400 rows for a forget01 evaluation) give a
number that means nothing, so they are refused before any model loads. The check lives with the
other retain-log readers in :mod:`altpo.eval.tofu`; this module keeps its import path.
"""

from altpo.eval.tofu import check_retain_logs_match

__all__ = ["check_retain_logs_match"]
