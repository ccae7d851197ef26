"""STAN model: Eq. 13 loss assembly, Beta state updated only by training, serving path free of it."""
import numpy as np
import pytest
import tensorflow as tf

from models.keras import keras
from models.stan import STAN, STANConfig

CATEGORICAL = {"user_id_id": 6, "user_age_id": 3, "item_id_id": 5}
DENSE = ("x_z",)


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    feats = {k: tf.constant(rng.integers(0, c, (n, 1)), tf.int64) for k, c in CATEGORICAL.items()}
    feats["x_z"] = tf.constant(rng.normal(size=(n, 1)), tf.float32)
    click = rng.random((n, 1)) < 0.4
    daction = click & (rng.random((n, 1)) < 0.5)
    purchase = click & (rng.random((n, 1)) < 0.3)
    labels = {"click": tf.constant(click, tf.int64), "daction": tf.constant(daction, tf.int64),
              "purchase": tf.constant(purchase, tf.int64)}
    for name in ("click", "daction", "purchase"):
        labels[f"pl_{name}"] = tf.constant(rng.random((n, 1)), tf.float32)
    return feats, labels


def _model(**kw):
    keras.utils.set_random_seed(0)  # tiny ReLU experts: some random inits leave a gate with no gradient
    cfg = STANConfig(hidden_units=(4,), expert_units=(8,), embedding_dim=4, dropout=0.0,
                     user_fields=("user_id_id", "user_age_id"), **kw)
    m = STAN(CATEGORICAL, DENSE, cfg)
    m(_batch()[0])
    return m


def _bce(y, p):
    y = np.asarray(y, np.float64).reshape(-1)
    p = np.clip(np.asarray(p, np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_loss_without_beta_is_eq13_with_gamma_equal_preferences():
    m = _model(use_beta=False)
    feats, labels = _batch()
    preds = {k: v.numpy() for k, v in m(feats, training=False).items()}
    yt = m.user_preferences(feats).numpy()
    expected = 0.0
    for k, (out, lab) in enumerate((("ctr", "click"), ("ctavr", "daction"), ("ctcvr", "purchase"))):
        expected += np.mean(yt[:, k] * _bce(labels[lab], preds[out]))
        expected += np.mean((labels[f"pl_{lab}"].numpy().reshape(-1) - yt[:, k]) ** 2)
    assert float(m.compute_loss(feats, labels, training=False)) == pytest.approx(expected, rel=1e-5)


def test_normalized_gamma_divides_each_task_weight_by_its_batch_mean():
    """Preset ``normalized``: gamma^k / mean_batch(gamma^k), so the weights average 1 per task (Eq. 13's
    relative weighting between users kept); checked on the w/o-Beta form, where gamma = y~."""
    from models.stan import PRESETS

    assert PRESETS["normalized"].normalize_gamma and not PRESETS["default"].normalize_gamma
    m = _model(use_beta=False, normalize_gamma=True)
    feats, labels = _batch()
    preds = {k: v.numpy() for k, v in m(feats, training=False).items()}
    yt = m.user_preferences(feats).numpy().astype(np.float64)
    gamma = yt / (yt.mean(axis=0, keepdims=True) + 1e-7)
    expected = 0.0
    for k, (out, lab) in enumerate((("ctr", "click"), ("ctavr", "daction"), ("ctcvr", "purchase"))):
        expected += np.mean(gamma[:, k] * _bce(labels[lab], preds[out]))
        expected += np.mean((labels[f"pl_{lab}"].numpy().reshape(-1) - yt[:, k]) ** 2)
    assert float(m.compute_loss(feats, labels, training=False)) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(m.loss_weights(feats, m.user_preferences(feats), training=False).numpy().mean(0),
                               1.0, rtol=1e-5)


def test_beta_state_changes_only_in_training_and_follows_algorithm_1():
    m = _model()
    feats, labels = _batch()
    before = m.stage.alpha.numpy().copy()
    m.compute_loss(feats, labels, training=False)
    np.testing.assert_array_equal(m.stage.alpha.numpy(), before)  # evaluation leaves the state alone
    yt = m.user_preferences(feats).numpy()
    m.compute_loss(feats, labels, training=True)
    users = feats["user_id_id"].numpy().reshape(-1)
    alpha = np.ones((6, 3))
    c = np.zeros(6)
    for u, y in zip(users, yt):
        c[u] += 1
        alpha[u] += y * c[u]
    np.testing.assert_allclose(m.stage.alpha.numpy(), alpha, rtol=1e-5)


def test_serving_call_does_not_touch_stage_state_and_gradients_reach_trainables():
    m = _model()
    feats, labels = _batch(64)
    m(feats, training=False)
    assert float(tf.reduce_sum(m.stage.count)) == 0.0
    with tf.GradientTape() as tape:
        loss = m.compute_loss(feats, labels, training=True)
    grads = tape.gradient(loss, m.trainable_variables)
    for v, g in zip(m.trainable_variables, grads):
        assert g is not None, v.name
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0, v.name
    assert not any("stage" in v.name for v in m.trainable_variables)


def test_fit_trains_and_save_reload_keeps_predictions_and_state(tmp_path):
    m = _model()
    feats, labels = _batch(256, seed=1)
    m.compile(optimizer=keras.optimizers.Adam(1e-2))
    m.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(64), epochs=2, verbose=0)
    assert float(tf.reduce_sum(m.stage.count)) == 2 * 256
    expected = {k: v.numpy() for k, v in m(feats, training=False).items()}
    path = str(tmp_path / "stan")
    m.save(path, save_format="tf")
    reloaded = keras.models.load_model(path)
    for k, v in expected.items():
        np.testing.assert_array_equal(v, reloaded(feats, training=False)[k].numpy())
    np.testing.assert_array_equal(reloaded.stage.alpha.numpy(), m.stage.alpha.numpy())


def test_bad_user_fields_are_named():
    with pytest.raises(ValueError, match="nope_id"):
        STAN(CATEGORICAL, DENSE, STANConfig(user_fields=("nope_id",)))
