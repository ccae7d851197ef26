"""STAN model: Eq. 13 loss assembly, Beta state updated only by training, serving path free of it."""
import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

from models.keras import keras
from models.ple import PLE, PLEConfig
from models.stan import STAN, STANConfig
from tests.models.planted import column, rank_auc, running_means

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
    labels["uf_count_raw"] = column(_positions(feats["user_id_id"].numpy()), np.float32)  # rows in time order
    return feats, labels


def _positions(users):
    """Each row's number of earlier rows of its user (rows in time order): the pipeline's ``uf_count_raw``."""
    seen, out = {}, []
    for u in np.asarray(users).reshape(-1):
        out.append(seen.get(u, 0))
        seen[u] = out[-1] + 1
    return np.array(out)


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
    assert float(tf.reduce_sum(m.stage.count)) == 256  # each event applied once, not once per epoch
    expected = {k: v.numpy() for k, v in m(feats, training=False).items()}
    path = str(tmp_path / "stan")
    m.save(path, save_format="tf")
    reloaded = keras.models.load_model(path)
    for k, v in expected.items():
        np.testing.assert_array_equal(v, reloaded(feats, training=False)[k].numpy())
    np.testing.assert_array_equal(reloaded.stage.alpha.numpy(), m.stage.alpha.numpy())


def _record_updates(model):
    """Wraps ``model.stage.update`` so that every call, also inside a compiled train function, records its
    (users, y~, positions) in the returned list (numpy, in call order)."""
    calls, update = [], model.stage.update

    def record(users, y_tilde, positions):
        calls.append((users.numpy().reshape(-1), y_tilde.numpy(), positions.numpy().reshape(-1)))

    def spy(users, y_tilde, positions):
        tf.py_function(record, [users, y_tilde, positions], [])
        update(users, y_tilde, positions)

    model.stage.update = spy
    return calls


def _one_pass_of_algorithm_1(calls, num_users=6, num_tasks=3):
    """Literal Algorithm 1 over each user's events in time order (position order), each event with the y~ it had
    when it first arrived in ``calls``: for i = 1..n: c_u += 1; alpha += y~_i c_u; beta += (1 - y~_i) c_u."""
    first = {}
    for users, y_tilde, positions in calls:
        for u, y, p in zip(users, y_tilde, positions):
            first.setdefault((int(u), int(p)), y.astype(np.float64))
    alpha, beta = np.ones((num_users, num_tasks)), np.ones((num_users, num_tasks))
    for u in range(num_users):
        c = 0
        for p in sorted(p for (v, p) in first if v == u):
            c += 1
            alpha[u] += first[u, p] * c
            beta[u] += (1 - first[u, p]) * c
    return alpha, beta


def test_beta_state_after_three_shuffled_epochs_of_fit_is_one_pass_of_algorithm_1():
    """Issue #24: Algorithm 1 is one pass over a user's events, so E epochs must not add each event E times
    (that gives alpha + beta = 2 + E n (E n + 1) / 2 instead of 2 + n (n + 1) / 2). Trained through keras fit in
    graph mode with steps_per_execution = 3, rows reshuffled every epoch (pipeline.training.train's default), real updates
    (y~ changes between epochs, so the state of the first pass differs from any later one)."""
    m = _model()
    calls = _record_updates(m)
    feats, labels = _batch(256, seed=1)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=3)
    ds = tf.data.Dataset.from_tensor_slices((feats, labels)).shuffle(256, seed=2, reshuffle_each_iteration=True)
    m.fit(ds.batch(32), epochs=3, verbose=0)
    assert sum(len(u) for u, _, _ in calls) == 3 * 256  # every row arrived once per epoch
    alpha, beta = _one_pass_of_algorithm_1(calls)
    np.testing.assert_allclose(m.stage.alpha.numpy(), alpha, rtol=1e-5)
    np.testing.assert_allclose(m.stage.beta.numpy(), beta, rtol=1e-5)
    n = np.bincount(feats["user_id_id"].numpy().reshape(-1), minlength=6)
    np.testing.assert_allclose(m.stage.alpha.numpy() + m.stage.beta.numpy(),
                               np.repeat((2 + n * (n + 1) / 2)[:, None], 3, axis=1), rtol=1e-5)
    last = np.concatenate([y for _, y, _ in calls[-8:]])  # y~ of the last epoch's 8 steps moved away
    assert np.abs(last - np.concatenate([y for _, y, _ in calls[:8]])).max() > 1e-3


