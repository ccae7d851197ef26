"""FastDropout (16-bit draws), fused towers (models.layers.mlp.run_towers), FusedAdam and the shared embedding's
combined table gradient (SharedEmbedding.fused_gradient) against independent computations."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from models.keras import keras
from models.layers.dropout import FastDropout
from models.layers.mlp import MLP, run_towers


def _numpy_mlp(weights, x, linear_output=True):
    """Literal ReLU MLP forward from [kernel, bias, ...] (last pair linear if ``linear_output``)."""
    h = x
    pairs = list(zip(weights[0::2], weights[1::2]))
    for i, (k, b) in enumerate(pairs):
        h = h @ k + b
        if i < len(pairs) - 1 or not linear_output:
            h = np.maximum(h, 0.0)
    return h


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_mean_match_the_binomial(rate):
    n = 400_000
    y = FastDropout(rate)(tf.ones([n // 100, 100]), training=True).numpy().ravel()
    kept = np.count_nonzero(y)
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(kept - n * (1 - rate)) < 5 * sd, (kept, n * (1 - rate))
    # Kept units carry 1 / (1 - rate) (rate to 2**-17), dropped ones 0; the mean is 1 within 5 sd of
    # (kept / n) / (1 - rate), sd = sqrt(rate / ((1 - rate) n)).
    np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-4)
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(rate / ((1 - rate) * n))


def test_masks_differ_between_steps_and_inference_is_identity():
    layer = FastDropout(0.3)
    step = tf.function(lambda x: layer(x, training=True))
    x = tf.ones([64, 128])
    a, b = step(x).numpy() != 0, step(x).numpy() != 0
    assert (a != b).mean() > 0.2  # independent masks disagree on 2 * 0.3 * 0.7 = 42% of units
    x = tf.random.normal([64, 128])
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())  # Keras' default outside fit: inference


def test_gradient_is_mask_times_scale():
    rate = 0.25
    x = tf.random.uniform([32, 50], 1.0, 2.0)  # no zeros, so a zero output marks a dropped unit
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = FastDropout(rate)(x, training=True)
        loss = tf.reduce_sum(y * 3.0)
    grad = tape.gradient(loss, x).numpy()
    mask = y.numpy() != 0
    np.testing.assert_allclose(grad, 3.0 * mask / (1 - rate), rtol=1e-4)


def test_config_round_trip_and_saved_model_reload(tmp_path):
    layer = keras.layers.deserialize(keras.layers.serialize(FastDropout(0.4, name="d")))
    assert isinstance(layer, FastDropout) and layer.rate == 0.4 and layer.name == "d"
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3)(FastDropout(0.4)(inp)))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    model.save(os.path.join(tmp_path, "m"))
    loaded = keras.models.load_model(os.path.join(tmp_path, "m"))
    assert any(isinstance(l, FastDropout) and l.rate == 0.4 for l in loaded.layers)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    with pytest.raises(ValueError, match="rate"):
        FastDropout(1.0)


def _towers(prefix, units, output_units=1, dropout=0.2, n=3):
    return [MLP(units, dropout=dropout, output_units=output_units, name=f"{prefix}{i}") for i in range(n)]


@pytest.mark.parametrize("units,output_units", [([16, 8, 4], 1), ([12, 5], None)])
def test_fused_towers_equal_per_tower_outputs_and_gradients(units, output_units):
    x = tf.random.normal([20, 9], seed=1)
    source = _towers("a", units, output_units)
    for t in source:
        t(x)
    towers = _towers("b", units, output_units)
    for t, s in zip(towers, source):
        t(x[:1])  # built one by one, then given the per-tower model's weights
        t.set_weights(s.get_weights())
    fused = run_towers(towers, x, training=False)
    for y, s in zip(fused, source):
        np.testing.assert_allclose(y.numpy(), _numpy_mlp(s.get_weights(), x.numpy(), output_units is not None), rtol=1e-5, atol=1e-5)
    variables = [v for t in towers for v in t.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_sum(y * (i + 1.0)) for i, y in enumerate(run_towers(towers, x, training=False))])
    fused_grads = tape.gradient(loss, variables)
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_sum(t(x, training=False) * (i + 1.0)) for i, t in enumerate(towers)])
    for g, ref in zip(fused_grads, tape.gradient(loss, variables)):
        np.testing.assert_allclose(g.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output_units", [1, None])
def test_fused_training_is_unbiased_dropout_per_tower(output_units):
    # One hidden layer: the output is linear in the mask, so E[training output] = inference output exactly
    # (the dropout scale, folded into the next kernel or applied at the end, included).
    rate, draws = 0.5, 300
    towers = _towers("c", [32], output_units, dropout=rate, n=2)
    x = tf.random.normal([8, 5], seed=2)
    for t in towers:
        t(x)
    towers[1].set_weights(towers[0].get_weights())
    inference = run_towers(towers, x, training=False)[0].numpy()
    step = tf.function(lambda x: tf.stack(run_towers(towers, x, training=True)))
    samples = np.stack([step(x).numpy() for _ in range(draws)])   # [draws, T, B, out]
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(draws)
    assert np.all(np.abs(mean - inference) <= 5 * se + 1e-4)
    # One draw covers both towers, but each unit gets its own mask: equal towers give different outputs.
    assert not np.allclose(samples[0, 0], samples[0, 1])


def test_fused_adam_matches_a_numpy_adam_on_dense_and_sparse_gradients():
    from models.optimizers import FusedAdam

    rng = np.random.default_rng(0)
    table0, kernel0 = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    table, kernel = tf.Variable(table0), tf.Variable(kernel0)
    opt = keras.optimizers.deserialize(keras.optimizers.serialize(FusedAdam(0.05, epsilon=1e-6)))
    assert isinstance(opt, FusedAdam) and opt.epsilon == 1e-6
    batches = [np.array([1, 3, 3, 7]), np.array([0, 3, 29, 29]), np.array([5, 6, 7, 8])]

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.gather(table, ids) @ kernel))
        grads = tape.gradient(loss, [table, kernel])
        assert isinstance(grads[0], tf.IndexedSlices)  # the embedding's gradient is sparse
        opt.apply_gradients(zip(grads, [table, kernel]))

    # Literal Adam (Kingma & Ba, Algorithm 1, bias correction in the step size), every row of m, v decayed.
    params, ms, vs = [table0.astype(np.float64), kernel0.astype(np.float64)], [0.0, 0.0], [0.0, 0.0]
    for t, ids in enumerate(batches, start=1):
        step(tf.constant(ids))
        rows = params[0][ids]
        out_grad = 2 * rows @ params[1]                                   # d loss / d (rows @ kernel)
        g_table = np.zeros_like(params[0])
        np.add.at(g_table, ids, out_grad @ params[1].T)
        grads = [g_table, rows.T @ out_grad]
        for i, g in enumerate(grads):
            ms[i] = 0.9 * ms[i] + 0.1 * g
            vs[i] = 0.999 * vs[i] + 0.001 * g * g
            params[i] = params[i] - 0.05 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * ms[i] / (np.sqrt(vs[i]) + 1e-6)
    np.testing.assert_allclose(table.numpy(), params[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kernel.numpy(), params[1], rtol=1e-4, atol=1e-5)


def _embedding_case(seed=0, batch=64, length=6):
    """A SharedEmbedding with two categorical fields, one dense input and a sequence (ids 1..30, 0 = padding,
    about half of it, row 0 all padding), its features, and a fixed weighting w of its output."""
    from models.layers.embedding import SharedEmbedding

    rng = np.random.default_rng(seed)
    layer = SharedEmbedding({"a": 7, "b": 50}, dense=["x"], embedding_dim=4, sequences={"s": 30})
    seq = np.where(rng.random((batch, length)) < 0.5, rng.integers(1, 31, (batch, length)), 0)
    seq[0] = 0
    feats = {"a": tf.constant(rng.integers(0, 7, (batch, 1))), "b": tf.constant(rng.integers(0, 50, (batch, 1))),
             "x": tf.constant(rng.normal(size=(batch, 1)).astype(np.float32)), "s": tf.constant(seq)}
    layer(feats)
    return layer, feats, rng.normal(size=(batch, 3 * 4 + 1)).astype(np.float32)


def _table_gradients(layer, feats, w, training):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = layer(feats, training=training)
            loss = tf.reduce_sum(y * w)
        return y, tape.gradient(loss, layer.trainable_variables)

    y, grads = step()
    return y.numpy(), {v.name.split("/")[-2]: tf.convert_to_tensor(g).numpy()
                       for v, g in zip(layer.trainable_variables, grads)}


def test_combined_table_gradient_equals_numpy_and_the_per_table_gradients():
    """The combined gradient (one segment sum over all tables, padding left out) is dense and equals, per table,
    the sum over the batch of w's slice at each looked-up row (the sequence's divided by the row's count of
    non-padding ids; padding row 0 gets none), worked out in numpy; the per-table path (Keras' sparse
    gradients) gives the same values and both give the numpy forward."""
    layer, feats, w = _embedding_case()
    layer.dense_gradients = True
    assert layer.fused_gradient()
    y_fused, fused = _table_gradients(layer, feats, w, training=True)
    y_plain, plain = _table_gradients(layer, feats, w, training=False)  # inference: the per-table path

    tables = {v.name.split("/")[-2]: v.numpy() for v in layer.trainable_variables}
    a, b, s = (feats[k].numpy() for k in ("a", "b", "s"))
    mask = (s > 0).astype(np.float64)
    count = np.maximum(mask.sum(1), 1)
    seq_mean = (tables["emb_seq_s"][s] * mask[..., None]).sum(1) / count[:, None]
    want_y = np.concatenate([tables["emb_a"][a[:, 0]], tables["emb_b"][b[:, 0]], seq_mean,
                             np.tanh(feats["x"].numpy())], axis=1)
    np.testing.assert_allclose(y_fused, want_y, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y_fused, y_plain)
    want = {name: np.zeros_like(t, dtype=np.float64) for name, t in tables.items()}
    for i in range(len(a)):
        want["emb_a"][a[i, 0]] += w[i, 0:4]
        want["emb_b"][b[i, 0]] += w[i, 4:8]
        for j in np.flatnonzero(s[i]):
            want["emb_seq_s"][s[i, j]] += w[i, 8:12] / count[i]
    assert want["emb_seq_s"][0].sum() == 0 and np.abs(want["emb_seq_s"][1:]).sum() > 0
    for name in tables:
        np.testing.assert_allclose(fused[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(plain[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_combined_gradient_only_for_fused_adam_without_a_strategy_and_within_the_size_limit(monkeypatch):
    """Compiling with FusedAdam turns the combined gradient on, Keras' Adam leaves it off (its sparse update
    rounds differently from its dense one); a distribution strategy or tables over the row limit keep the
    per-table sparse gradients; training with it gives FusedAdam the same weights as without it."""
    import models.layers.embedding as embedding
    from models.optimizers import FusedAdam
    from tests.pipeline.training import train_worker

    def trained(dense):
        keras.utils.set_random_seed(3)
        model = train_worker.esm2()
        cols = train_worker.arrays(4 * 64, 5)
        feats = {k: cols[k].reshape(-1, 1) for k in tuple(train_worker.CATEGORICAL) + train_worker.DENSE}
        labels = {k: cols[k].reshape(-1, 1) for k in train_worker.LABELS}
        ds = tf.data.Dataset.from_tensor_slices((feats, labels)).batch(64)
        model(next(iter(ds))[0])
        model.compile(optimizer=FusedAdam(1e-2))
        assert model.embedding.dense_gradients and model.embedding.fused_gradient()
        model.embedding.dense_gradients = dense
        initial = {v.name: v.numpy() for v in model.trainable_variables if "emb_" in v.name}
        model.fit(ds, epochs=2, verbose=0)
        return model, initial

    (with_it, initial), (without, _) = trained(True), trained(False)
    for a, b in zip(with_it.weights, without.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    for v in with_it.trainable_variables:  # every table trained (8 steps moved each looked-up row)
        if v.name in initial:
            assert np.abs(v.numpy() - initial[v.name]).max() > 1e-3, v.name

    with_it.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert not with_it.embedding.dense_gradients and not with_it.embedding.fused_gradient()
    layer, feats, _ = _embedding_case()
    layer.dense_gradients = True
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert not layer.fused_gradient()
    monkeypatch.setattr(embedding, "FUSED_GRADIENT_MAX_ROWS", 7 + 50 + 30)
    assert not layer.fused_gradient()
    monkeypatch.setattr(embedding, "FUSED_GRADIENT_MAX_ROWS", 7 + 50 + 31)
    assert layer.fused_gradient()
