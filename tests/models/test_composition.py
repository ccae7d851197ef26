import numpy as np
import pytest
import tensorflow as tf

from models.layers import ESM2Composition, ESMMComposition


def _col(values):
    return tf.constant(np.asarray(values, dtype=np.float32).reshape(-1, 1))


def test_esm2_composition_matches_hand_computed_values():
    # y1..y4 chosen so that every term matters; expected values worked out by hand:
    # row 0: y=(0.5, 0.2, 0.6, 0.1): cvr = 0.8*0.1 + 0.2*0.6 = 0.20; ctavr = 0.10; ctcvr = 0.10
    # row 1: y=(0.1, 0.9, 0.3, 0.05): cvr = 0.1*0.05 + 0.9*0.3 = 0.275; ctavr = 0.09; ctcvr = 0.0275
    # row 2: y=(1.0, 0.0, 0.9, 0.4): DAction impossible -> cvr = y4 = 0.4
    y = [_col([0.5, 0.1, 1.0]), _col([0.2, 0.9, 0.0]), _col([0.6, 0.3, 0.9]), _col([0.1, 0.05, 0.4])]
    out = {k: v.numpy().reshape(-1) for k, v in ESM2Composition()(y).items()}
    np.testing.assert_allclose(out["ctr"], [0.5, 0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["ctavr"], [0.10, 0.09, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["cvr"], [0.20, 0.275, 0.4], rtol=1e-6)
    np.testing.assert_allclose(out["ctcvr"], [0.10, 0.0275, 0.4], rtol=1e-6)


def test_esm2_cvr_is_not_the_common_wrong_form():
    # Public ports often write cvr = y2*y3 + y4 or (1-y2)*y3 + y2*y4; with y3 != y4 these differ.
    y1, y2, y3, y4 = 0.3, 0.25, 0.8, 0.04
    out = ESM2Composition()([_col([y1]), _col([y2]), _col([y3]), _col([y4])])
    cvr = float(out["cvr"].numpy()[0, 0])
    assert cvr == pytest.approx(0.75 * 0.04 + 0.25 * 0.8)
    assert cvr != pytest.approx(0.75 * 0.8 + 0.25 * 0.04)
    assert cvr != pytest.approx(0.25 * 0.8 + 0.04)


def test_esm2_composition_outputs_are_probabilities_and_ordered():
    rng = np.random.default_rng(0)
    y1, y3, y4 = rng.random(1000), rng.random(1000), rng.random(1000)
    # y2 away from 1/2 and y3 away from y4: only there does cvr tell the weight on y3 (y2) from the weight on
    # y4 (1 - y2); with y2 = 1/2 or y3 = y4 the swapped form (1 - y2) * y3 + y2 * y4 gives the same value.
    y2 = np.where(rng.random(1000) < 0.5, rng.uniform(0.0, 0.35, 1000), rng.uniform(0.65, 1.0, 1000))
    y4 = np.where(np.abs(y3 - y4) < 0.2, (y3 + 0.5) % 1.0, y4)
    out = {k: v.numpy().reshape(-1) for k, v in ESM2Composition()([_col(y1), _col(y2), _col(y3), _col(y4)]).items()}
    for v in out.values():
        assert np.all((v >= 0) & (v <= 1))
    assert np.all(out["ctr"] >= out["ctavr"])
    assert np.all(out["ctr"] >= out["ctcvr"])
    # cvr is the convex combination of y3 (purchase | DAction) with weight y2 = P(DAction | click) and y4
    # (purchase | OAction) with weight 1 - y2 (Eq. 3): where it lies between y4 and y3 is y2 itself.
    np.testing.assert_allclose((out["cvr"] - y4) / (y3 - y4), y2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["ctcvr"], y1 * ((1 - y2) * y4 + y2 * y3), rtol=1e-5, atol=1e-7)
    # The inputs can tell Eq. 3 from its y3/y4 swap: they differ by |1 - 2 y2| |y3 - y4| >= 0.3 * 0.2 everywhere.
    assert np.min(np.abs(out["cvr"] - ((1 - y2) * y3 + y2 * y4))) > 0.05


def test_esmm_composition():
    out = ESMMComposition()([_col([0.2, 0.5]), _col([0.1, 0.3])])
    np.testing.assert_allclose(out["ctcvr"].numpy().reshape(-1), [0.02, 0.15], rtol=1e-6)
    np.testing.assert_allclose(out["cvr"].numpy().reshape(-1), [0.1, 0.3], rtol=1e-6)
