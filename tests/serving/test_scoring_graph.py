"""ESM2ScoringGraph against the Keras model it replaces: every graph path (one request / many requests,
pre-projected fields on and off, the size cap), OOV ids and padded sequences; the SavedModel it is served in."""
import numpy as np
import pytest
import tensorflow as tf

from serving import graph_check
from serving.scoring_graph import ESM2ScoringGraph, UnsupportedModel, plan_preprojection, verify

CATEGORICAL = {"user_id_id": 50, "device_id": 5, "hour_id": 24, "item_id_id": 300, "item_brand_id": 12,
               "item_price_bucket": 6}
SEQUENCES = {"uf_history_seq": 40}
DENSE = ["item_price_z", "user_orders_90d_z"]
REQUEST = ["user_id_id", "device_id", "hour_id", "uf_history_seq"]
OOV = 2  # the last ids of every categorical field play the OOV buckets
H1 = 16  # first hidden layer width in every tower


@pytest.fixture(scope="module")
def model():
    from models import registry
    from models.keras import keras

    keras.utils.set_random_seed(3)
    config = registry.resolve_config("esm2", "default", {"hidden_units": (H1, 8, 4), "dropout": 0.0})
    m = registry.build("esm2", CATEGORICAL, DENSE, config, sequences=SEQUENCES)
    m(features(8, users=2, seed=0), training=False)
    for tower in m.towers:  # non-zero biases, so a bias applied twice or not at all shows
        for layer in list(tower._dense) + [tower._out]:
            layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape).astype(np.float32))
    return m


