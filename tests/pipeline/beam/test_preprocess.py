"""The Beam/TFT stage checked against values computed independently with numpy/pandas on the raw data."""
import glob
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from serving.examples import serialize_rows
from transforms import features as F
from transforms.features import BUILTIN
from transforms.preprocessing import raw_feature_spec
from tests.pipeline.beam.shard_rows import rows_on_disk


@pytest.fixture(scope="module")
def artifacts(e2e_run):
    work = e2e_run["work_dir"]
    data_dir = e2e_run["summary"]["input"]["dir"]
    raw = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(data_dir, "part-*.parquet")))])
    cutoff = raw.timestamp.min() + (raw.timestamp.max() - raw.timestamp.min()) * 0.8
    tft_output = tft.TFTransformOutput(os.path.join(work, "preprocessed", "transform_fn_output"))
    return {"raw": raw, "train": raw[raw.timestamp < cutoff], "eval": raw[raw.timestamp >= cutoff],
            "tft": tft_output, "summary": e2e_run["summary"]}


def _transform(tft_output, rows, with_labels=False):
    spec = raw_feature_spec(BUILTIN, include_labels=with_labels, include_oracle=False)
    if with_labels:
        serialized = []
        for r in rows:
            ex = tf.train.Example.FromString(serialize_rows([r], BUILTIN)[0])
            for c in BUILTIN.labels.binary_columns:
                ex.features.feature[c].int64_list.value.append(int(r[c]))
            for c in BUILTIN.labels.continuous:
                ex.features.feature[c].float_list.value.append(float(r[c]))
            serialized.append(ex.SerializeToString())
    else:
        serialized = serialize_rows(rows, BUILTIN)
    parsed = tf.io.parse_example(tf.constant(serialized), spec)
    return {k: v.numpy().reshape(-1) for k, v in tft_output.transform_features_layer()(parsed).items()}


def test_time_split_counts(artifacts):
    pp = artifacts["summary"]["preprocess"]
    assert pp["rows_train"] == len(artifacts["train"])
    assert pp["rows_eval"] == len(artifacts["eval"])
    assert pp["rows_train"] + pp["rows_eval"] == len(artifacts["raw"])
    for split in ("train", "eval"):
        files = glob.glob(os.path.join(os.path.dirname(os.path.dirname(artifacts["tft"].transform_savedmodel_dir)),
                                       "data", split, "part-*.tfrecord.gz"))
        n = rows_on_disk(files)
        assert n == pp[f"rows_{split}"]


def test_vocabulary_is_frequency_ranked_on_training_split_only(artifacts):
    vocab = [t.decode() for t in artifacts["tft"].vocabulary_by_name("vocab_item_category")]
    counts = artifacts["train"].item_category.fillna(F.MISSING_TOKEN).value_counts()
    assert set(vocab) == set(counts.index)  # analyzers saw train only: exactly the train tokens
    freq = [counts[t] for t in vocab]
    assert freq == sorted(freq, reverse=True)


