import json

import numpy as np
import pytest
import tensorflow as tf

from models import registry
from models.keras import keras
from models.layers import CGC, ExpertGate
from models.mmoe import MMoE, MMoEConfig
from models.ple import PLE, PLEConfig

CATEGORICAL = {"a_id": 7, "b_id": 3, "hour_id": 24}
DENSE = ("x_z",)
OUTPUTS = ("ctr", "ctavr", "cvr", "ctcvr")


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


def _model(kind, **overrides):
    """kind: "mmoe" or "ple<L>" (L extraction levels)."""
    keras.utils.set_random_seed(0)  # small ReLU experts: some random inits leave a gate with no gradient
    if kind == "mmoe":
        cfg = MMoEConfig(hidden_units=(6,), num_experts=3, expert_units=(8, 5), dropout=0.0, embedding_dim=4,
                         **overrides)
        model = MMoE(CATEGORICAL, DENSE, cfg)
    else:
        cfg = PLEConfig(hidden_units=(6,), num_levels=int(kind[3:]), experts_per_task=2, num_shared_experts=1,
                        expert_units=(5,), dropout=0.0, embedding_dim=4, **overrides)
        model = PLE(CATEGORICAL, DENSE, cfg)
    model(_batch()[0])
    return model


def _randomize(layer_or_model, seed=0, scale=0.5):
    """Known, non-default weights (non-zero biases included)."""
    rng = np.random.default_rng(seed)
    layer_or_model.set_weights([rng.normal(0.0, scale, w.shape).astype(np.float32)
                                for w in layer_or_model.get_weights()])


# ---- independent numpy reference ---------------------------------------------------------------------------

def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _relu_mlp(x, weights):
    """Expert: every layer relu(x W + b); weights [W0, b0, W1, b1, ...]."""
    for w, b in zip(weights[::2], weights[1::2]):
        x = np.maximum(x @ w + b, 0.0)
    return x


def _tower_prob(x, weights):
    """Tower: ReLU hidden layers, then a linear logit, then the model's sigmoid."""
    x = _relu_mlp(x, weights[:-2])
    return 1.0 / (1.0 + np.exp(-(x @ weights[-2] + weights[-1])))


def _mix(gate, experts):
    """sum_e gate[:, e] * experts[e]."""
    return sum(gate[:, [e]] * out for e, out in enumerate(experts))


def _compose(y1, y2, y3, y4):
    cvr = (1 - y2) * y4 + y2 * y3
    return {"ctr": y1, "ctavr": y1 * y2, "cvr": cvr, "ctcvr": y1 * cvr}


def _np_cgc(level, xs):
    """One CGC level on inputs [x_1..x_T, x_s] (numpy)."""
    T = level.num_tasks
    shared = [_relu_mlp(xs[T], e.get_weights()) for e in level.shared_experts]
    own = [[_relu_mlp(xs[k], e.get_weights()) for e in level.task_experts[k]] for k in range(T)]
    out = [_mix(_softmax(xs[k] @ level.task_gates[k].get_weights()[0]), own[k] + shared) for k in range(T)]
    if level.shared_gate is not None:
        every = [o for own_k in own for o in own_k] + shared
        out.append(_mix(_softmax(xs[T] @ level.shared_gate.get_weights()[0]), every))
    return out


# ---- layers ------------------------------------------------------------------------------------------------

