"""USSR (and its AutoInt baseline): the equations against independent numpy, serialization, gradients and §3.4
expansion (existing segments bit-identical)."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from models.autoint import AutoInt, AutoIntConfig
from models.keras import keras
from models.layers.autoint import AutoIntEncoder
from models.layers.bipartite import BipartiteInteraction
from models.layers.mixture import categorical_kl, gaussian_kl, reparameterize
from models.ussr import CTR_UNIVERSAL, USSR, USSRConfig
from tests.models.planted import column, rank_auc

CATEGORICAL = {"a_id": 7, "segment_id": 4, "hour_id": 24}
DENSE = ("x_z",)
SEQUENCES = {"h_seq": 5}


def _batch(n=64, seed=0, segments=None):
    rng = np.random.default_rng(seed)
    feats = {k: tf.constant(rng.integers(0, c, (n, 1)), tf.int64) for k, c in CATEGORICAL.items()}
    if segments is not None:
        feats["segment_id"] = tf.constant(rng.choice(segments, (n, 1)), tf.int64)
    feats["x_z"] = tf.constant(rng.normal(size=(n, 1)), tf.float32)
    feats["h_seq"] = tf.constant(rng.integers(0, 6, (n, 3)), tf.int64)
    labels = {"click": tf.constant(rng.random((n, 1)) < 0.3, tf.int64)}
    return feats, labels


def _model(**overrides):
    kw = dict(segment_feature="segment_id", hidden_units=(8,), embedding_dim=4, dropout=0.0, num_clusters=3,
              latent_dim=3, cluster_units=(6,), interaction_units=5, segment_dim=2, attention_units=3)
    kw.update(overrides)
    model = USSR(CATEGORICAL, DENSE, USSRConfig(**kw), SEQUENCES)
    model(_batch()[0])
    return model


# ---- equation-level checks against numpy ------------------------------------------------------------------

def test_gaussian_kl_is_the_closed_form_and_agrees_with_monte_carlo():
    rng = np.random.default_rng(0)
    mu_q, mu_p = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    var_q, var_p = rng.uniform(0.2, 3.0, (5, 4)), rng.uniform(0.2, 3.0, (5, 4))
    got = gaussian_kl(*(tf.constant(a, tf.float64) for a in (mu_q, np.log(var_q), mu_p, np.log(var_p)))).numpy()
    # Textbook form: log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2, summed over dimensions.
    expected = np.sum(np.log(np.sqrt(var_p) / np.sqrt(var_q)) + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5,
                      axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # E_q[log q(z) - log p(z)] by sampling, for the first row.
    z = mu_q[0] + np.sqrt(var_q[0]) * rng.normal(size=(400_000, 4))
    log_n = lambda x, m, v: -0.5 * (np.log(2 * np.pi * v) + (x - m) ** 2 / v)  # noqa: E731
    mc = np.mean(np.sum(log_n(z, mu_q[0], var_q[0]) - log_n(z, mu_p[0], var_p[0]), axis=1))
    assert got[0] == pytest.approx(mc, abs=0.03)
    assert np.all(got >= 0)
    # Identical distributions: zero; broadcasting [B, K, Z] against the priors [K, Z] works.
    same = gaussian_kl(tf.constant(mu_q[None]), tf.constant(np.log(var_q)[None]), tf.constant(mu_q),
                       tf.constant(np.log(var_q)))
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-12)


def test_categorical_kl_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)) * 2
    p = rng.dirichlet(np.ones(4))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.sum(q * np.log(q / p), axis=1)
    got = categorical_kl(tf.constant(logits), tf.constant(np.log(p))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    uniform = categorical_kl(tf.zeros([2, 4], tf.float64), tf.constant(np.log(np.full(4, 0.25)))).numpy()
    np.testing.assert_allclose(uniform, 0.0, atol=1e-12)


def test_reparameterize_samples_only_in_training():
    mu = tf.fill([20_000, 2], 1.5)
    logvar = tf.constant(np.log([[0.25, 4.0]] * 20_000), tf.float32)
    assert reparameterize(mu, logvar, training=False) is mu
    z = reparameterize(mu, logvar, training=True).numpy()
    np.testing.assert_allclose(z.mean(0), [1.5, 1.5], atol=0.05)
    np.testing.assert_allclose(z.std(0), [0.5, 2.0], rtol=0.03)


def _relu_mlp(x, weights):
    """Dense+ReLU layers from (kernel, bias) pairs; a trailing odd-out pair is a linear output."""
    for kernel, bias in weights:
        x = np.maximum(x @ kernel + bias, 0.0)
    return x


def _pairs(weights):
    return list(zip(weights[0::2], weights[1::2]))


def test_bipartite_interaction_is_eqs_4_to_6():
    rng = np.random.default_rng(2)
    B, K, M, Z, Du, H = 3, 4, 5, 3, 2, 6
    z, u = rng.normal(size=(B, K, Z)).astype(np.float32), rng.normal(size=(M, Du)).astype(np.float32)
    layer = BipartiteInteraction(H)
    got = layer.interaction(tf.constant(z), tf.constant(u))
    f_e, f_v = _pairs(layer.edge_encoder.get_weights()), _pairs(layer.vertex_encoder.get_weights())
    f_s, f_d = _pairs(layer.edge_scorer.get_weights()), _pairs(layer.edge_decoder.get_weights())
    zu = np.zeros((B, K, M, Z + Du), np.float32)
    for k in range(K):
        for m in range(M):
            zu[:, k, m] = np.concatenate([z[:, k], np.broadcast_to(u[m], (B, Du))], axis=1)
    h1 = _relu_mlp(zu, f_e)                                                   # Eq. 4
    h2_k, h2_m = _relu_mlp(h1.sum(2), f_v), _relu_mlp(h1.sum(1), f_v)          # Eq. 5
    logits = np.zeros((B, K, M))
    for k in range(K):
        for m in range(M):
            pair = np.concatenate([h2_k[:, k], h2_m[:, m]], axis=1)
            hidden = _relu_mlp(pair, f_s[:-1])
            logits[:, k, m] = (hidden @ f_s[-1][0] + f_s[-1][1])[:, 0]
    e = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)            # softmax over clusters k
    h_hat = np.einsum("bkm,bkmh->bmh", e, _relu_mlp(zu, f_d))                  # Eq. 6
    np.testing.assert_allclose(got["h1"].numpy(), h1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["h2_k"].numpy(), h2_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["h2_m"].numpy(), h2_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["e"].numpy(), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["h_hat"].numpy(), h_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["e"].numpy().sum(axis=1), 1.0, rtol=1e-6)


def test_autoint_layer_is_multi_head_self_attention_with_residual():
    rng = np.random.default_rng(3)
    B, F, D, heads, d = 2, 5, 4, 2, 3
    x = rng.normal(size=(B, F, D)).astype(np.float32)
    layer = AutoIntEncoder(num_layers=1, num_heads=heads, head_units=d)
    got = layer(tf.constant(x)).numpy()
    wq, wk, wv, wr = (w.get_weights()[0] for w in (layer._q[0], layer._k[0], layer._v[0], layer._res[0]))
    out = np.zeros((B, F, heads * d))
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        q, k, v = x @ wq[:, cols], x @ wk[:, cols], x @ wv[:, cols]
        scores = np.einsum("bmd,bkd->bmk", q, k)
        alpha = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
        out[:, :, cols] = np.einsum("bmk,bkd->bmd", alpha, v)
    expected = np.maximum(out + x @ wr, 0.0).reshape(B, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _bce(y, logits):
    y = np.asarray(y, np.float64)
    return np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))


def _np_mlp(mlp, x):
    """Numpy forward of a models.layers.MLP from its weights: ReLU hidden layers, then a linear logit if any."""
    pairs = _pairs([np.asarray(w, np.float64) for w in mlp.get_weights()])
    for i, (kernel, bias) in enumerate(pairs):
        x = x @ kernel + bias
        if i < len(mlp.hidden_units):
            x = np.maximum(x, 0.0)
    return x


def _np_bottleneck(model, h, y):
    """Eq. 3's pieces recomputed in numpy from the layer weights, noise-free (z_k = mu_k), on the encoder output
    h [B, N] (the AutoInt encoder is checked on its own above) and labels y [B]:
    q_logits / q [B, K] (MLP_c, W_c), mu / logvar [B, K, Z] (the K linear heads, columns k*2Z.. of one kernel;
    then the added clusters), universal_logits [B, K] (p(y|z_k) on mu_k), loglik [B, K] = log p(y|z_k),
    kl_z [B, K] = KL(N(mu_k, var_k) || N(mu_z(k), var_z(k))) (textbook form), kl_c [B] = KL(q || uniform)."""
    h = np.asarray(h, np.float64)
    hidden = _np_mlp(model.cluster_mlp, h)
    layers = [model.cluster_logits] + list(model.added_cluster_logits)
    q_logits = np.hstack([hidden @ k + b for k, b in ([np.asarray(w, np.float64) for w in d.get_weights()]
                                                       for d in layers)])
    mus, logvars = [], []
    for head in [model.heads] + list(model.added_heads):
        kernel, bias = (np.asarray(w, np.float64) for w in head.dense.get_weights())
        out = (h @ kernel + bias).reshape(len(h), head.num_clusters, 2, head.latent_dim)
        mus.append(out[:, :, 0])
        logvars.append(np.clip(out[:, :, 1], -10.0, 10.0))
    mu, logvar = np.concatenate(mus, axis=1), np.concatenate(logvars, axis=1)
    priors = [model.prior] + list(model.added_priors)
    mu_p = np.vstack([np.asarray(p.mu.numpy(), np.float64) for p in priors])
    var_p = np.exp(np.vstack([np.asarray(p.logvar.numpy(), np.float64) for p in priors]))
    K, (B, _, Z) = mu.shape[1], mu.shape
    universal = _np_mlp(model.universal_decoder, mu.reshape(B * K, Z)).reshape(B, K)
    q = np.exp(q_logits - q_logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    var_q = np.exp(logvar)
    kl_z = np.sum(np.log(np.sqrt(var_p) / np.sqrt(var_q)) + (var_q + (mu - mu_p) ** 2) / (2 * var_p) - 0.5, axis=-1)
    return {"q_logits": q_logits, "q": q, "mu": mu, "logvar": logvar, "universal_logits": universal,
            "loglik": -_bce(np.asarray(y, np.float64).reshape(-1, 1), universal), "kl_z": kl_z,
            "kl_c": np.sum(q * np.log(q * K), axis=1)}


def test_loss_is_segment_log_loss_minus_eq3_elbo():
    model = _model(beta=1.0, w_ib=1.0)
    feats, labels = _batch(seed=4)
    out = {k: v.numpy() for k, v in model.forward(feats, training=False).items()}
    y = labels["click"].numpy().reshape(-1).astype(np.float64)
    t = _np_bottleneck(model, out["h"], y)
    for name in ("q_logits", "mu", "logvar", "universal_logits"):
        np.testing.assert_allclose(out[name], t[name], rtol=1e-4, atol=1e-5, err_msg=name)
    elbo = np.sum(t["q"] * (t["loglik"] - t["kl_z"]), axis=1) - t["kl_c"]          # Eq. 3
    # The segment-specific prediction: the decoder of each row's own segment.
    seg = feats["segment_id"].numpy().reshape(-1)
    logit = out["segment_logits"][np.arange(len(seg)), seg]
    np.testing.assert_array_equal(out["logit"].reshape(-1), logit)
    p = np.clip(1 / (1 + np.exp(-logit.astype(np.float64))), 1e-7, 1 - 1e-7)
    ce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    got = float(model.compute_loss(feats, labels, training=False))
    assert got == pytest.approx(ce - elbo.mean(), rel=1e-4)
    # The serving outputs: ctr = sigmoid(own segment's logit), ctr_universal = sum_k q_k p(y | mu_k).
    served = model(feats, training=False)
    np.testing.assert_allclose(served["ctr"].numpy().reshape(-1), 1 / (1 + np.exp(-logit)), rtol=1e-5)
    np.testing.assert_allclose(served[CTR_UNIVERSAL].numpy().reshape(-1),
                               np.sum(t["q"] / (1 + np.exp(-t["universal_logits"])), axis=1), rtol=1e-4)


def test_beta_scales_both_kl_terms():
    """w_ib * -(sum_k q_k (log p(y|z_k) - beta KL_z,k) - beta KL_c) against numpy from the layer weights, for two
    betas (a KL term left unscaled, or scaled twice, changes the loss by more than the tolerance)."""
    for beta in (0.25, 3.0):
        model = _model(beta=beta, w_ib=2.0, w_ctr=0.0)
        kernel, _ = model.cluster_logits.get_weights()
        model.cluster_logits.set_weights([kernel, np.array([1.0, -1.0, 0.5], np.float32)])  # q(c|x) off uniform
        feats, labels = _batch(seed=5)
        y = labels["click"].numpy().reshape(-1)
        t = _np_bottleneck(model, model.encode(feats).numpy(), y)
        assert t["kl_c"].mean() > 0.05 and t["kl_z"].mean() > 0.05  # both terms are in play
        elbo = np.sum(t["q"] * (t["loglik"] - beta * t["kl_z"]), 1) - beta * t["kl_c"]
        assert float(model.compute_loss(feats, labels, training=False)) == pytest.approx(2.0 * -elbo.mean(),
                                                                                         rel=1e-5)
        # §3.4's buffer score: -L_ib per example with the config's beta.
        np.testing.assert_allclose(model.bottleneck_loss_per_example(feats, labels).numpy(), -elbo, rtol=1e-4,
                                   atol=1e-5)


def test_serving_is_noise_free_and_training_samples():
    model = _model()
    feats, _ = _batch()
    a, b = model(feats, training=False), model(feats, training=False)
    np.testing.assert_array_equal(a["ctr"].numpy(), b["ctr"].numpy())
    out = model.forward(feats, training=True)
    assert not np.allclose(out["z"].numpy(), out["mu"].numpy())
    np.testing.assert_array_equal(model.forward(feats, training=False)["z"].numpy(),
                                  model.forward(feats, training=False)["mu"].numpy())


@pytest.mark.parametrize("shared_decoder", [False, True])
def test_gradients_reach_every_trainable_variable(shared_decoder):
    model = _model(shared_decoder=shared_decoder)
    feats, labels = _batch(256, seed=6)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(feats, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(model.trainable_variables) > 30
    for var, grad in zip(model.trainable_variables, grads):
        assert grad is not None, var.name
        assert float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, var.name


def test_autoint_baseline_gradients_and_output():
    model = AutoInt(CATEGORICAL, DENSE, AutoIntConfig(hidden_units=(8,), embedding_dim=4, attention_units=3),
                    SEQUENCES)
    feats, labels = _batch(128)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(feats, labels, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert set(model(feats)) == {"ctr"}
    for var, grad in zip(model.trainable_variables, grads):
        assert grad is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(grad)))) > 0, var.name


def test_wide_autoint_matches_ussrs_capacity_at_the_builtin_width():
    """``autoint:wide`` is the capacity control for USSR's gain: within 10% of USSR's parameters outside the
    embeddings, where the default AutoInt has about a third of them (20 + 40 fields, 5 segments)."""
    from models import registry
    from tests.models import capacity

    categorical = dict(capacity.CATEGORICAL, f0=5)

    def tower_params(model, preset):
        config = registry.resolve_config(model, preset)
        if model == "ussr":
            config = dataclasses.replace(config, segment_feature="f0")
        return capacity.tower_params(registry.build(model, categorical, capacity.DENSE, config),
                                     capacity.features())

    ussr, default, wide = tower_params("ussr", "default"), tower_params("autoint", "default"), \
        tower_params("autoint", "wide")
    assert 0.9 < wide / ussr < 1.1 and default < ussr / 3 + 1000, (ussr, default, wide)


# ---- serialization ------------------------------------------------------------------------------------------

def test_config_round_trip_rebuilds_the_same_model():
    model = _model()
    clone = USSR.from_config(model.get_config())
    assert clone.config == model.config
    feats, _ = _batch()
    clone(feats)
    clone.set_weights(model.get_weights())
    for name in ("ctr", CTR_UNIVERSAL):
        np.testing.assert_array_equal(clone(feats)[name].numpy(), model(feats)[name].numpy())
    expanded = model.expand([("vip", 2)], add_cluster_from=0)
    again = USSR.from_config(expanded.get_config())
    assert again.config.added_segments == ("vip",) and again.config.added_clusters == 1
    with pytest.raises(ValueError, match="segment_feature"):
        USSR(CATEGORICAL, DENSE, USSRConfig())
    with pytest.raises(ValueError, match="added_segment_ids"):
        USSRConfig(segment_feature="segment_id", added_segments=("a",), added_segment_ids=())


def test_savedmodel_reload_gives_identical_predictions(tmp_path):
    model = _model()
    feats, labels = _batch()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(32), epochs=1, verbose=0)
    path = str(tmp_path / "ussr")
    model.save(path, save_format="tf")
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, USSR)
    for name in ("ctr", CTR_UNIVERSAL):
        np.testing.assert_array_equal(loaded(feats, training=False)[name].numpy(),
                                      model(feats, training=False)[name].numpy())
    restored = tf.saved_model.load(path)  # the plain TF view of the same SavedModel
    np.testing.assert_allclose(restored(feats, training=False)["ctr"].numpy(), model(feats)["ctr"].numpy(),
                               rtol=1e-6)


def test_bind_to_contract_takes_the_schema_segment():
    from transforms.features import BUILTIN

    inputs = ("segment_id", "user_id_id")
    bound = USSR.bind_to_contract(USSRConfig(), BUILTIN, inputs)
    assert bound.segment_feature == "segment_id"
    import dataclasses
    with pytest.raises(ValueError, match="segment"):
        USSR.bind_to_contract(USSRConfig(), dataclasses.replace(BUILTIN, segment=None), inputs)


# ---- §3.4 expansion ---------------------------------------------------------------------------------------------

def _frozen(model):
    return [w for layer in model.layers if not layer.trainable for w in layer.weights]


def _fit(model, feats, labels, epochs=3, lr=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr))
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(64), epochs=epochs, verbose=0)


def test_added_segment_trains_only_new_parameters_and_old_segments_stay_bit_identical():
    model = _model()
    old_feats, _ = _batch(512, seed=7, segments=[0, 1, 2])                   # id 3: unseen so far
    _fit(model, old_feats, {"click": tf.cast(old_feats["a_id"] < 3, tf.int64)}, epochs=5)
    expanded = model.expand([("vip", 3)])
    assert {v.name for v in expanded.trainable_variables} == {
        v.name for layer in (expanded.added_segment_embeddings[0], expanded.decoders[4])
        for v in layer.trainable_variables}
    frozen_before = [v.numpy().copy() for v in _frozen(expanded)]
    assert len(frozen_before) > 30
    new_feats, _ = _batch(256, seed=8, segments=[3])
    x = new_feats["a_id"].numpy().reshape(-1)
    new_labels = {"click": tf.constant((x >= 3).reshape(-1, 1), tf.int64)}  # the opposite relation
    from pipeline.evaluation.metrics import log_loss
    loss_before = log_loss(x >= 3, expanded(new_feats, training=False)["ctr"].numpy().reshape(-1))
    _fit(expanded, new_feats, new_labels, epochs=5)
    for v, before in zip(_frozen(expanded), frozen_before):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.name)
    test_feats, _ = _batch(300, seed=9)
    seg = test_feats["segment_id"].numpy().reshape(-1)
    old = model(test_feats, training=False)
    new = expanded(test_feats, training=False)
    keep = seg != 3
    assert keep.sum() > 150 and (~keep).sum() > 30
    for name in ("ctr", CTR_UNIVERSAL):
        np.testing.assert_array_equal(new[name].numpy()[keep], old[name].numpy()[keep])
    # The taken-over id now goes through the new segment's decoder, which learned its segment.
    assert not np.allclose(new["ctr"].numpy()[~keep], old["ctr"].numpy()[~keep])
    loss_after = log_loss(x >= 3, expanded(new_feats, training=False)["ctr"].numpy().reshape(-1))
    assert loss_after < 0.6 * loss_before
    with pytest.raises(ValueError, match="added before"):
        expanded.expand([("vip", 2)])


def test_added_cluster_starts_from_eq8_argmax_cluster_and_trains_with_eq7():
    model = _model()
    feats, labels = _batch(256, seed=10)
    usage = model.cluster_usage([(feats, labels)])
    np.testing.assert_allclose(usage.sum(), 256, rtol=1e-5)               # q(c|x) sums to 1 per row
    l_star = int(np.argmax(usage))
    expanded = model.expand(add_cluster_from=l_star)
    assert expanded.num_clusters == 4 and expanded.objective == "new_cluster"
    out = expanded.forward(feats, training=False)
    # (a one-column matmul may round differently from a wide one: equal up to float32 rounding)
    np.testing.assert_allclose(out["mu"][:, -1].numpy(), out["mu"][:, l_star].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["q_logits"][:, -1].numpy(), out["q_logits"][:, l_star].numpy(), rtol=1e-5,
                               atol=1e-7)
    mu_p, _ = expanded.priors()
    np.testing.assert_array_equal(mu_p[-1].numpy(), mu_p[l_star].numpy())
    # Eq. 7 per example for the new cluster K+1, recomputed in numpy from the layer weights (beta = 2 so that a
    # KL term left unweighted shows): log q(c=K+1|x) + log p(y|z_{K+1}) - beta KL(q(z|x,c=K+1) || p(z|c=K+1)).
    t = _np_bottleneck(expanded, out["h"].numpy(), labels["click"].numpy())
    log_q = t["q_logits"] - np.log(np.exp(t["q_logits"]).sum(1, keepdims=True))
    expected = log_q[:, -1] + t["loglik"][:, -1] - 2.0 * t["kl_z"][:, -1]
    np.testing.assert_allclose(expanded.expansion_objective(out, labels, 2.0).numpy(), expected, rtol=1e-4,
                               atol=1e-5)
    assert float(expanded.compute_loss(feats, labels)) == pytest.approx(
        -np.mean(log_q[:, -1] + t["loglik"][:, -1] - expanded.config.beta * t["kl_z"][:, -1]), rel=1e-4)
    trainable = {v.name for v in expanded.trainable_variables}
    assert len(trainable) == 6  # the new logit unit, head and prior
    frozen = [v.numpy().copy() for v in _frozen(expanded)]
    assert len(frozen) > 30
    _fit(expanded, feats, labels, epochs=2)
    for v, before in zip(_frozen(expanded), frozen):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.name)
    assert not np.array_equal(expanded.added_priors[0].mu.numpy(), mu_p[-1:].numpy())


def test_shared_decoder_expansion_trains_only_the_new_segment_embedding():
    model = _model(shared_decoder=True)
    expanded = model.expand([("vip", 3)])
    assert len(expanded.decoders) == 1
    assert [v.name for v in expanded.trainable_variables] == [
        v.name for v in expanded.added_segment_embeddings[0].trainable_variables]
    feats, _ = _batch(200, seed=11)
    keep = feats["segment_id"].numpy().reshape(-1) != 3
    np.testing.assert_array_equal(expanded(feats)["ctr"].numpy()[keep], model(feats)["ctr"].numpy()[keep])


# ---- planted truth (light): a small segment with the opposite taste --------------------------------------------
# USSR's premise (§1, §3.3): segments of very unequal size share a universal representation learned from all data
# but read it differently. Here the 5% segment reverses the majority's taste; USSR reads the shared representation
# through its own segment decoder, where a plain AutoInt has to learn the reversal as an interaction of the
# segment field with every item effect, from that segment's ~200 rows.

PLANTED_CATEGORICAL = {"segment_id": 4, "item_id": 20}
PLANTED_DENSE = ("x1", "x2")
PLANTED_SIZES = (0.6, 0.25, 0.1, 0.05)
PLANTED_BASE = dict(hidden_units=(16,), embedding_dim=8, dropout=0.0, attention_layers=1, attention_heads=2,
                    attention_units=8)
PLANTED_USSR = dict(num_clusters=3, latent_dim=8, cluster_units=(16,), interaction_units=16, segment_dim=8)


def _planted(n, seed):
    """Segments of 60/25/10/5% over 20 items and two user features x1, x2. One universal score
    f = 2 q_i + 2.5 a_i x1 + 2.5 b_i x2 (item i's appeal q_i and its item-specific slopes a_i, b_i, fixed across
    draws); segments 0-2 click with logit -0.5 + f, segment 3 (5%) with -0.5 - f: the opposite taste on every
    item effect. Returns features ([N, 1] each), labels and each row's segment."""
    rng = np.random.default_rng(seed)
    seg = rng.choice(4, n, p=PLANTED_SIZES)
    item = rng.integers(0, 20, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    q, a, b = (np.random.default_rng(s).normal(0, 1, 20) for s in (123, 456, 789))
    sign = np.where(seg == 3, -1.0, 1.0)
    logit = -0.5 + sign * (2.0 * q[item] + 2.5 * a[item] * x1 + 2.5 * b[item] * x2)
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    feats = {"segment_id": column(seg, np.int64), "item_id": column(item, np.int64), "x1": column(x1, np.float32),
             "x2": column(x2, np.float32)}
    return feats, {"click": column(click, np.int64)}, seg


def _worst_segment_auc(y, s, seg, min_class=30):
    """Lowest per-segment AUC among segments with >= min_class positives and negatives."""
    aucs = [rank_auc(y[seg == m], s[seg == m]) for m in np.unique(seg)
            if min_class <= y[seg == m].sum() <= (seg == m).sum() - min_class]
    return min(aucs)


def _train_planted(model_name, seed, **overrides):
    """(worst-segment AUC, overall AUC) on a fresh 20,000-row draw after 14 epochs on 4,000 rows (data seed 0)."""
    keras.utils.set_random_seed(seed)
    feats, labels, _ = _planted(4000, 0)
    if model_name == "ussr":
        config = USSRConfig(segment_feature="segment_id", **dict(PLANTED_BASE, **PLANTED_USSR, **overrides))
        model = USSR(PLANTED_CATEGORICAL, PLANTED_DENSE, config)
    else:
        model = AutoInt(PLANTED_CATEGORICAL, PLANTED_DENSE, AutoIntConfig(**dict(PLANTED_BASE, **overrides)))
    model({k: v[:2] for k, v in feats.items()})
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).shuffle(4000, seed=seed).batch(100), epochs=14,
              verbose=0)
    test_feats, test_labels, seg = _planted(20_000, 100)
    y, s = test_labels["click"].numpy().reshape(-1), model(test_feats, training=False)["ctr"].numpy().reshape(-1)
    return _worst_segment_auc(y, s, seg), rank_auc(y, s)


