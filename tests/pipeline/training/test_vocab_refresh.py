"""Vocabulary refresh: a transform graph re-analyzed on new data with the numeric statistics of the old one, and a
trained model (weights and Adam slots) carried onto its ids (``pipeline.training.vocab_refresh``).

Two tiny in-memory datasets analyzed by tensorflow-transform: the old vocabulary of ``item`` is a, b, c, d (by
frequency); the new one e, c, a, b, f (a, b, c survive at other ids, d is dropped, e and f are new); the sequence
``hist`` goes x, y, z -> y, z, w. Prices of the new data are ~100x the old ones, so re-analyzed numeric statistics
would change every bucket and z-score. Expected values come from the vocabulary asset files, the old model's own
variables and numpy, not from the code under test."""
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from models import registry
from models.keras import keras
from pipeline.training.train import model_inputs, save_final
from pipeline.training.vocab_refresh import remap_warm_start
from transforms import features as F
from transforms.features import CategoricalFeature, FeatureContract, LabelSpec, NumericFeature, SequenceFeature
from pipeline.beam.preprocess import TFT_COMPAT_V1, tf1_mode_for
from transforms.preprocessing import (build_preprocessing_fn, is_tf1_transform_graph, raw_feature_spec,
                                      read_numeric_statistics)

CONTRACT = FeatureContract(
    name="tiny", user_id=None, item_id=None, timestamp="ts",
    categorical=(CategoricalFeature("item", num_oov_buckets=2),),
    numeric=(NumericFeature("price", num_buckets=4),),
    sequences=(SequenceFeature("hist", max_length=3, num_oov_buckets=2),),
    labels=LabelSpec(click="click", daction=("cart",), purchase="purchase", continuous=()))
ITEM, HIST = F.categorical_id("item"), F.sequence_ids("hist")
OLD_ITEMS = {"a": 8, "b": 6, "c": 4, "d": 3}
NEW_ITEMS = {"e": 9, "c": 7, "a": 5, "b": 3, "f": 2}
OLD_HIST, NEW_HIST = ("x", "y", "z"), ("y", "z", "w")
LR = 0.05


def _rows(items, hist_tokens, price_scale, seed):
    rng = np.random.default_rng(seed)
    tokens = [t for t, n in items.items() for _ in range(n)]
    rng.shuffle(tokens)
    rows = []
    for i, item in enumerate(tokens):
        hist = [hist_tokens[j] for j in rng.integers(0, len(hist_tokens), 1 + i % 3)]
        click = int(rng.random() < 0.5)
        cart = click * int(rng.random() < 0.5)
        rows.append({"item": [item.encode()], "hist": [h.encode() for h in hist],
                     "price": [float(price_scale * rng.lognormal(2.0, 1.0))], "ts": 1_700_000_000 + 977 * i,
                     "click": click, "cart": cart, "purchase": cart * int(rng.random() < 0.5)})
    return rows


def _analyze(rows, preprocessing_fn, out_dir, tf1=TFT_COMPAT_V1):
    """The transform graph of ``rows``, written in TF1 graph mode (``tf1``; pipeline.beam's mode by default) or
    TF2 mode (graphs of earlier versions)."""
    meta = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec(CONTRACT)))
    with tft_beam.Context(temp_dir=out_dir + "-tmp", force_tf_compat_v1=tf1):
        with beam.Pipeline() as p:
            fn = (p | beam.Create(rows), meta) | tft_beam.AnalyzeDataset(preprocessing_fn)
            _ = fn | tft_beam.WriteTransformFn(out_dir)
    return tft.TFTransformOutput(out_dir)


def _example(row):
    feats = {}
    for k, v in row.items():
        v = v if isinstance(v, list) else [v]
        if isinstance(v[0], bytes):
            feats[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=v))
        elif isinstance(v[0], float):
            feats[k] = tf.train.Feature(float_list=tf.train.FloatList(value=v))
        else:
            feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=v))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _transform(tft_output, rows):
    parsed = tf.io.parse_example([_example(r) for r in rows], raw_feature_spec(CONTRACT, include_oracle=False))
    return {k: v for k, v in tft_output.transform_features_layer()(parsed).items()}


