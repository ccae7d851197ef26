"""The time split's cutoffs, shared by the Beam preprocessing stage and numpy-only tools (no Beam import here).

Rows with timestamp < eval cutoff train, eval cutoff <= timestamp < test cutoff evaluate, the rest test
(``sources.split_batch_by_time`` applies them).
"""
from __future__ import annotations

from typing import Tuple


def time_cutoffs(time_range: Tuple[float, float, int], eval_fraction: float,
                 test_fraction: float = 0.0) -> Tuple[float, float]:
    """(eval cutoff, test cutoff) from the data's (min timestamp, max timestamp, rows): the last
    ``eval_fraction + test_fraction`` of the time span is held out, its last ``test_fraction`` for test
    (cutoff +inf when there is no test split, or when there are no rows at all)."""
    lo, hi, n = time_range
    if n == 0:
        return (float("inf"), float("inf"))
    span = hi - lo
    return (lo + span * (1.0 - eval_fraction - test_fraction), lo + span * (1.0 - test_fraction) + 1e-9
            if test_fraction > 0 else float("inf"))
