"""STAN's user preference (Eqs. 7-9) and Beta stage state (Algorithm 1) against numpy references."""
import numpy as np
import pytest
import tensorflow as tf

from models.layers.stage import BetaStageState, UserPreference


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_user_preference_matches_numpy_equations():
    rng = np.random.default_rng(0)
    B, d1, d2, K = 3, 4, 5, 2
    layer = UserPreference(d1, d2, K)
    u = rng.normal(size=(B, d1, d2)).astype(np.float32)
    layer(u)
    wq, wk, wv, wt, mk, mb = [rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights([wq, wk, wv, wt, mk, mb])
    expected = np.zeros((B, K))
    for b in range(B):
        U = u[b].astype(np.float64)
        att = _softmax((wq @ U) @ (wk @ U).T / np.sqrt(d1), axis=1)       # Eq. 7
        up = att @ (wv @ U)
        for k in range(K):
            s = up * _softmax(up @ wt[k], axis=0)                          # Eq. 8 (softmax over fields)
            expected[b, k] = 1 / (1 + np.exp(-(s.reshape(-1) @ mk[k] + mb[k])))  # Eq. 9
    np.testing.assert_allclose(layer(u).numpy(), expected, rtol=1e-4, atol=1e-6)


def _algorithm1(events, num_users, K):
    """Literal Algorithm 1: sequential pass over (user, y~) events."""
    alpha = np.ones((num_users, K))
    beta = np.ones((num_users, K))
    c = np.zeros(num_users)
    for u, y in events:
        c[u] += 1
        alpha[u] += np.asarray(y) * c[u]
        beta[u] += (1 - np.asarray(y)) * c[u]
    return alpha, beta, c


def test_beta_updates_follow_algorithm_1_for_a_scripted_sequence():
    state = BetaStageState(num_users=4, num_tasks=2)
    state.build(None)
    batches = [([0, 1, 0], [0, 0, 1], [[0.9, 0.1], [0.2, 0.4], [0.5, 0.5]]),
               ([2, 0, 0, 3], [0, 2, 3, 0], [[1.0, 0.0], [0.3, 0.7], [0.6, 0.2], [0.0, 1.0]]),
               ([1], [1], [[0.8, 0.8]])]   # (users, positions = the user's earlier events, y~)
    events = []
    for users, positions, ys in batches:
        state.update(tf.constant(users), tf.constant(ys, tf.float32), tf.constant(positions))
        events.extend(zip(users, ys))
    alpha, beta, c = _algorithm1(events, 4, 2)
    np.testing.assert_allclose(state.alpha.numpy(), alpha, rtol=1e-6)
    np.testing.assert_allclose(state.beta.numpy(), beta, rtol=1e-6)
    np.testing.assert_allclose(state.count.numpy(), c)
    # user 0: events y=0.9,0.5,0.3,0.6 (task 0) with c=1..4 -> alpha = 1 + 0.9 + 1.0 + 0.9 + 2.4 = 6.2
    assert state.alpha.numpy()[0, 0] == pytest.approx(6.2)
    # a second epoch (same events, other batches and order, other y~) changes nothing: one pass per event
    for users, positions, ys in reversed(batches):
        state.update(tf.constant(users[::-1]), tf.constant(ys[::-1], tf.float32) * 0.5, tf.constant(positions[::-1]))
    np.testing.assert_allclose(state.alpha.numpy(), alpha, rtol=1e-6)
    np.testing.assert_allclose(state.beta.numpy(), beta, rtol=1e-6)
    np.testing.assert_allclose(state.count.numpy(), c)


def test_events_arriving_out_of_time_order_give_the_time_ordered_pass_once():
    """Shuffled batches (pipeline.training.train's default): the first pass applies every event, with c = its position + 1,
    so the state is Algorithm 1 over the user's events in time order; later passes, in any order, are no-ops.
    Rows of one batch with the same (user, position) are one event (users sharing an OOV index)."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 3, 40)
    positions = np.array([np.sum(users[:i] == u) for i, u in enumerate(users)])
    y = rng.random((40, 2)).astype(np.float32)
    events_in_time_order = list(zip(users, y))
    state = BetaStageState(num_users=3, num_tasks=2)
    state.build(None)
    for epoch in range(3):
        order = rng.permutation(40)
        for rows in np.array_split(order, 6):
            y_now = y[rows] if epoch == 0 else rng.random((len(rows), 2)).astype(np.float32)
            state.update(tf.constant(users[rows]), tf.constant(y_now), tf.constant(positions[rows], tf.float32))
        alpha, beta, c = _algorithm1(events_in_time_order, 3, 2)
        np.testing.assert_allclose(state.alpha.numpy(), alpha, rtol=1e-5, err_msg=f"epoch {epoch}")
        np.testing.assert_allclose(state.beta.numpy(), beta, rtol=1e-5, err_msg=f"epoch {epoch}")
        np.testing.assert_array_equal(state.count.numpy(), c)
    oov = BetaStageState(num_users=1, num_tasks=1)
    oov.build(None)
    oov.update(tf.constant([0, 0, 0]), tf.constant([[0.25], [0.5], [0.75]]), tf.constant([0, 0, 0]))
    oov.update(tf.constant([0]), tf.constant([[0.9]]), tf.constant([0]))
    assert oov.alpha.numpy()[0, 0] == pytest.approx(1.25) and oov.beta.numpy()[0, 0] == pytest.approx(1.75)


def test_gamma_samples_follow_the_beta_state():
    state = BetaStageState(num_users=2, num_tasks=1)
    state.build(None)
    state.alpha.assign([[30.0], [2.0]])
    state.beta.assign([[10.0], [8.0]])
    users = tf.constant([0] * 20000 + [1] * 20000)
    g = state.sample(users, seed=1).numpy().reshape(2, -1)
    # Beta(30, 10): mean 0.75, var = ab/((a+b)^2 (a+b+1)); Beta(2, 8): mean 0.2
    assert g[0].mean() == pytest.approx(0.75, abs=0.01)
    assert g[0].var() == pytest.approx(30 * 10 / (40 ** 2 * 41), rel=0.1)
    assert g[1].mean() == pytest.approx(0.2, abs=0.01)
    np.testing.assert_allclose(state.mean(tf.constant([0, 1])).numpy().ravel(), [0.75, 0.2])


def test_layers_round_trip_config():
    for layer in (UserPreference(3, 4, 2), BetaStageState(10, 3)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