def _vocab(tft_output, name):
    """The vocabulary asset file, read as plain lines (token -> id)."""
    path = os.path.join(tft_output.transform_savedmodel_dir, "assets", f"vocab_{name}")
    with open(path, "rb") as fh:
        return {line.rstrip(b"\n").decode(): i for i, line in enumerate(fh)}


def _model(tft_output):
    keras.backend.clear_session()
    categorical, dense, sequences = model_inputs(CONTRACT, tft_output)
    cfg = registry.resolve_config("esm2", "default", {})
    model = registry.build("esm2", categorical, dense, cfg, sequences)
    return model


def _features(out):
    return {k: out[k] for k in CONTRACT.model_feature_names()}


def _tables(model):
    """{weights|m|v: {field: the field's embedding table or its Adam slot, as numpy}, step: Adam's step}."""
    def find(variables, prefix, table):
        hits = [v for v in variables if prefix in "/" + v.name and v.name.endswith(f"/{table}/embeddings:0")]
        assert len(hits) == 1, [v.name for v in variables]
        return hits[0].numpy()

    tables = {ITEM: f"emb_{ITEM}", HIST: f"emb_seq_{HIST}"}
    out = {part: {field: find(variables, prefix, table) for field, table in tables.items()}
           for part, prefix, variables in (("weights", "/esm2/", model.weights),
                                           ("m", "/m/", model.optimizer.variables()),  # "[Adam/]m/<variable>"
                                           ("v", "/v/", model.optimizer.variables()))}
    out["step"] = int(model.optimizer.iterations.numpy())
    return out


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refresh"))
    old_rows, new_rows = _rows(OLD_ITEMS, OLD_HIST, 1.0, 0), _rows(NEW_ITEMS, NEW_HIST, 100.0, 1)
    old_tft = _analyze(old_rows, build_preprocessing_fn(CONTRACT), os.path.join(root, "old"))
    # the old model, trained a few Adam steps so every slot is non-zero, saved as pipeline.retrain's warm start
    out = _transform(old_tft, old_rows)
    model = _model(old_tft)
    model.compile(optimizer=keras.optimizers.Adam(LR))
    model.fit(tf.data.Dataset.from_tensor_slices((_features(out), {k: out[k] for k in CONTRACT.labels.transformed}))
              .batch(7), epochs=2, verbose=0)
    old_prefix = save_final(model, os.path.join(root, "old-ckpt"))
    # raw rows whose tokens all survive the refresh, at prices spread over the old range and beyond
    probe = [dict(r, price=[float(3.0 ** (i % 6))]) for i, r in enumerate(old_rows)
             if r["item"][0] in (b"a", b"b", b"c") and b"x" not in r["hist"]]
    old_scores = {k: v.numpy() for k, v in model(_features(_transform(old_tft, probe))).items()}

    stats = read_numeric_statistics(os.path.join(root, "old"), CONTRACT)
    new_tft = _analyze(new_rows, build_preprocessing_fn(CONTRACT, stats), os.path.join(root, "new"))
    info = remap_warm_start("esm2", registry.resolve_config("esm2", "default", {}), CONTRACT, old_tft, new_tft,
                            old_prefix, os.path.join(root, "new-ckpt"), LR, seed=3)
    new_model = _model(new_tft)
    new_model.compile(optimizer=keras.optimizers.Adam(LR))
    new_features = _features(_transform(new_tft, probe))
    new_model(new_features)
    new_model.optimizer.build(new_model.trainable_variables)
    tf.train.Checkpoint(model=new_model, optimizer=new_model.optimizer).read(
        info["checkpoint"]).assert_existing_objects_matched()
    return dict(old_tft=old_tft, new_tft=new_tft, old=_tables(model), new=_tables(new_model), info=info,
                probe=probe, old_rows=old_rows, old_scores=old_scores,
                new_scores={k: v.numpy() for k, v in new_model(new_features).items()}, stats=stats, root=root)


