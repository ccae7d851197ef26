"""The time split's cutoffs (pipeline/beam/split.py), worked by hand."""
import math

import pytest

from pipeline.beam.split import time_cutoffs


def test_eval_only_split_holds_out_the_last_fraction_of_the_time_span():
    assert time_cutoffs((100.0, 200.0, 7), 0.2) == (pytest.approx(180.0), math.inf)


def test_eval_and_test_split_the_held_out_tail_in_time_order():
    eval_cut, test_cut = time_cutoffs((0.0, 1000.0, 50), 0.2, 0.1)
    assert eval_cut == pytest.approx(700.0)          # the last 30% is held out
    assert test_cut == pytest.approx(900.0, abs=1e-6)  # its last 10 points of the span are test


def test_no_rows_puts_everything_in_train():
    assert time_cutoffs((math.inf, -math.inf, 0), 0.2, 0.1) == (math.inf, math.inf)
