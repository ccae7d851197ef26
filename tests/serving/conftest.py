"""Fixtures of the serving tests: one SavedModel with warmup records, exported from the e2e run's transform
graph, and real raw rows of that run (the stand-in TF Serving server lives in ``fake_tf_serving``)."""
import os

import pytest


@pytest.fixture(scope="session")
def raw_rows(e2e_run):
    """32 raw impressions (dicts of raw columns) from the e2e run's input, one with a missing value."""
    import pyarrow.parquet as pq

    data_dir = e2e_run["summary"]["input"]["dir"]
    rows = pq.read_table(os.path.join(data_dir, "part-00000.parquet")).slice(0, 32).to_pylist()
    rows[3]["item_price"] = None
    return rows


@pytest.fixture(scope="session")
def esm2_model(e2e_run):
    """An ESM² (random weights, seeded) with the e2e run's input cardinalities, built and called once."""
    import tensorflow_transform as tft

    from pipeline.training.train import model_inputs
    from transforms.features import BUILTIN

    tft_dir = os.path.join(e2e_run["work_dir"], "preprocessed", "transform_fn_output")
    model = _build_esm2(model_inputs(BUILTIN, tft.TFTransformOutput(tft_dir)))
    return model


def _build_esm2(inputs):
    """ESM² from model_inputs' (categorical, dense[, sequences]), seeded and called once on probe features."""
    from models import registry
    from models.keras import keras
    from serving.scoring_graph import probe_features

    keras.utils.set_random_seed(7)
    extra = {"sequences": inputs[2]} if len(inputs) > 2 else {}
    model = registry.build("esm2", inputs[0], inputs[1], registry.resolve_config("esm2", "default"), **extra)
    model(probe_features(model, batch=4), training=False)
    return model


def complete_rows(rows, contract):
    """Copies of ``rows`` with every serving column present (missing ones filled by dtype), for predict_raw."""
    sequences = {s.name for s in getattr(contract, "sequences", ())}
    fill = {"string": "x", "int64": 0, "float32": 0.0}
    out = []
    for row in rows:
        row = dict(row)
        for name in contract.serving_columns:
            if row.get(name) is None:
                row[name] = "" if name in sequences else fill[contract.raw_dtype(name)]
        out.append(row)
    return out


@pytest.fixture(scope="session")
def served_export(e2e_run, esm2_model, raw_rows, tmp_path_factory):
    """{'base', 'model_name', 'version_dir', 'examples'}: a version exported with warmup examples."""
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from transforms.features import BUILTIN

    tft_dir = os.path.join(e2e_run["work_dir"], "preprocessed", "transform_fn_output")
    base = str(tmp_path_factory.mktemp("served"))
    examples = serialize_rows(raw_rows, BUILTIN)
    version_dir = export_saved_model(esm2_model, tft_dir, BUILTIN, base, "esm2", warmup_examples=examples)
    return {"base": base, "model_name": "esm2", "version_dir": version_dir, "examples": examples,
            "tft_dir": tft_dir}


@pytest.fixture(scope="session")
def loaded_export(served_export):
    import tensorflow as tf

    return tf.saved_model.load(served_export["version_dir"])