def test_transform_values_match_numpy(artifacts):
    train, tft_output = artifacts["train"], artifacts["tft"]
    rows = artifacts["eval"].head(50).to_dict("records")
    rows[0]["item_price"] = None
    rows[1]["item_category"] = "cat_never_seen"
    out = _transform(tft_output, rows)
    # z-score of log1p(price) with the training split's mean and (population) std of present values.
    logp = np.log1p(train.item_price.dropna().astype(np.float64))
    expected = (np.log1p(np.array([r["item_price"] if r["item_price"] is not None else np.nan for r in rows],
                                  dtype=np.float64)) - logp.mean()) / logp.std(ddof=0)
    expected = np.nan_to_num(expected, nan=0.0)  # missing (forced in row 0, or in the data) -> 0
    got = out[F.zscore("item_price")]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert got[0] == 0.0 and out[F.bucket_id("item_price")][0] == 0  # missing -> z 0, bucket 0
    # Vocabulary ids: rank in the frequency-ranked vocabulary; unseen -> an OOV bucket after it.
    vocab = [t.decode() for t in tft_output.vocabulary_by_name("vocab_item_category")]
    ids = out[F.categorical_id("item_category")]
    assert ids[1] >= len(vocab)
    for r, i in zip(rows[2:], ids[2:]):
        assert vocab[i] == r["item_category"]
    # Hour of day from the raw timestamp.
    np.testing.assert_array_equal(out[F.HOUR_ID], [(r["timestamp"] // 3600) % 24 for r in rows])


def test_quantile_buckets_match_numpy_quantiles_of_the_training_split(artifacts):
    """item_price: 20 quantile buckets of log1p(price) over the training split's present values (id 0 =
    missing, ids 1..20). ``tft.bucketize`` computes approximate quantiles with rank error epsilon = 0.01
    (its documented default for fewer than 100 buckets): boundary k lies between the training values of rank
    (k/20 - 0.01) N and (k/20 + 0.01) N. So every training value below ``np.quantile(x, k/20 - 0.01)`` must be
    in a bucket <= k, every one above ``np.quantile(x, k/20 + 0.01)`` in a bucket > k (ties included)."""
    train = artifacts["train"]
    rows = train[train.item_price.notna()].to_dict("records")
    ids = _transform(artifacts["tft"], rows)[F.bucket_id("item_price")]
    x = np.log1p(np.maximum(np.array([r["item_price"] for r in rows], np.float32), 0)).astype(np.float64)
    assert ids.min() == 1 and ids.max() == 20
    eps = 0.01
    for k in range(1, 20):
        lo = np.quantile(x, k / 20 - eps, method="inverted_cdf")
        hi = np.quantile(x, k / 20 + eps, method="inverted_cdf")
        assert ids[x < lo].max() <= k, k
        assert ids[x > hi].min() > k, k
    # and the buckets are not shifted by a whole bucket either way: each holds about 1/20 of the rows
    shares = np.bincount(ids, minlength=21)[1:] / len(ids)
    assert np.all(np.abs(shares - 0.05) <= 2 * eps + np.max(np.unique(x, return_counts=True)[1]) / len(x))


def test_numeric_features_do_not_depend_on_the_batch(artifacts):
    """A row's buckets and z-scores are the same whether it is transformed alone (a serving request) or inside a
    batch (preprocessing, batch scoring), and its bucket is the number of boundaries <= log1p(x) computed in float64
    and rounded to float32 (numpy, independently). float32 log1p fails this: its vectorized and scalar kernels
    differ in the last bit for ~40% of values, and a value lying on a quantile boundary (boundaries are data
    values, and count features repeat them) then lands in the next bucket on one side only: train/serve skew."""
    from transforms.preprocessing import read_numeric_statistics

    train = artifacts["train"]
    names = [f.name for f in BUILTIN.numeric if f.log1p and f.name in train.columns]  # raw columns, not per-user
    rows = train.drop_duplicates(subset=names).head(200).to_dict("records")
    layer = artifacts["tft"].transform_features_layer()
    spec = raw_feature_spec(BUILTIN, include_labels=False, include_oracle=False)

    @tf.function(reduce_retracing=True)  # one trace for any batch size: 200 rows one at a time stay cheap
    def transform(serialized):
        return layer(tf.io.parse_example(serialized, spec))

    def run(batch_rows):
        return {k: v.numpy().reshape(-1) for k, v in transform(tf.constant(serialize_rows(batch_rows, BUILTIN))).items()}

    batch = run(rows)
    alone = [run([r]) for r in rows]
    stats = read_numeric_statistics(os.path.dirname(artifacts["tft"].transform_savedmodel_dir), BUILTIN)
    on_boundary = 0
    for name in names:
        for out in (F.bucket_id(name), F.zscore(name)):
            np.testing.assert_array_equal(np.array([a[out][0] for a in alone]), batch[out], err_msg=out)
        present = [i for i, r in enumerate(rows) if r[name] is not None and not pd.isna(r[name])]
        x = np.log1p(np.maximum(np.array([rows[i][name] for i in present], np.float64), 0)).astype(np.float32)
        boundaries = np.array(stats[name].boundaries, np.float32)
        np.testing.assert_array_equal(batch[F.bucket_id(name)][present],
                                      np.searchsorted(boundaries, x, side="right") + 1, err_msg=name)
        on_boundary += int(np.isin(x, boundaries).sum())
    assert on_boundary >= 5  # the rows include values lying on boundaries, where a last-bit difference shows


def test_labels_and_daction_or(artifacts):
    rows = artifacts["train"].head(400).to_dict("records")
    out = _transform(artifacts["tft"], rows, with_labels=True)
    np.testing.assert_array_equal(out[F.DACTION], [max(r["cart"], r["wish"]) for r in rows])
    np.testing.assert_array_equal(out[F.CLICK], [r["click"] for r in rows])
    np.testing.assert_array_equal(out[F.PURCHASE], [r["purchase"] for r in rows])


def test_serving_side_transform_has_no_labels(artifacts):
    out = _transform(artifacts["tft"], artifacts["eval"].head(3).to_dict("records"))
    assert not ({F.CLICK, F.DACTION, F.PURCHASE} & set(out))
    assert set(BUILTIN.model_feature_names()) <= set(out)

