"""The planted-truth tests' shared helpers."""
import numpy as np
import pytest

from tests.models.planted import rank_auc


def test_rank_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    y, s = rng.random(300) < 0.3, rng.integers(0, 20, 300).astype(float)       # many ties
    pos, neg = s[y], s[~y]
    pairwise = np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :])
    assert rank_auc(y, s) == pytest.approx(pairwise, abs=1e-12)