def test_fit_resumed_from_a_mid_epoch_checkpoint_applies_each_event_once(tmp_path):
    """pipeline.training.train resumes mid-epoch: the backup restores the state, the stream skips the steps it covers. Here
    a run stops after 5 of the first epoch's 8 steps (shuffled), a fresh model restores its checkpoint and runs
    the remaining 19 steps of 3 epochs: the state is one pass of Algorithm 1 over every event."""
    feats, labels = _batch(256, seed=1)
    rng = np.random.default_rng(4)
    order = np.concatenate([rng.permutation(256) for _ in range(3)]).reshape(24, 32)  # 3 epochs of 8 steps
    stream = tf.data.Dataset.from_tensor_slices(order).map(
        lambda i: ({k: tf.gather(v, i) for k, v in feats.items()}, {k: tf.gather(v, i) for k, v in labels.items()}))
    first = _model()
    calls = _record_updates(first)
    first.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=3)
    first.fit(stream.take(5), epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ck"))
    resumed = _model()
    later_calls = _record_updates(resumed)
    resumed.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=3)
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path).assert_consumed()
    np.testing.assert_array_equal(resumed.stage.alpha.numpy(), first.stage.alpha.numpy())
    resumed.fit(stream.skip(5), epochs=1, verbose=0)
    calls += later_calls
    assert sum(len(u) for u, _, _ in calls) == 3 * 256
    alpha, beta = _one_pass_of_algorithm_1(calls)
    np.testing.assert_allclose(resumed.stage.alpha.numpy(), alpha, rtol=1e-5)
    np.testing.assert_allclose(resumed.stage.beta.numpy(), beta, rtol=1e-5)
    np.testing.assert_array_equal(resumed.stage.count.numpy(), np.bincount(feats["user_id_id"].numpy().ravel()))


def test_training_without_event_positions_is_refused_with_the_column_named():
    m = _model()
    feats, labels = _batch()
    del labels["uf_count_raw"]
    with pytest.raises(ValueError, match="uf_count_raw"):
        m.compute_loss(feats, labels, training=True)
    m.compute_loss(feats, labels, training=False)  # evaluation reads the state only


def test_beta_path_training_loss_is_eq13_with_the_gamma_drawn():
    """Eq. 13 with the Beta state (training): L = sum_k (mean_i gamma_i^k BCE_i^k + mean_i (l_i^k - y~_i^k)^2),
    recomputed in numpy from the model's predictions, y~, the labels and the gamma drawn in the call (recorded by
    wrapping ``stage.sample``). Fails if gamma weighted L_s, if a task's pseudo-label were compared with another
    task's y~, or if gamma were y~ (the w/o-Beta form)."""
    m = _model()
    feats, labels = _batch()
    preds = {k: v.numpy() for k, v in m(feats, training=False).items()}  # dropout 0: training=True is the same
    yt = m.user_preferences(feats).numpy().astype(np.float64)
    drawn, sample = [], m.stage.sample
    m.stage.sample = lambda users, seed=None: drawn.append(sample(users, seed)) or drawn[-1]
    loss = float(m.compute_loss(feats, labels, training=True))
    assert len(drawn) == 1
    gamma = drawn[0].numpy().astype(np.float64)
    assert gamma.shape == (32, 3) and np.abs(gamma - yt).min() > 1e-4
    expected = 0.0
    for k, (out, lab) in enumerate((("ctr", "click"), ("ctavr", "daction"), ("ctcvr", "purchase"))):
        expected += np.mean(gamma[:, k] * _bce(labels[lab], preds[out]))                     # gamma^k L_t^k
        expected += np.mean((labels[f"pl_{lab}"].numpy().reshape(-1).astype(np.float64) - yt[:, k]) ** 2)  # L_s^k
    assert loss == pytest.approx(expected, rel=1e-5)


