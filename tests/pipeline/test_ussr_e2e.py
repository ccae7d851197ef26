"""USSR through the pipeline on the shared e2e run's preprocessed data: train, export (raw tf.Examples in, the
same predictions out), then the §3.4 expansion command on the resulting work directory."""
import json
import os
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ussr_run(e2e_run, tmp_path_factory):
    """A `pipeline.run --model ussr` style work dir that reuses the e2e run's data and transform graph."""
    import tensorflow_transform as tft

    from models import registry
    from pipeline.beam.preprocess import TRANSFORM_DIR, transformed_pattern
    from pipeline.training.train import TrainConfig, train_model
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from transforms.schema import builtin_schema_path, load_schema

    src = e2e_run["work_dir"]
    work = str(tmp_path_factory.mktemp("ussr"))
    os.symlink(os.path.join(src, "preprocessed"), os.path.join(work, "preprocessed"))
    pp = os.path.join(work, "preprocessed")
    schema = load_schema(builtin_schema_path("builtin"),
                         input_path=os.path.join(e2e_run["summary"]["input"]["dir"], "part-*.parquet"))
    contract = schema.contract
    tft_output = tft.TFTransformOutput(os.path.join(pp, TRANSFORM_DIR))
    cfg = registry.resolve_config("ussr", "default", {"batch_size": 256})
    model, history = train_model("ussr", cfg, contract, tft_output, transformed_pattern(pp, "train"),
                                 transformed_pattern(pp, "eval"), TrainConfig(epochs=1, early_stopping_patience=0))
    from pipeline.run import sample_canonical_rows
    rows = sample_canonical_rows(schema, 16)
    export = export_saved_model(model, os.path.join(pp, TRANSFORM_DIR), contract, os.path.join(work, "export"),
                                "ussr", warmup_examples=serialize_rows(rows, contract))
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config.update(model="ussr", model_config=cfg.to_dict())
    with open(os.path.join(work, "config.json"), "w") as fh:
        json.dump(config, fh)
    return {"work": work, "model": model, "export": export, "rows": rows, "contract": contract,
            "history": history}


def test_ussr_trains_and_exports_scoring_raw_examples_like_the_keras_model(ussr_run):
    import tensorflow as tf

    from serving.examples import serialize_rows

    assert ussr_run["model"].config.segment_feature == "segment_id"
    assert np.isfinite(ussr_run["history"]["loss"]).all()
    loaded = tf.saved_model.load(ussr_run["export"])
    examples = tf.constant(serialize_rows(ussr_run["rows"], ussr_run["contract"]))
    served = loaded.signatures["serving_default"](examples=examples)
    assert set(served) == {"ctr", "ctr_universal"}
    transformed = loaded.signatures["transform_features"](examples=examples)
    keras_out = ussr_run["model"](dict(transformed), training=False)
    for name in ("ctr", "ctr_universal"):
        got = served[name].numpy()
        assert got.shape == (16,) and np.all((got > 0) & (got < 1))
        np.testing.assert_allclose(got, keras_out[name].numpy().reshape(-1), rtol=1e-5, atol=1e-7)


def test_expand_command_adds_a_segment_keeping_the_others_identical(ussr_run, e2e_run, capsys):
    """Exports v1 (before) and v2 (after the expansion) score the same raw rows: every row of another
    segment gets the bit-identical ctr, every row of the taken-over segment (b2b) a different one."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    from pipeline import expand_ussr
    from serving.examples import serialize_rows

    work = ussr_run["work"]
    # Unknown value -> the vocabulary's OOV bucket; the built-in data has no such rows, so nothing to learn.
    assert expand_ussr.main(["--work-dir", work, "--add-segment", "vip"]) == 2
    assert "no training rows" in capsys.readouterr().err
    # Re-learn the smallest segment (b2b) as a new one.
    summary = expand_ussr.expand(work, add_segment="b2b_v2", segment_id=_segment_id(work, "b2b"), epochs=1)
    assert summary["train_rows"] > 0
    assert summary["source"].endswith(os.path.join("export", "ussr", "1"))
    assert summary["export"].endswith(os.path.join("export", "ussr", "2"))
    assert os.path.exists(os.path.join(summary["keras_model"], "saved_model.pb"))

    contract = ussr_run["contract"]
    table = pq.read_table(os.path.join(e2e_run["summary"]["input"]["dir"], "part-00000.parquet")).slice(0, 600)
    rows = table.to_pylist()
    segment = np.array([row[contract.segment] for row in rows])
    b2b = segment == "b2b"
    assert 10 <= b2b.sum() and len(set(segment[~b2b])) >= 2, np.unique(segment, return_counts=True)
    examples = tf.constant(serialize_rows(rows, contract))
    v1 = tf.saved_model.load(summary["source"]).signatures["serving_default"](examples=examples)["ctr"].numpy()
    v2 = tf.saved_model.load(summary["export"]).signatures["serving_default"](examples=examples)["ctr"].numpy()
    np.testing.assert_array_equal(v2[~b2b], v1[~b2b])
    assert np.all(v2[b2b] != v1[b2b]), np.flatnonzero(v2[b2b] == v1[b2b])
    # A second expansion starts from the saved Keras model and may not take the same id again.
    with pytest.raises(expand_ussr.ExpansionError, match="already taken"):
        expand_ussr.expand(work, add_segment="b2b_v3", segment_id=_segment_id(work, "b2b"))
    shutil.rmtree(summary["keras_model"])


def _segment_id(work, name):
    import tensorflow_transform as tft

    vocab = tft.TFTransformOutput(os.path.join(work, "preprocessed", "transform_fn_output")).vocabulary_by_name(
        "vocab_segment")
    return [v.decode() for v in vocab].index(name)