def test_expert_gate_is_mmoe_eq7_eq8():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    layer = ExpertGate(num_experts=3, expert_units=(2,), num_tasks=2)
    layer(x)
    # Known weights per sublayer: expert i = relu(x W_i + b_i), gate k = W_gk (no bias).
    W = rng.normal(size=(3, 4, 2)).astype(np.float32)
    b = rng.normal(size=(3, 2)).astype(np.float32)
    G = rng.normal(size=(2, 4, 3)).astype(np.float32)
    for i, expert in enumerate(layer.experts):
        expert.set_weights([W[i], b[i]])
    for k, gate in enumerate(layer.gates):
        gate.set_weights([G[k]])
    out = [o.numpy() for o in layer(x)]
    f = [np.maximum(x @ W[i] + b[i], 0.0) for i in range(3)]
    for k in range(2):
        logits = x @ G[k]
        g = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)   # Eq. 8
        expected = g[:, [0]] * f[0] + g[:, [1]] * f[1] + g[:, [2]] * f[2]  # Eq. 7
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.gate_weights(x)[k].numpy(), g, rtol=1e-5, atol=1e-7)
    # Two gates over the same experts give two different mixtures.
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_cgc_level_matches_hand_written_equations():
    # T = 2 tasks, m_t = 2 own experts each, m_s = 1 shared expert, shared gate on; distinct inputs per part.
    rng = np.random.default_rng(4)
    x1, x2, xs = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(3))
    layer = CGC(num_tasks=2, experts_per_task=2, num_shared_experts=1, expert_units=(4,), shared_output=True)
    layer([x1, x2, xs])
    _randomize(layer, seed=5, scale=1.0)
    out = [o.numpy() for o in layer([x1, x2, xs])]
    assert len(out) == 3

    def expert(e, x):
        w, b = e.get_weights()
        return np.maximum(x @ w + b, 0.0)

    def gate(d, x):
        return _softmax(x @ d.get_weights()[0])

    (e11, e12), (e21, e22) = layer.task_experts
    s1, = layer.shared_experts
    g1, g2, gs = gate(layer.task_gates[0], x1), gate(layer.task_gates[1], x2), gate(layer.shared_gate, xs)
    assert g1.shape == (6, 3) and gs.shape == (6, 5)
    task1 = g1[:, [0]] * expert(e11, x1) + g1[:, [1]] * expert(e12, x1) + g1[:, [2]] * expert(s1, xs)
    task2 = g2[:, [0]] * expert(e21, x2) + g2[:, [1]] * expert(e22, x2) + g2[:, [2]] * expert(s1, xs)
    shared = (gs[:, [0]] * expert(e11, x1) + gs[:, [1]] * expert(e12, x1) + gs[:, [2]] * expert(e21, x2)
              + gs[:, [3]] * expert(e22, x2) + gs[:, [4]] * expert(s1, xs))
    for got, expected in zip(out, (task1, task2, shared)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # One input broadcast to every part (the first level) equals passing it T + 1 times.
    np.testing.assert_allclose(layer(x1)[1].numpy(), layer([x1, x1, x1])[1].numpy(), rtol=1e-6)


def test_cgc_task_gate_mixes_only_its_own_and_the_shared_experts():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    layer = CGC(num_tasks=3, experts_per_task=2, num_shared_experts=2, expert_units=(4,), shared_output=True)
    layer(x)
    _randomize(layer, seed=7, scale=1.0)
    before = [o.numpy() for o in layer(x)]
    _silence(layer.task_experts[1])
    after = [o.numpy() for o in layer(x)]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[2], before[2])
    assert np.abs(after[1] - before[1]).max() > 1e-3   # task 1 itself changes...
    assert np.abs(after[3] - before[3]).max() > 1e-3   # ...and so does the shared gate's mixture of all experts
    # Changing task 1's input leaves the other tasks alone too.
    xs = [x, x + 1.0, x, x]
    moved = [o.numpy() for o in layer(xs)]
    np.testing.assert_array_equal(moved[0], after[0])
    np.testing.assert_array_equal(moved[2], after[2])


