import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from pipeline.metrics import auc, log_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # rounding creates many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.8]) == 0.75
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(1000) < 0.2
    p = rng.random(1000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-6)