def test_preference_head_leaves_out_its_own_targets_on_the_builtin_schema():
    """Issue #24: U (Eq. 7) must not hold uf_rate_<label>_bucket, the quantised Eq. 10 pseudo-labels the
    preference head predicts (Eq. 11), or L_s reduces to copying an input; the main towers keep them."""
    from transforms.features import HOUR_ID
    from transforms.schema import builtin_schema_path, load_schema

    contract = load_schema(builtin_schema_path("builtin")).contract
    inputs = contract.model_feature_names()
    targets = ("uf_rate_click_bucket", "uf_rate_daction_bucket", "uf_rate_purchase_bucket")
    assert set(targets) <= set(contract.embedded_fields(contract.user_columns)) & set(inputs)  # were candidates
    cfg = STAN.bind_to_contract(STANConfig(), contract, inputs)
    # builtin.yaml: user_columns [user_id, user_gender, user_age, user_city, user_power, user_orders_90d, segment]
    # plus the derived user features uf_count, uf_rate_*, uf_repeat_ratio, uf_history, minus the three targets
    assert cfg.user_fields == ("user_id_id", "user_gender_id", "user_age_id", "user_city_id", "user_power_id",
                               "segment_id", "user_orders_90d_bucket", "uf_count_bucket", "uf_repeat_ratio_bucket",
                               "uf_history_seq")
    categorical = {k: (v if k in contract.model_categorical else 5) for k, v in
                   {**contract.model_categorical, **{f"{f.name}_id": 0 for f in contract.vocab_features}}.items()}
    model = STAN(categorical, contract.model_dense, cfg, sequences={"uf_history_seq": 20})
    assert set(targets) <= set(model.embedding.categorical)  # the towers' embedding keeps them
    fields = list(model.embedding.categorical) + list(model.embedding.sequences)
    assert sorted(fields[i] for i in model._user_pos) == sorted(cfg.user_fields)
    assert HOUR_ID in model.embedding.categorical and HOUR_ID not in cfg.user_fields


# STAN §4.1.3 "Hyper-Parameter", verbatim from ../shared/papers/stan-stage-adaptive-multitask.txt (the paragraph
# runs over a page break after "128 to", so the embedding sentence is quoted up to there).
STAN_PAPER = "stan-stage-adaptive-multitask.txt"
BOUND = ("To ensure a level playing field, we constrain the maximum model size for all methods by setting the same "
         "upper bound for the number of hidden units per layer at 1024.")
EMBEDDING = "For computational efficiency, we assign an embedding dimension of 128 to"
RELU = "We employ ReLU [5] as the activation function for all models."
BATCH = "During training, we set the batch size to 2048."
ADAM = ("The Adam optimizer [8] is used with settings $\\beta_1 = 0.9$, $\\beta_2 = 0.999$, and "
        "$\\epsilon = 1 \\times 10^{-6}$.")
LR = "We set the learning rate at 0.001."


@pytest.mark.parametrize("sentence", [BOUND, EMBEDDING, RELU, BATCH, ADAM, LR])
def test_the_quoted_stan_sentences_are_in_the_paper(sentence):
    import os

    from transforms.schema import default_shared_dir

    path = os.path.join(default_shared_dir(), "papers", STAN_PAPER)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as fh:
        assert sentence in " ".join(fh.read().split())


@pytest.mark.parametrize("model_name", ["stan", "stan_nobeta"])
def test_paper_preset_is_stans_own_setting(model_name):
    from models import registry

    cfg = registry.resolve_config(model_name, "paper")
    assert cfg.batch_size == 2048              # BATCH
    assert cfg.learning_rate == 0.001          # LR
    assert cfg.adam_epsilon == 1e-6            # ADAM: epsilon = 1 x 10^-6
    adam = keras.optimizers.Adam(cfg.learning_rate, epsilon=cfg.adam_epsilon)  # as pipeline.training.train builds it
    assert (adam.beta_1, adam.beta_2, adam.epsilon) == (0.9, 0.999, 1e-6)      # ADAM: beta_1, beta_2 left default
    assert cfg.embedding_dim == 128            # EMBEDDING
    assert max(cfg.hidden_units + cfg.expert_units) <= 1024  # BOUND
    model = registry.build(model_name, CATEGORICAL, DENSE, dataclasses.replace(cfg, user_fields=("user_id_id",)))
    model(_batch()[0])
    hidden = [l for l in model.submodules if isinstance(l, keras.layers.Dense) and l.name.startswith("dense_")]
    assert len(hidden) == 2 * 6 + 2 * 4  # 6 experts per level (4 towers x 1 + 2 shared), 4 towers of 2 layers
    assert all(l.activation is keras.activations.relu for l in hidden)  # RELU (experts and towers)


def test_bad_user_fields_are_named():
    with pytest.raises(ValueError, match="nope_id"):
        STAN(CATEGORICAL, DENSE, STANConfig(user_fields=("nope_id",)))


# ---- planted truth (light): the Beta stage state keeps the loss weight of users without history ------------------
# STAN's ablation ("STAN w/o Beta", paper Tables 2-3, Sec. 4.3): with gamma = y~ each task loss of a row is
# weighted by the user's predicted preference, which Eq. 11 fits to the running label mean over earlier events, 0 for
# a user without any. Rows of new users thus get ~0 weight on the rare purchase task and the model learns purchases
# from mature users only. The Beta state of Algorithm 1 starts at Beta(1, 1) and concentrates only as the user's
# count grows, so a new user's rows keep a weight of the order of the mature users'. Planted here: new users buy by a
# category taste of their own, uncorrelated with the mature users' one.
_PL_CATS, _PL_LIGHT, _PL_HEAVY = 20, 8000, 60


