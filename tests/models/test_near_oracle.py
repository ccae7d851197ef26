"""Light planted truth for Models I: every model within 0.02 AUC of the oracle where the columns show the truth.

The benchmark's version (README, "How far from the oracle") needs 600k rows of the built-in data, because there the
oracle also sees parts no column shows (an item's own taste, the lifecycle stage). Here every part of the true
probabilities is a function of the columns, so the gap left is what a model fails to learn: each of ESMM, ESM²,
MMoE, PLE and STAN is trained with its shipped default preset (widths, dropout, learning rate, batch size) and
judged on CTR and CTCVR, the tasks every one of them outputs, against the true probabilities on a fresh draw.
"""
import numpy as np
import pytest
import tensorflow as tf

from models import registry
from models.keras import keras
from tests.models.planted import column, rank_auc, running_means

_USERS, _CATS, _BRANDS = 200, 40, 30
_DACTION_PURCHASE, _OACTION_PURCHASE = 0.3, 0.02  # purchase | click, after a DAction / without one


def _funnel(n, seed):
    """Impression -> click -> DAction -> purchase with all of it visible: click ~ sigmoid(-1 + c[cat] + 0.5 x +
    b[user]) (c ~ N(0, 0.5^2), b ~ N(0, 0.7^2) per user), DAction | click ~ sigmoid(-1.2 + a[cat] + d[brand])
    (N(0, 2^2) effects), purchase | click 30% after a DAction and 2% otherwise. Rows are in time order; the
    ``pl_*`` labels are each user's running label means over earlier rows (STAN's Eq. 10 targets).
    Returns features, labels and the true {ctr, ctcvr}; 40k rows hold ~1,400 purchases."""
    world = np.random.default_rng(123)
    cat_click, user_bias = world.normal(0, 0.5, _CATS), world.normal(0, 0.7, _USERS)
    cat_da, brand_da = world.normal(0, 2.0, _CATS), world.normal(0, 2.0, _BRANDS)
    rng = np.random.default_rng(seed)
    user, cat, brand = rng.integers(0, _USERS, n), rng.integers(0, _CATS, n), rng.integers(0, _BRANDS, n)
    x = rng.normal(size=n)
    ctr = 1 / (1 + np.exp(-(-1.0 + cat_click[cat] + 0.5 * x + user_bias[user])))
    y2 = 1 / (1 + np.exp(-(-1.2 + cat_da[cat] + brand_da[brand])))
    click = rng.random(n) < ctr
    daction = click & (rng.random(n) < y2)
    purchase = click & (rng.random(n) < np.where(daction, _DACTION_PURCHASE, _OACTION_PURCHASE))
    labels = {"click": click, "daction": daction, "purchase": purchase}
    labels.update(running_means(user, labels))
    order = np.argsort(user, kind="stable")  # STAN's event positions: each row's number of earlier rows of its user
    labels["uf_count_raw"] = np.empty(n, np.int64)
    labels["uf_count_raw"][order] = np.arange(n) - np.searchsorted(user[order], user[order])
    feats = {"user_id_id": column(user, np.int64), "cat_id": column(cat, np.int64),
             "brand_id": column(brand, np.int64), "x_z": column(x, np.float32)}
    labels = {k: column(v, np.float32 if k.startswith("pl_") else np.int64) for k, v in labels.items()}
    truth = {"ctr": ctr, "ctcvr": ctr * (y2 * _DACTION_PURCHASE + (1 - y2) * _OACTION_PURCHASE)}
    return feats, labels, truth


_MODELS = ("esmm", "esm2", "mmoe", "ple", "stan")


@pytest.fixture(scope="module")
def oracle_draw():
    """A fresh 60k-row draw and the oracle's AUC on it."""
    feats, labels, truth = _funnel(60_000, 999)
    ys = {"ctr": labels["click"].numpy(), "ctcvr": labels["purchase"].numpy()}
    return feats, ys, {task: rank_auc(ys[task], truth[task]) for task in ys}


def _gaps(model_name, oracle_draw, seed=0, **overrides):
    """Oracle AUC minus the model's on CTR and CTCVR, after 6 epochs on 40k rows with the shipped default preset."""
    keras.utils.set_random_seed(seed)
    feats, labels, _ = _funnel(40_000, 100)
    if model_name == "stan":
        overrides["user_fields"] = ("user_id_id",)  # what the pipeline binds from the contract's user columns
    cfg = registry.resolve_config(model_name, "default", overrides)
    model = registry.build(model_name, {"user_id_id": _USERS, "cat_id": _CATS, "brand_id": _BRANDS}, ("x_z",), cfg)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    data = tf.data.Dataset.from_tensor_slices((feats, labels)).shuffle(40_000, seed=seed).batch(cfg.batch_size)
    model.fit(data, epochs=6, verbose=0)
    test_feats, ys, oracle = oracle_draw
    predictions = model(test_feats, training=False)
    return {task: oracle[task] - rank_auc(ys[task], predictions[task].numpy()) for task in ys}


@pytest.mark.parametrize("model_name", _MODELS)
def test_planted_model_is_within_002_auc_of_the_oracle_on_ctr_and_ctcvr(model_name, oracle_draw):
    """Issue #4: "every model within 0.02 AUC of the oracle on its main task", here on both shared tasks.

    Oracle on the test draw: CTR 0.7346, CTCVR 0.7763 (2,250 purchases). Gaps measured when written, seed 0 (1):
      esmm  ctr .0060 (.0058)  ctcvr .0130 (.0125)
      esm2  ctr .0072 (.0071)  ctcvr .0096 (.0080)
      mmoe  ctr .0079 (.0075)  ctcvr .0081 (.0081)
      ple   ctr .0084 (.0082)  ctcvr .0123 (.0083)
      stan  ctr .0079 (.0076)  ctcvr .0081 (.0060)
    ESMM, which learns pCVR from purchases alone, is the farthest on CTCVR. Sabotage: without the CTCVR loss
    (w_ctcvr = 0) the purchase towers learn nothing and every model fails on CTCVR.
    """
    gaps = _gaps(model_name, oracle_draw)
    assert max(gaps.values()) < 0.02, gaps
