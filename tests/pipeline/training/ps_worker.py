"""Subprocess side of tests/pipeline/training/test_parameter_server{,_models}.py.

    python -m tests.pipeline.training.ps_worker models PREPROCESSED_DIR DATA_GLOB OUT_JSON MODEL...  # PS chief
    python -m tests.pipeline.training.ps_worker v1score EXPORT_DIR EXAMPLES_JSON OUT_JSON

``models``: under ``TF_CONFIG`` (the chief of ``pipeline.cluster``'s cluster), trains each registry model for one
step with ``--strategy parameter_server`` on built-in data (DATA_GLOB) preprocessed into PREPROCESSED_DIR (the
pipeline's own contract binding; ``musenet:kmeans++`` = MUSENET with k-means++ prototype seeding), and records per model: steps run, losses, where the variables live, and the
training-only state some models keep (STAN's Beta state, MUSENET's k-means++ seeding).
``v1score``: loads a SavedModel the way TF Serving does (``tf.compat.v1`` loader, tag ``serve``, one Session) and
runs ``serving_default`` on serialized tf.Examples (base64 in EXAMPLES_JSON).
"""
from __future__ import annotations

import base64
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

MIN_SHARD_BYTES = 1024  # small tables must split too: this test's tables are a few KiB


def _state(model) -> dict:
    """Training-only state (STAN: sums of its Beta state ``stage/{alpha,beta,count,position_sum}``; MUSENET:
    whether k-means++ seeded the prototypes)."""
    out = {}
    stage = getattr(model, "stage", None)
    for v in getattr(stage, "variables", []):
        out["stage/" + v.name.split(":")[0].split("/")[-1]] = float(np.sum(v.numpy()))
    for v in model.variables:
        if v.name.split(":")[0].endswith("prototypes_seeded"):
            out[v.name.split(":")[0]] = bool(v.numpy())
    return out


def mode_models(pp, data_glob, out, names):
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import registry
    from pipeline.beam.preprocess import TRANSFORM_DIR, transformed_pattern
    from pipeline.training.train import TrainConfig, make_strategy, train_model
    from transforms.schema import builtin_schema_path, load_schema

    strategy = make_strategy("parameter_server", ps_min_shard_bytes=MIN_SHARD_BYTES)
    schema = load_schema(builtin_schema_path("builtin"), input_path=data_glob)
    tft_output = tft.TFTransformOutput(os.path.join(pp, TRANSFORM_DIR))
    results = {}
    for name in names:
        model_name, _, init = name.partition(":")  # "musenet:kmeans++": MUSENET with k-means++ prototype seeding
        # one step of 256 rows; the chief's evaluation of the e2e data's ~1,200 eval rows takes 5 batches
        cfg = registry.resolve_config(model_name, "default", {"batch_size": 256,
                                                              "prototype_init": init or None})
        info = {}
        model, history = train_model(model_name, cfg, schema.contract, tft_output, transformed_pattern(pp, "train"),
                                     transformed_pattern(pp, "eval"),
                                     TrainConfig(epochs=1, early_stopping_patience=0, strategy="parameter_server"),
                                     strategy=strategy, train_examples=cfg.batch_size, info=info)
        results[name] = {"steps_run": info["steps_run"], "history": history,
                         "variable_devices": info["variable_devices"], "state": _state(model),
                         "strategy": info["strategy"]}
        print(f"{name}: {info['steps_run']} steps, loss {history['loss']}", flush=True)
        with open(out, "w") as fh:  # after every model: a run cut short still tells which ones trained
            json.dump(results, fh)


def mode_v1score(export_dir, examples_json, out):
    import tensorflow as tf

    with open(examples_json) as fh:
        examples = [base64.b64decode(e) for e in json.load(fh)]
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
        sig = meta.signature_def["serving_default"]
        fetch = {k: v.name for k, v in sig.outputs.items()}
        scores = sess.run(fetch, {sig.inputs["examples"].name: np.array(examples, dtype=object)})
    with open(out, "w") as fh:
        json.dump({k: np.asarray(v).tolist() for k, v in scores.items()}, fh)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "models":
        mode_models(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif mode == "v1score":
        mode_v1score(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