def test_the_refreshed_vocabularies_are_the_new_datas_and_the_numeric_statistics_the_old_ones(refreshed):
    assert _vocab(refreshed["old_tft"], "item") == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert _vocab(refreshed["new_tft"], "item") == {"e": 0, "c": 1, "a": 2, "b": 3, "f": 4}
    assert set(_vocab(refreshed["new_tft"], "hist")) == set(NEW_HIST)
    # the fixed statistics are read back from the refreshed graph as they went in (a second refresh reads them so)
    assert read_numeric_statistics(os.path.join(refreshed["root"], "new"), CONTRACT) == refreshed["stats"]
    # numeric outputs of both graphs agree on rows priced far outside the new data's range too
    rows = [dict(r, price=[p]) for r, p in zip(refreshed["old_rows"], [0.5, 3.0, 9.0, 40.0, 700.0, 5e4])]
    old, new = _transform(refreshed["old_tft"], rows), _transform(refreshed["new_tft"], rows)
    for key in (F.bucket_id("price"), F.zscore("price")):
        np.testing.assert_array_equal(old[key].numpy(), new[key].numpy(), err_msg=key)
    log_prices = np.log1p([r["price"][0] for r in refreshed["old_rows"]])
    expected_z = (np.log1p(700.0) - log_prices.mean()) / log_prices.std()
    assert new[F.zscore("price")].numpy()[4, 0] == pytest.approx(expected_z, rel=1e-4)


def test_a_surviving_tokens_row_and_adam_slots_move_to_its_new_id(refreshed):
    old, new = refreshed["old"], refreshed["new"]
    old_ids, new_ids = _vocab(refreshed["old_tft"], "item"), _vocab(refreshed["new_tft"], "item")
    for token in ("a", "b", "c"):
        for part in ("weights", "m", "v"):
            np.testing.assert_array_equal(new[part][ITEM][new_ids[token]], old[part][ITEM][old_ids[token]],
                                          err_msg=f"{part} of {token}")
        assert np.any(old["m"][ITEM][old_ids[token]] != 0)
    old_seq, new_seq = _vocab(refreshed["old_tft"], "hist"), _vocab(refreshed["new_tft"], "hist")
    for token in ("y", "z"):  # sequence ids are vocabulary index + 1 (0 = padding)
        for part in ("weights", "m", "v"):
            np.testing.assert_array_equal(new[part][HIST][new_seq[token] + 1], old[part][HIST][old_seq[token] + 1],
                                          err_msg=f"{part} of {token}")
    assert new["step"] == old["step"] > 0
    assert refreshed["info"]["fields"][ITEM] == {"carried": 3, "new": 2, "dropped": 1}


def test_a_new_token_gets_a_fresh_row_with_zero_slots(refreshed):
    old, new = refreshed["old"], refreshed["new"]
    new_ids = _vocab(refreshed["new_tft"], "item")
    oov_rows = new["weights"][ITEM][len(new_ids):]
    for token in ("e", "f"):
        row = new["weights"][ITEM][new_ids[token]]
        assert not np.any(np.all(np.isclose(old["weights"][ITEM], row), axis=1)), f"{token} copies an old row"
        assert not np.any(np.all(np.isclose(oov_rows, row), axis=1)), f"{token} copies an OOV row"
        assert 0 < np.max(np.abs(row)) <= 0.05  # keras.layers.Embedding's uniform(-0.05, 0.05) initializer
        assert not np.any(new["m"][ITEM][new_ids[token]]) and not np.any(new["v"][ITEM][new_ids[token]])
    w = _vocab(refreshed["new_tft"], "hist")["w"] + 1
    assert not np.any(np.all(np.isclose(old["weights"][HIST], new["weights"][HIST][w]), axis=1))


def test_a_dropped_token_goes_to_its_oov_bucket_whose_row_is_carried(refreshed):
    old, new = refreshed["old"], refreshed["new"]
    row = dict(refreshed["old_rows"][0], item=[b"d"])
    old_vocab, new_vocab = _vocab(refreshed["old_tft"], "item"), _vocab(refreshed["new_tft"], "item")
    assert int(_transform(refreshed["old_tft"], [row])[ITEM].numpy()[0, 0]) == old_vocab["d"]
    new_id = int(_transform(refreshed["new_tft"], [row])[ITEM].numpy()[0, 0])
    assert len(new_vocab) <= new_id < len(new_vocab) + 2
    bucket = new_id - len(new_vocab)
    # the same OOV bucket as an unseen token hashing there got before; its row (and slots) carried
    for part in ("weights", "m", "v"):
        np.testing.assert_array_equal(new[part][ITEM][new_id], old[part][ITEM][len(old_vocab) + bucket])