def features(n, users, seed, seq_len=7):
    """n rows of ``users`` distinct request tuples (candidates vary per row): OOV ids in every field,
    sequences with padding, one all-padding history."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, size=n)
    out = {}
    for name, card in CATEGORICAL.items():
        if name in REQUEST:
            per_user = rng.integers(0, card, size=users)
            per_user[-1] = card - 1  # an OOV bucket
            ids = per_user[user]
        else:
            ids = rng.integers(0, card, size=n)
            ids[: max(1, n // 4)] = card - 1 - rng.integers(0, OOV, size=max(1, n // 4))  # OOV buckets
        out[name] = tf.constant(ids.reshape(n, 1), tf.int64)
    for name, card in SEQUENCES.items():
        hist = rng.integers(1, card + 1, size=(users, seq_len)) * (rng.random((users, seq_len)) < 0.6)
        hist[0] = 0  # an empty history (all padding)
        hist[-1, : seq_len // 2] = 0  # left padding
        out[name] = tf.constant(hist[user], tf.int64)
    for name in DENSE:
        out[name] = tf.constant(rng.normal(size=(n, 1)).astype(np.float32) * 3)
    return out


def assert_matches(graph, model, feats):
    want = model(dict(feats), training=False)
    got = graph(feats)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-5, atol=2e-6, err_msg=name)


CAPS = {"off": 0, "small": 24 * 4 * H1 * 4, "all": 1 << 30}


@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("n,users", [(1, 1), (9, 1), (40, 1), (40, 3), (40, 40)])
def test_equals_keras_model(model, cap, n, users):
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=CAPS[cap])
    assert_matches(graph, model, features(n, users, seed=n + users))
    fn = tf.function(graph.__call__)  # traced with an unknown U: both tf.cond branches are built
    for n2, u2 in [(n, users), (5, 1), (6, 2)]:
        feats = features(n2, u2, seed=7 * n2 + u2)
        want = model(dict(feats), training=False)
        got = fn(feats)
        for name in want:
            np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("request_fields", [[], ["uf_history_seq"], ["user_id_id"], list(CATEGORICAL) + DENSE])
def test_any_split_of_fields_is_exact(model, request_fields):
    for cap in CAPS.values():
        graph = ESM2ScoringGraph(model, request_fields, preproject_max_bytes=cap)
        assert_matches(graph, model, features(12, 2, seed=5))


def test_preprojection_respects_the_size_cap(model):
    row = 4 * H1 * 4  # bytes of one pre-projected row (four towers side by side, float32)
    assert ESM2ScoringGraph(model, REQUEST).projected_fields == []  # off by default
    every = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=CAPS["all"]).projected_fields
    assert every == sorted(CATEGORICAL)
    # candidate fields first, smallest first: price (6) + brand (12) fit in 18 rows; item_id (300) does not,
    # and the request side's smallest (device, 5) no longer fits either
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=18 * row)
    assert graph.projected_fields == ["item_brand_id", "item_price_bucket"]
    assert_matches(graph, model, features(20, 2, seed=11))
    # one byte short of a field: that field falls back to embedding + matmul, smaller ones still fit
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=(6 + 12 + 5) * row - 1)
    assert graph.projected_fields == ["item_brand_id", "item_price_bucket"]
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=(6 + 12 + 5) * row)
    assert graph.projected_fields == ["device_id", "item_brand_id", "item_price_bucket"]
    assert_matches(graph, model, features(20, 2, seed=12))
    assert plan_preprojection({"a": 10, "b": 1000}, {"c": 2}, 8, 0) == []
    assert plan_preprojection({"a": 10, "b": 1000}, {"c": 2}, 8, 12 * 32) == ["a", "c"]


def test_projected_tables_are_the_product_of_embedding_and_kernel(model):
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=CAPS["all"])
    # candidate side: price bucket comes after brand (categorical order); both precede nothing else
    names = graph._cand.projected  # noqa: SLF001
    offset = sum(CATEGORICAL[n] for n in names[:names.index("item_price_bucket")])
    j = sorted(CATEGORICAL).index("item_price_bucket")
    table = model.embedding._tables["item_price_bucket"].embeddings.numpy()  # noqa: SLF001
    kernel = model.towers[2]._dense[0].kernel.numpy()[j * 16:(j + 1) * 16]  # noqa: SLF001
    got = graph.candidate_projected[2].numpy()[offset:offset + CATEGORICAL["item_price_bucket"]]
    np.testing.assert_allclose(got, table @ kernel, rtol=1e-5, atol=1e-6)


def test_verify_rejects_a_wrong_graph(model, monkeypatch):
    graph = ESM2ScoringGraph(model, REQUEST)
    assert verify(graph, model, features(16, 2, seed=2)) < 1e-5
    monkeypatch.setattr(graph, "b1", tf.Variable(graph.b1.numpy() + 0.1))
    with pytest.raises(UnsupportedModel, match="differs from the Keras model"):
        verify(graph, model, features(16, 2, seed=2))


def test_verify_checks_the_one_request_branch_too(model):
    from serving.scoring_graph import probe_features

    class OneRequestSkewed(ESM2ScoringGraph):
        def _per_request(self, features):
            per_request, idx = super()._per_request(features)
            return tf.cond(tf.shape(per_request)[0] == 1, lambda: per_request + 0.1, lambda: per_request), idx

    probe = probe_features(model)  # several requests per batch: the gather branch
    assert verify(ESM2ScoringGraph(model, REQUEST), model, probe) < 1e-5
    with pytest.raises(UnsupportedModel, match="differs from the Keras model"):
        verify(OneRequestSkewed(model, REQUEST), model, probe)


@pytest.mark.parametrize("cap", ["off", "all"])
def test_saved_model_is_servable_and_exact(model, cap, tmp_path):
    graph = ESM2ScoringGraph(model, REQUEST, preproject_max_bytes=CAPS[cap])
    specs = {n: tf.TensorSpec([None, 1], tf.int64, name=n) for n in CATEGORICAL}
    specs.update({n: tf.TensorSpec([None, None], tf.int64, name=n) for n in SEQUENCES})
    specs.update({n: tf.TensorSpec([None, 1], tf.float32, name=n) for n in DENSE})
    module = tf.Module()
    module.graph = graph
    module.serve = tf.function(lambda feats: graph(feats), input_signature=[specs])
    path = str(tmp_path / "m")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve.get_concrete_function()})
    assert graph_check.find_problems(path) == []
    fn = tf.saved_model.load(path).signatures["serving_default"]
    for n, users in [(1, 1), (30, 1), (30, 4)]:
        feats = features(n, users, seed=n * users)
        want = model(dict(feats), training=False)
        got = fn(**feats)
        for name in want:
            np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5, atol=2e-6)
