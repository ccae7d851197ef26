"""MUSENET through the pipeline stages on the shared preprocessed fixture: train -> evaluate (NMI of its
scenarios) -> export -> score raw examples, with the extra [B, K] and [B] outputs served."""
import os

import numpy as np
import tensorflow as tf


def test_musenet_trains_evaluates_exports_and_serves_its_extra_outputs(e2e_run, tmp_path):
    import tensorflow_transform as tft

    from models import registry
    from pipeline.evaluation import evaluate as ev
    from pipeline.beam.preprocess import TRANSFORM_DIR, transformed_pattern
    from pipeline.run import sample_canonical_rows
    from pipeline.training.train import TrainConfig, train_model
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from serving.score import score_saved_model
    from transforms.schema import builtin_schema_path, load_schema

    pp = os.path.join(e2e_run["work_dir"], "preprocessed")
    schema = load_schema(builtin_schema_path("builtin"),
                         input_path=os.path.join(e2e_run["summary"]["input"]["dir"], "part-*.parquet"))
    contract = schema.contract
    tft_dir = os.path.join(pp, TRANSFORM_DIR)
    tft_output = tft.TFTransformOutput(tft_dir)
    cfg = registry.resolve_config("musenet", "default", {"batch_size": 512})
    model, history = train_model("musenet", cfg, contract, tft_output, transformed_pattern(pp, "train"),
                                 transformed_pattern(pp, "eval"), TrainConfig(epochs=1))
    assert "uf_history_seq" in model.config.intention_inputs and np.isfinite(history["loss"][0])

    report = ev.evaluate(*ev.collect(model, contract, tft_output, transformed_pattern(pp, "eval")))
    assert 0.5 < report["ctr"]["auc"] <= 1.0
    assert 0.0 <= report["scenario"]["nmi"] <= 1.0 and report["scenario"]["clusters_true"] == 4
    assert "scenario: NMI" in ev.format_report(report)

    rows = sample_canonical_rows(schema, 16)
    examples = serialize_rows(rows, contract)
    path = export_saved_model(model, tft_dir, contract, str(tmp_path), "musenet", warmup_examples=examples)
    scored = score_saved_model(path, examples)
    assert set(scored) == {"ctr", "scenario", "repeat_intention"}
    assert scored["ctr"].shape == (16,) and scored["repeat_intention"].shape == (16,)
    assert scored["scenario"].shape == (16, 4)
    np.testing.assert_allclose(scored["scenario"].sum(1), 1.0, rtol=1e-5)
    # the served numbers are the Keras model's on the same transformed features
    loaded = tf.saved_model.load(path)
    feats = loaded.signatures["transform_features"](examples=tf.constant(examples))
    expected = model(feats, training=False)
    for name, value in scored.items():
        np.testing.assert_allclose(value, np.squeeze(expected[name].numpy(), -1) if value.ndim == 1
                                   else expected[name].numpy(), rtol=1e-5, atol=1e-6)


def test_run_summary_prints_one_column_per_flat_output(capsys):
    from pipeline.run import _print_summary

    summary = {"preprocess": {"rows_in": 2, "rows_train": 1, "rows_eval": 1, "rows_test": 0, "rows_rejected": 0},
               "model": "musenet", "export": "/x", "timings_s": {}, "total_s": 0.0,
               "scored": {"ctr": [0.1, 0.2], "scenario": [[0.5, 0.5], [0.9, 0.1]], "repeat_intention": [0.3, 0.4]}}
    _print_summary(summary, "")
    out = capsys.readouterr().out
    assert "ctr  repeat_intention" in out and "scenario" not in out.split("scored raw")[1]
