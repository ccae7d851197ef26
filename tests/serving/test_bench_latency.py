"""serving.bench_latency: the Session engine runs a SavedModel's signature as TF Serving does (v1 loader +
Session::Run of the signature's tensors) and gives the signature call's values; the table's ratios per engine."""
import numpy as np
import pytest
import tensorflow as tf

from serving.bench_latency import SessionRunner, format_table, main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A SavedModel whose signature takes ids [B, 1] int64 and x [B, 2] float32 and returns two outputs
    (one using a variable, so a restore that missed variables would show)."""
    module = tf.Module()
    module.w = tf.Variable([[2.0], [-1.0]])
    module.table = tf.Variable(np.arange(10, dtype=np.float32)[:, None] * 0.5)

    @tf.function(input_signature=[{"ids": tf.TensorSpec([None, 1], tf.int64, name="ids"),
                                   "x": tf.TensorSpec([None, 2], tf.float32, name="x")}])
    def serve(features):
        score = tf.matmul(features["x"], module.w) + tf.gather(module.table, features["ids"][:, 0])
        return {"score": tf.reshape(score, [-1]), "prob": tf.reshape(tf.sigmoid(score), [-1])}

    module.serve = serve
    path = str(tmp_path_factory.mktemp("sm") / "1")
    tf.saved_model.save(module, path, signatures={"serving_default": serve.get_concrete_function()})
    return path


def test_session_runner_gives_the_signature_values(saved_model):
    ids = np.array([[0], [3], [9]], np.int64)
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-3.0, 0.25]], np.float32)
    want_score = x @ np.array([2.0, -1.0], np.float32) + 0.5 * ids[:, 0]  # worked out by hand: w and table
    runner = SessionRunner(saved_model)
    try:
        assert runner.inputs == ["ids", "x"] and runner.outputs == ["prob", "score"]
        got = runner(ids=ids, x=x)
        np.testing.assert_allclose(got["score"], want_score, rtol=1e-6)
        np.testing.assert_allclose(got["prob"], 1 / (1 + np.exp(-want_score)), rtol=1e-6)
        eager = tf.saved_model.load(saved_model).signatures["serving_default"](ids=tf.constant(ids), x=tf.constant(x))
        for k in ("score", "prob"):
            np.testing.assert_allclose(got[k], eager[k].numpy(), rtol=1e-6)
        with pytest.raises(KeyError, match="x"):
            runner(ids=ids)
    finally:
        runner.close()


def test_table_gives_ratios_per_engine():
    results = {"naive": {200: (10.0, 20.0)}, "rankline": {200: (6.0, 11.0)},
               "naive/sess": {200: (8.0, 16.0)}, "rankline/sess": {200: (4.0, 12.0)}}
    cpu = {"naive": {200: 9.0}, "rankline": {200: 6.3}, "naive/sess": {200: 8.0}, "rankline/sess": {200: 4.8}}
    head, row = format_table(results, [200], cpu).splitlines()
    assert "sess p99 ratio" in head and "sess cpu ratio" in head
    # per variant p50, p99; ratios (signature engine, then session engine); CPU per variant; CPU ratios
    assert [float(v) for v in row.split()] == pytest.approx(
        [200, 10, 20, 6, 11, 8, 16, 4, 12, 0.60, 0.55, 0.50, 0.75, 9, 6.3, 8, 4.8, 0.70, 0.60], abs=0.006)
    # one engine only: no ratio of the other
    head = format_table({"naive/sess": results["naive/sess"], "rankline/sess": results["rankline/sess"]}, [200])
    assert "sess p99 ratio" in head and " p99 ratio" not in head.replace("sess p99 ratio", "")


def test_command_checks_both_engines_against_each_other(capsys):
    """Small towers, few reps: every variant (both engines) must reproduce the naive export's outputs
    before timing (bench_in_process asserts it), then the table has both engines' ratios."""
    assert main(["--preset", "default", "--sizes", "3", "--reps", "10", "--engine", "both"]) == 0
    out = capsys.readouterr().out
    assert "naive/sess p50" in out and "rankline/sess p99" in out and "sess cpu ratio" in out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "3" and all(float(v) > 0 for v in row[1:])
