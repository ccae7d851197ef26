import numpy as np
import pytest
import tensorflow as tf

from models.esm2 import ESM2, PRESETS, ESM2Config
from models.keras import keras
from models.layers import MLP, SharedEmbedding
from tests.models import capacity

CATEGORICAL = {"a_id": 7, "b_id": 3, "hour_id": 24}
DENSE = ("x_z",)


def _batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    feats = {k: tf.constant(rng.integers(0, card, (n, 1)), tf.int64) for k, card in CATEGORICAL.items()}
    feats["x_z"] = tf.constant(rng.normal(size=(n, 1)), tf.float32)
    click = rng.random((n, 1)) < 0.3
    daction = click & (rng.random((n, 1)) < 0.4)
    purchase = click & (rng.random((n, 1)) < np.where(daction, 0.5, 0.1))
    labels = {"click": tf.constant(click, tf.int64), "daction": tf.constant(daction, tf.int64),
              "purchase": tf.constant(purchase, tf.int64)}
    return feats, labels


def _model(**overrides):
    cfg = ESM2Config(hidden_units=(8, 4), dropout=0.0, embedding_dim=4, **overrides)
    model = ESM2(CATEGORICAL, DENSE, cfg)
    feats, _ = _batch()
    model(feats)
    return model


def _bce(y, p):
    y, p = np.asarray(y, np.float64).reshape(-1), np.clip(np.asarray(p, np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_loss_is_eq11_weighted_sum_of_entire_space_logloss():
    model = _model(w_ctr=1.0, w_ctavr=0.5, w_ctcvr=2.0)
    feats, labels = _batch()
    out = {k: v.numpy() for k, v in model(feats, training=False).items()}
    expected = (1.0 * _bce(labels["click"], out["ctr"]) + 0.5 * _bce(labels["daction"], out["ctavr"])
                + 2.0 * _bce(labels["purchase"], out["ctcvr"]))
    got = float(model.compute_loss(feats, labels, training=False))
    assert got == pytest.approx(expected, rel=1e-5)


def test_outputs_compose_the_four_towers():
    model = _model()
    feats, _ = _batch()
    y1, y2, y3, y4 = [t.numpy() for t in model.decomposed(feats, training=False)]
    out = {k: v.numpy() for k, v in model(feats, training=False).items()}
    np.testing.assert_allclose(out["ctr"], y1, rtol=1e-6)
    np.testing.assert_allclose(out["ctavr"], y1 * y2, rtol=1e-5)
    np.testing.assert_allclose(out["cvr"], (1 - y2) * y4 + y2 * y3, rtol=1e-5)
    np.testing.assert_allclose(out["ctcvr"], y1 * ((1 - y2) * y4 + y2 * y3), rtol=1e-5)


def test_gradients_reach_every_trainable_variable():
    model = _model()
    feats, labels = _batch(256)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(feats, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert model.trainable_variables
    for var, grad in zip(model.trainable_variables, grads):
        assert grad is not None, var.name
        g = tf.convert_to_tensor(grad)
        assert float(tf.reduce_sum(tf.abs(g))) > 0, var.name


def test_training_reduces_loss_on_a_learnable_signal():
    model = _model()
    feats, labels = _batch(2000, seed=1)
    # Make click depend on a feature so there is something to learn.
    a = feats["a_id"].numpy()
    rng = np.random.default_rng(2)
    click = rng.random(a.shape) < np.where(a < 3, 0.7, 0.05)
    labels = dict(labels, click=tf.constant(click, tf.int64),
                  daction=tf.constant(click & (rng.random(a.shape) < 0.3), tf.int64),
                  purchase=tf.constant(click & (rng.random(a.shape) < 0.2), tf.int64))
    before = float(model.compute_loss(feats, labels))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(200), epochs=5, verbose=0)
    after = float(model.compute_loss(feats, labels))
    assert after < before - 0.1


def test_config_round_trip_gives_identical_predictions():
    model = _model()
    feats, _ = _batch()
    clone = ESM2.from_config(model.get_config())
    clone(feats)
    clone.set_weights(model.get_weights())
    for k, v in model(feats).items():
        np.testing.assert_array_equal(v.numpy(), clone(feats)[k].numpy())


def test_save_and_reload_gives_identical_predictions(tmp_path):
    model = _model()
    feats, _ = _batch()
    expected = {k: v.numpy() for k, v in model(feats).items()}
    path = str(tmp_path / "esm2")
    model.save(path, save_format="tf")
    reloaded = keras.models.load_model(path)
    got = reloaded(feats, training=False)
    for k, v in expected.items():
        np.testing.assert_array_equal(v, got[k].numpy())


@pytest.mark.parametrize("layer", [
    MLP([8, 4], dropout=0.2, output_units=1, l2=1e-4),
    SharedEmbedding(CATEGORICAL, DENSE, embedding_dim=5, dense_activation="linear"),
])
def test_layer_config_round_trip(layer):
    feats, _ = _batch()
    x = feats if isinstance(layer, SharedEmbedding) else tf.random.normal([4, 6])
    y = layer(x)
    clone = type(layer).from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(y.numpy(), clone(x).numpy())
    assert clone.get_config() == layer.get_config()


def test_shared_embedding_values():
    layer = SharedEmbedding({"a_id": 3}, ("x_z",), embedding_dim=2)
    feats = {"a_id": tf.constant([[2], [0]], tf.int64), "x_z": tf.constant([[0.5], [-2.0]])}
    out = layer(feats).numpy()
    table = layer.get_weights()[0]
    np.testing.assert_allclose(out[:, :2], table[[2, 0]], rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], np.tanh([0.5, -2.0]), rtol=1e-6)
    assert layer.field_embeddings(feats).shape == (2, 1, 2)


def test_config_validation_and_paper_preset():
    with pytest.raises(ValueError, match="dropout"):
        ESM2Config(dropout=1.5)
    with pytest.raises(ValueError, match="hidden_units"):
        ESM2Config(hidden_units=())
    paper = PRESETS["paper"]
    assert paper.hidden_units == (512, 256, 128, 32) and paper.dropout == 0.5
    assert paper.learning_rate == 5e-4 and paper.batch_size == 1000


def test_wide_preset_gives_dnn_about_a_million_tower_parameters_at_the_builtin_width():
    from models import registry

    def tower_params(preset):                                           # 20 x 16 + 40 dense = 360 inputs
        model = registry.build("dnn", capacity.CATEGORICAL, capacity.DENSE, registry.resolve_config("dnn", preset))
        return capacity.tower_params(model, capacity.features())

    # 360 x 1024 + 1024 x 512 + 512 x 256 + 256 x 1 weights and 1024 + 512 + 256 + 1 biases
    assert tower_params("wide") == 360 * 1024 + 1024 * 512 + 512 * 256 + 256 + 1024 + 512 + 256 + 1
    assert tower_params("default") == 360 * 128 + 128 * 64 + 64 * 32 + 32 + 128 + 64 + 32 + 1