def _planted_stages(seed, stages=True):
    """Time-ordered log of 8,000 one-impression users and 60 heavy users (Poisson(160) impressions each), ~17.7k
    rows. Click ~ sigmoid(-0.5 + 0.3 x), DAction = click & 30%; purchase | click ~ sigmoid(-1.5 + n[cat]) on a
    user's first 5 impressions ("new" rows: every light user's row), sigmoid(-2 + m[cat]) later, with n and m
    centred, uncorrelated category effects of equal norm (N(0, 2.5^2) draws, fixed across draws); ~1,800
    purchases, ~950 of them on new rows. ``stages=False`` is the control: new rows buy as mature ones do.
    Returns features, labels (with the leakage-safe ``pl_*`` running means) and the new-row mask."""
    world = np.random.default_rng(123)
    mature_taste, new_taste = (t - t.mean() for t in world.normal(0, 2.5, (2, _PL_CATS)))
    new_taste -= (new_taste @ mature_taste) / (mature_taste @ mature_taste) * mature_taste  # uncorrelated tastes
    new_taste *= np.linalg.norm(mature_taste) / np.linalg.norm(new_taste)
    rng = np.random.default_rng(seed)
    users = _PL_LIGHT + _PL_HEAVY
    user = rng.permutation(np.repeat(np.arange(users), np.r_[np.ones(_PL_LIGHT, int), rng.poisson(160, _PL_HEAVY)]))
    n = len(user)
    n_prev, seen = np.zeros(n, np.int64), np.zeros(users, np.int64)
    for i, u in enumerate(user):
        n_prev[i], seen[u] = seen[u], seen[u] + 1
    new = n_prev < 5
    cat, x = rng.integers(0, _PL_CATS, n), rng.normal(size=n)
    click = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 0.3 * x)))
    new_logit = -1.5 + new_taste[cat] if stages else -2.0 + mature_taste[cat]
    cvr = 1 / (1 + np.exp(-np.where(new, new_logit, -2.0 + mature_taste[cat])))
    labels = {"click": click, "daction": click & (rng.random(n) < 0.3), "purchase": click & (rng.random(n) < cvr)}
    labels.update(running_means(user, labels))
    labels["uf_count_raw"] = n_prev
    feats = {"user_id_id": column(user, np.int64), "user_age_id": column(rng.integers(0, 4, users)[user], np.int64),
             "cat_id": column(cat, np.int64), "x_z": column(x, np.float32)}
    labels = {k: column(v, np.float32 if k.startswith("pl_") else np.int64) for k, v in labels.items()}
    return feats, labels, new


@functools.lru_cache(maxsize=None)
def _stage_cvr_aucs(kind, seed, stages=True):
    """(new users', mature users') CVR AUC on the clicked rows of a fresh draw, after 4 epochs in time order on the
    training draw of data seed 0. ``kind``: "stan", "stan_nobeta" or "ple" (STAN's backbone, same widths).
    Cached: the tests below share runs."""
    keras.utils.set_random_seed(seed)
    feats, labels, _ = _planted_stages(100, stages)
    width = dict(hidden_units=(16,), expert_units=(16,), embedding_dim=8, dropout=0.0)
    vocab = {"user_id_id": _PL_LIGHT + _PL_HEAVY, "user_age_id": 4, "cat_id": _PL_CATS}
    if kind == "ple":
        model = PLE(vocab, DENSE, PLEConfig(**width))
    else:
        user_fields = ("user_id_id", "user_age_id")
        model = STAN(vocab, DENSE, STANConfig(**width, use_beta=kind == "stan", user_fields=user_fields))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(100), epochs=4, verbose=0)
    test_feats, test_labels, new = _planted_stages(999, stages)
    clicked = test_labels["click"].numpy().reshape(-1) == 1
    bought = test_labels["purchase"].numpy().reshape(-1)
    cvr = model(test_feats, training=False)["cvr"].numpy().reshape(-1)
    return tuple(rank_auc(bought[clicked & rows], cvr[clicked & rows]) for rows in (new, ~new))