@pytest.mark.parametrize("layer", [
    ExpertGate(num_experts=3, expert_units=(5, 2), num_tasks=4, dropout=0.2, l2=1e-4),
    CGC(num_tasks=4, experts_per_task=2, num_shared_experts=3, expert_units=(5,), shared_output=True, l2=1e-4),
])
def test_layer_config_round_trip(layer):
    x = tf.random.normal([4, 6])
    y = layer(x)
    clone = type(layer).from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    for a, b in zip(y, clone(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert clone.get_config() == layer.get_config()


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="num_experts"):
        ExpertGate(num_experts=0, expert_units=(4,), num_tasks=2)
    with pytest.raises(ValueError, match="expert_units"):
        ExpertGate(num_experts=2, expert_units=(), num_tasks=2)
    with pytest.raises(ValueError, match="num_shared_experts"):
        CGC(num_tasks=2, experts_per_task=1, num_shared_experts=0, expert_units=(4,))
    layer = CGC(num_tasks=2, experts_per_task=1, num_shared_experts=1, expert_units=(4,))
    with pytest.raises(ValueError, match="expected one input or 3"):
        layer([tf.zeros([2, 3])] * 2)


# ---- models ------------------------------------------------------------------------------------------------

def test_mmoe_model_matches_numpy_forward():
    model = _model("mmoe")
    _randomize(model, seed=8)
    feats, _ = _batch(32, seed=9)
    x = model.embedding(feats).numpy()
    experts = [_relu_mlp(x, e.get_weights()) for e in model.mixture.experts]
    mixed = [_mix(_softmax(x @ g.get_weights()[0]), experts) for g in model.mixture.gates]
    y = [_tower_prob(m, t.get_weights()) for m, t in zip(mixed, model.towers)]
    expected = _compose(*y)
    got = model(feats, training=False)
    assert set(got) == set(OUTPUTS)
    for k in OUTPUTS:
        assert got[k].shape == (32, 1)
        np.testing.assert_allclose(got[k].numpy(), expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_model_matches_numpy_forward_through_every_level(levels):
    model = _model(f"ple{levels}")
    _randomize(model, seed=10)
    assert [lv.shared_gate is not None for lv in model.levels] == [True] * (levels - 1) + [False]
    feats, _ = _batch(32, seed=11)
    x = model.embedding(feats).numpy()
    h = [x] * 5                           # g^{k,0} = x for the 4 towers and the shared part
    for level in model.levels:
        h = _np_cgc(level, h)             # [x_1..x_4, x_s] -> next level
    assert len(h) == 4
    expected = _compose(*[_tower_prob(g, t.get_weights()) for g, t in zip(h, model.towers)])
    got = model(feats, training=False)
    for k in OUTPUTS:
        np.testing.assert_allclose(got[k].numpy(), expected[k], rtol=1e-4, atol=1e-6)


def _silence(experts):
    """Zero weights: each expert outputs relu(0) = 0."""
    for e in experts:
        e.set_weights([np.zeros_like(w) for w in e.get_weights()])


def test_ple_shared_gate_carries_other_towers_experts_to_the_next_level():
    # Silence tower 2's first-level experts and watch tower 1 (y1). With one level (CGC) tower 1 cannot
    # notice; with two it does, through level 0's shared gate, whose output only the next level's shared
    # experts read: cut that route and tower 1 is blind again.
    feats, _ = _batch(32, seed=12)

    def y1_change(levels, cut_shared_route=False):
        model = _model(f"ple{levels}")
        _randomize(model, seed=13)
        if cut_shared_route:
            _silence(model.levels[1].shared_experts)
        before = model.decomposed(feats)[0].numpy()
        _silence(model.levels[0].task_experts[1])
        return np.abs(model.decomposed(feats)[0].numpy() - before).max()

    assert y1_change(1) == 0.0
    assert y1_change(2) > 1e-4
    assert y1_change(2, cut_shared_route=True) == 0.0


def test_loss_is_esm2_eq11_weighted_sum():
    def bce(y, p):
        y = np.asarray(y, np.float64).reshape(-1)
        p = np.clip(np.asarray(p, np.float64).reshape(-1), 1e-7, 1 - 1e-7)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    feats, labels = _batch()
    for kind in ("mmoe", "ple2"):
        model = _model(kind, w_ctr=1.0, w_ctavr=0.5, w_ctcvr=2.0)
        out = {k: v.numpy() for k, v in model(feats, training=False).items()}
        expected = (1.0 * bce(labels["click"], out["ctr"]) + 0.5 * bce(labels["daction"], out["ctavr"])
                    + 2.0 * bce(labels["purchase"], out["ctcvr"]))
        assert float(model.compute_loss(feats, labels)) == pytest.approx(expected, rel=1e-5), kind


@pytest.mark.parametrize("kind", ["mmoe", "ple1", "ple2", "ple3"])
def test_gradients_reach_every_trainable_variable(kind):
    model = _model(kind)
    feats, labels = _batch(256)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(feats, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    expected = len(model.embedding.trainable_variables) + sum(len(t.trainable_variables) for t in model.towers)
    expected += (len(model.mixture.trainable_variables) if kind == "mmoe"
                 else sum(len(lv.trainable_variables) for lv in model.levels))
    assert len(model.trainable_variables) == expected
    for var, grad in zip(model.trainable_variables, grads):
        assert grad is not None, var.name
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, var.name


@pytest.mark.parametrize("kind", ["mmoe", "ple2"])
def test_training_reduces_loss_on_a_planted_signal(kind):
    model = _model(kind)
    feats, labels = _batch(2000, seed=1)
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


@pytest.mark.parametrize("kind", ["mmoe", "ple2"])
def test_config_round_trip_through_json_gives_identical_predictions(kind):
    model = _model(kind)
    feats, _ = _batch()
    config = model.get_config()
    config["config"] = json.loads(json.dumps(config["config"]))   # tuples come back as lists (config.json)
    assert isinstance(config["config"]["expert_units"], list)
    clone = type(model).from_config(config)
    clone(feats)
    clone.set_weights(model.get_weights())
    assert clone.config == model.config
    for k, v in model(feats).items():
        np.testing.assert_array_equal(v.numpy(), clone(feats)[k].numpy())


@pytest.mark.parametrize("kind", ["mmoe", "ple2"])
def test_save_and_reload_gives_identical_predictions(kind, tmp_path):
    model = _model(kind)
    _randomize(model, seed=14)
    feats, _ = _batch()
    expected = {k: v.numpy() for k, v in model(feats).items()}
    path = str(tmp_path / kind)
    model.save(path, save_format="tf")
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is type(model)
    got = reloaded(feats, training=False)
    for k, v in expected.items():
        np.testing.assert_array_equal(v, got[k].numpy())


@pytest.mark.parametrize("cls, kwargs, field", [
    (MMoEConfig, {"num_experts": 0}, "num_experts"),
    (MMoEConfig, {"expert_units": ()}, "expert_units"),
    (MMoEConfig, {"expert_units": (8, 0)}, "expert_units"),
    (MMoEConfig, {"hidden_units": (4.5,)}, "hidden_units"),
    (MMoEConfig, {"dropout": 1.0}, "dropout"),
    (MMoEConfig, {"w_ctavr": -1.0}, "w_ctavr"),
    (MMoEConfig, {"batch_size": 0}, "batch_size"),
    (PLEConfig, {"num_levels": 0}, "num_levels"),
    (PLEConfig, {"experts_per_task": 0}, "experts_per_task"),
    (PLEConfig, {"num_shared_experts": -1}, "num_shared_experts"),
    (PLEConfig, {"learning_rate": 0.0}, "learning_rate"),
    (PLEConfig, {"dense_activation": "relu"}, "dense_activation"),
])
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**kwargs)


def test_registry_entries():
    assert {"mmoe", "ple"} <= set(registry.available())
    assert registry.auto_model(["click", "daction", "purchase"]) == "esm2"
    assert registry.auto_model(["click", "purchase"]) == "esmm"
    assert registry.auto_model(["click"]) == "dnn"
    for name in ("mmoe", "ple"):
        assert tuple(registry.required_labels(name)) == tuple(registry.required_labels("esm2"))
        assert "default" in registry.presets(name)
        cfg = registry.resolve_config(name, "default", {"batch_size": 256, "learning_rate": None})
        assert cfg.batch_size == 256 and cfg.learning_rate == registry.MODELS[name][1]["default"].learning_rate
        model = registry.build(name, CATEGORICAL, DENSE, cfg)
        assert model.name == name
        assert set(model(_batch(4)[0])) == set(OUTPUTS)
    with pytest.raises(ValueError, match="num_levels"):
        registry.resolve_config("mmoe", "default", {"num_levels": 3})