def test_rows_whose_tokens_all_survive_score_the_same_right_after_the_refresh(refreshed):
    assert len(refreshed["probe"]) >= 4
    for task, before in refreshed["old_scores"].items():
        np.testing.assert_allclose(refreshed["new_scores"][task], before, rtol=1e-6, atol=1e-7, err_msg=task)


@pytest.mark.parametrize("tf1", [True, False], ids=["tf1-graph", "tf2-graph"])
def test_numeric_statistics_are_read_from_graphs_of_either_mode(tmp_path, tf1):
    """``read_numeric_statistics`` on a graph written in TF1 mode (what pipeline.beam writes) and in TF2 mode (graphs
    of earlier versions, which pipeline.retrain still refreshes): the mean and variance are numpy's of
    log1p(price); the graph buckets and z-scores every row with exactly the boundaries, mean and variance read;
    a graph made with them fixed reads them back unchanged."""
    rows = _rows(OLD_ITEMS, OLD_HIST, 1.0, 0)
    analyzed = _analyze(rows, build_preprocessing_fn(CONTRACT), str(tmp_path / "analyzed"), tf1)
    assert is_tf1_transform_graph(str(tmp_path / "analyzed")) == tf1
    stats = read_numeric_statistics(str(tmp_path / "analyzed"), CONTRACT)
    x = np.log1p(np.array([r["price"][0] for r in rows], np.float64)).astype(np.float32)
    np.testing.assert_allclose([stats["price"].mean, stats["price"].var], [x.mean(dtype=np.float64), x.var(
        dtype=np.float64)], rtol=1e-5)
    boundaries = np.array(stats["price"].boundaries, np.float32)
    assert len(boundaries) == 3 and np.all(np.diff(boundaries) > 0) and x.min() <= boundaries[0] <= x.max()
    out = _transform(analyzed, rows)
    np.testing.assert_array_equal(out[F.bucket_id("price")].numpy().ravel(),
                                  np.searchsorted(boundaries, x, side="right") + 1)
    z = (x - np.float32(stats["price"].mean)) / np.sqrt(np.float32(stats["price"].var))
    np.testing.assert_allclose(out[F.zscore("price")].numpy().ravel(), z, rtol=1e-6, atol=1e-6)
    _analyze(rows, build_preprocessing_fn(CONTRACT, stats), str(tmp_path / "fixed"), tf1)
    assert read_numeric_statistics(str(tmp_path / "fixed"), CONTRACT) == stats


@pytest.mark.parametrize("tf1", [True, False], ids=["tf1-graph", "tf2-graph"])
def test_beam_applies_a_graph_of_either_mode_in_the_mode_it_was_written_in(tmp_path, tf1):
    """What pipeline.retrain does with the loop's graph, which may come from an earlier version (TF2 mode): Beam's
    TransformDataset in ``tf1_mode_for(graph)`` transforms rows exactly as the graph's Keras layer (training,
    serving) does; a TF1-mode graph applied in TF2 mode fails, which is why the mode follows the graph."""
    from apache_beam.testing.util import assert_that

    rows = _rows(OLD_ITEMS, OLD_HIST, 1.0, 0)
    graph_dir = str(tmp_path / "graph")
    layer_out = _transform(_analyze(rows, build_preprocessing_fn(CONTRACT), graph_dir, tf1), rows)
    keys = [ITEM, F.bucket_id("price"), F.zscore("price"), HIST]
    expected = sorted(tuple(tuple(np.asarray(layer_out[k][i]).ravel().tolist()) for k in keys)
                      for i in range(len(rows)))
    meta = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec(CONTRACT)))

    def apply(mode: bool) -> None:
        def check(outputs):
            got = sorted(tuple(tuple(np.asarray(o[k]).ravel().tolist()) for k in keys) for o in outputs)
            assert got == expected

        with tft_beam.Context(temp_dir=str(tmp_path / f"tmp-{mode}"), force_tf_compat_v1=mode):
            with beam.Pipeline() as p:
                fn = p | tft_beam.ReadTransformFn(graph_dir)
                out = ((p | beam.Create(rows), meta), fn) | tft_beam.TransformDataset()
                assert_that(out[0], check)

    assert tf1_mode_for(graph_dir) == tf1 and tf1_mode_for(None) == TFT_COMPAT_V1
    apply(tf1_mode_for(graph_dir))
    if tf1:
        with pytest.raises(Exception):
            apply(False)
