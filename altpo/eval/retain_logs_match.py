"""The retain model's logs must come from the same forget split as the evaluation.

forget_quality compares this model's per-question truth ratios on the forget split with the
retain model's; logs made on another split (forget10's 400 rows for a forget01 evaluation) give a
number that means nothing, so they are refused before any model loads.
"""

from __future__ import annotations

from typing import Mapping

from altpo.eval.tofu import TofuDataError, _retain_truth_ratios


def check_retain_logs_match(logs: Mapping, forget_split: str, forget_rows: int) -> None:
    """Raise :class:`TofuDataError` when ``logs`` hold truth ratios for another number of forget
    questions than ``forget_split``'s ``forget_rows``."""
    ratios = _retain_truth_ratios(logs)
    if ratios is None or len(ratios) == forget_rows:
        return
    guess = {40: "forget01", 200: "forget05", 400: "forget10"}.get(len(ratios))
    made_on = f" (the size of {guess})" if guess else ""
    raise TofuDataError(
        f"the retain-model logs hold truth ratios for {len(ratios)} forget questions{made_on}, but "
        f"--forget-split {forget_split} has {forget_rows}: they were made on another forget split, "
        "and forget_quality against them would mean nothing. Pass the logs of the retain model of "
        f"this split (e.g. the retain{100 - int(''.join(c for c in forget_split if c.isdigit()) or 0):02d} "
        "model's TOFU_EVAL.json), or leave out --retain-logs")