def test_planted_beta_stage_state_beats_without_beta_on_new_users():
    """STAN > STAN w/o Beta on the CVR AUC of new users' clicked impressions (the paper's ablation).

    Measured when written (test draw: 3,156 clicked new-user rows, 927 purchases, oracle AUC 0.866), seeds 0-7:
      data seed 0  beta    .677 .739 .752 .727 .644 .738 .775 .720
                   w/o     .545 .484 .553 .516 .565 .560 .524 .494
      data seed 1  beta    .702 .768 .742 .786 .799 .745 .803 .699
                   w/o     .598 .492 .502 .598 .580 .604 .566 .514
    Gain +0.079 .. +0.276 (mean +0.19, sd 0.05); w/o Beta stays near 0.5: it learns the purchases of the mature
    users, whose taste is uncorrelated with the new users'. The margin 0.08 lies below every single-seed gain.
    Sabotage: gamma = y~ in the Beta path gives a gain of exactly 0; a Beta state concentrated from the first
    event (counts x1000, so gamma ~ the running y~) gives +0.046, +0.069 (mean +0.058) and fails. Not separated:
    a Beta state frozen at Beta(1, 1) (uniform random weights) passes too (+0.158, +0.261), since it also keeps
    new users' weight; what the test pins is that Algorithm 1 does not collapse it to y~ for them.
    The figures above predate issue #24 (the Beta state added every event again in each of the 4 epochs). After
    it (each event once), on the asserted seeds 0, 1 of data seed 0: beta .635 .742, w/o .545 .484 (mean gain
    +0.174).
    """
    beta = [_stage_cvr_aucs("stan", seed)[0] for seed in (0, 1)]
    no_beta = [_stage_cvr_aucs("stan_nobeta", seed)[0] for seed in (0, 1)]
    assert np.mean(beta) > np.mean(no_beta) + 0.08, (beta, no_beta)


def test_planted_stan_beats_its_ple_backbone_on_new_users_only_when_they_have_a_stage_of_their_own():
    """STAN > PLE when users have lifecycle stages (paper Tables 2-3): CVR AUC on new users' clicked rows of the
    planted log above, against its control where new users buy by the mature users' taste (no stages). PLE is
    STAN's backbone at the same widths, so the two differ only by STAN's training-only parts.

    Measured when written, STAN minus PLE on new users, seeds 0-7 (data seed 0; data seed 1 in brackets):
      stages     +.068 +.123 +.198 +.119 -.042 +.147 +.160 +.076  (+.073 +.223 +.123 +.173 +.123 +.081 +.172 +.094)
      no stages  -.004 +.063 +.097 -.046                          (+.011 -.093 -.008 +.017)
    Mean +0.119 with stages (15 of 16 positive), +0.005 without. On the mature users' rows the two are level in
    15 of the 16 runs (-0.008 .. +0.026; seeds 0, 1: +0.003, +0.005); in one (data seed 0, seed 7) STAN is 0.118
    behind. Asserted on seeds 0 and 1: +0.096 with stages, +0.030 in the control.
    What carries it (seeds 0-2, both data seeds, mean new-user AUC): PLE 0.595; gamma = 1 with Eq. 11's preference
    loss 0.689; gamma ~ Beta(1, 1) frozen, no preference loss 0.640; both 0.705; STAN 0.730. So most of the gain is
    the preference learning (Eq. 11 fits the shared user-side embeddings to the running label means), the rest the
    stage weights. Sabotage: no preference loss and a frozen state give +0.047, +0.008 and fail; a state frozen
    at Beta(1, 1) keeps the new users' gain but costs the mature users 0.027 and fails. Not separated: gamma = 1
    with the preference loss passes (+0.117, +0.059; mature -0.017).
    All of the above predates issue #24 (the Beta state added every event again in each epoch). After it (each
    event once), seeds 0, 1: new users +0.026, +0.126 (mean +0.076), control +0.010, +0.049 (mean +0.029), mature
    users -0.002, -0.037 (mean -0.0195): the second and third assertions now hold by 0.007 and 0.0005 only, so
    this test no longer clearly separates STAN from the frozen-Beta(1, 1) sabotage (not re-measured).
    """
    gain = [np.subtract(_stage_cvr_aucs("stan", s), _stage_cvr_aucs("ple", s)) for s in (0, 1)]
    control = [np.subtract(_stage_cvr_aucs("stan", s, False), _stage_cvr_aucs("ple", s, False)) for s in (0, 1)]
    new_gain, mature_gain = np.mean(gain, axis=0)
    assert new_gain > 0.05, gain
    assert new_gain > np.mean(control, axis=0)[0] + 0.04, (gain, control)
    assert mature_gain > -0.02, gain  # not bought by giving up the mature users