def test_planted_ussr_beats_autoint_on_the_worst_segment():
    # Worst-segment AUC (segment 3 in every run; oracle 0.949), training seeds 0-9 (measured
    # when the test was written):
    #   data seed 0  ussr    .913 .877 .914 .907 .881 .896 .916 .886 .907 .916
    #                autoint .828 .840 .862 .766 .675 .755 .878 .847 .662 .890
    #   data seed 1  ussr    .904 .917 .921 .876 .911 .897 .920 .890 .906 .893
    #                autoint .743 .820 .821 .658 .732 .852 .497 .766 .692 .823
    # Over data seeds 0-2 (30 runs): ussr 0.903 +- 0.013, autoint 0.749 +- 0.127 (it learns the reversal in some
    # seeds only); per-seed gain +0.000 .. +0.45, none negative; the smallest mean over a seed pair is +0.039.
    # Overall AUC is level (0.929 against 0.926). Not asserted: AutoInt with a (112,) decoder (USSR's ~8k
    # parameters outside the embeddings) reaches 0.881 +- 0.024; USSR is ahead in 24 of 30 seeds, +0.022 on
    # average, -0.018 at worst. With segment ids scrambled in training USSR scores 0.08 on segment 3.
    ussr = [_train_planted("ussr", seed)[0] for seed in (0, 1)]
    autoint = [_train_planted("autoint", seed)[0] for seed in (0, 1)]
    assert np.mean(ussr) > np.mean(autoint) + 0.02, (ussr, autoint)
