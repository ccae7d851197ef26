"""The planted-truth tests' shared helpers."""
import numpy as np
import pytest

from tests.models.planted import column, rank_auc, running_means


def test_rank_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    y, s = rng.random(300) < 0.3, rng.integers(0, 20, 300).astype(float)       # many ties
    pos, neg = s[y], s[~y]
    pairwise = np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :])
    assert rank_auc(y, s) == pytest.approx(pairwise, abs=1e-12)


def test_running_means_average_each_users_earlier_rows_only():
    user = [7, 3, 7, 7, 3, 9]
    got = running_means(user, {"click": [1, 0, 0, 1, 1, 1]})
    # user 7: rows 0, 2, 3 -> 0 (no history), 1/1, 1/2; user 3: rows 1, 4 -> 0, 0/1; user 9: row 5 -> 0
    np.testing.assert_allclose(got["pl_click"], [0.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    assert column([1, 2], np.int64).shape == (2, 1)
