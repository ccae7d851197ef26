"""The exported SavedModel: signatures, equality with the Keras model, servability check, atomic publish."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from serving import graph_check
from serving.client import raw_columns
from serving.export import export_saved_model, next_version
from serving.warmup import read_warmup_file, warmup_path
from tests.serving.conftest import complete_rows
from transforms.features import BUILTIN


def test_signatures_outputs_match_keras_model(loaded_export, served_export, esm2_model):
    sigs = loaded_export.signatures
    assert hasattr(loaded_export, "scorer") and not hasattr(loaded_export, "model")  # the optimised ESM² graph
    assert {"serving_default", "predict_raw", "transform_features"} <= set(sigs)
    examples = tf.constant(served_export["examples"])
    scores = sigs["serving_default"](examples=examples)
    assert set(scores) == {"ctr", "ctavr", "cvr", "ctcvr"}
    transformed = sigs["transform_features"](examples=examples)
    assert set(transformed) == set(BUILTIN.model_feature_names())
    assert {k: v.shape[0] for k, v in transformed.items()} == {k: 32 for k in transformed}
    want = esm2_model(dict(transformed), training=False)
    for name, got in scores.items():
        assert got.shape == (32,)
        np.testing.assert_allclose(got.numpy(), want[name].numpy().ravel(), rtol=1e-5, atol=1e-6, err_msg=name)
    # ESM² structure survives the optimised graph: ctcvr = ctr * cvr, ctavr <= ctr
    np.testing.assert_allclose(scores["ctcvr"].numpy(), scores["ctr"].numpy() * scores["cvr"].numpy(), rtol=1e-5)
    assert np.all(scores["ctavr"].numpy() <= scores["ctr"].numpy() + 1e-7)


def test_predict_raw_equals_serving_default(loaded_export, raw_rows):
    from serving.examples import serialize_rows

    rows = complete_rows(raw_rows[:10], BUILTIN)
    cols = raw_columns(rows, BUILTIN)
    assert set(cols) == set(BUILTIN.serving_columns) and all(v.shape == (10,) for v in cols.values())
    raw = loaded_export.signatures["predict_raw"](**{k: tf.constant(v) for k, v in cols.items()})
    ref = loaded_export.signatures["serving_default"](examples=tf.constant(serialize_rows(rows, BUILTIN)))
    for name in ref:
        np.testing.assert_allclose(raw[name].numpy(), ref[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    rows[2]["item_price"] = None  # only serving_default can carry a missing value
    with pytest.raises(ValueError, match=r"column 'item_price' is missing in row\(s\) \[2\]"):
        raw_columns(rows, BUILTIN)


def test_warmup_records_parse_and_replay(served_export, loaded_export):
    records = read_warmup_file(warmup_path(served_export["version_dir"]))
    assert [len(r.predict_log.request.inputs["examples"].string_val) for r in records] == [1, 16, 32]
    fn = loaded_export.signatures["serving_default"]
    full = fn(examples=tf.constant(served_export["examples"]))
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "esm2" and request.model_spec.signature_name == "serving_default"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = fn(**inputs)
        n = inputs["examples"].shape[0]
        assert list(inputs["examples"].numpy()) == served_export["examples"][:n]
        for name in out:
            np.testing.assert_allclose(out[name].numpy(), full[name].numpy()[:n], rtol=1e-6)


def test_export_passes_servability_check(served_export, e2e_run):
    assert graph_check.find_problems(served_export["version_dir"]) == []
    assert graph_check.find_problems(e2e_run["summary"]["export"]) == []


class _PyFuncModule(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def f(self, x):
        with tf.device("/device:GPU:0"):
            y = x * 2.0
        return {"y": tf.py_function(lambda a: a + 1.0, [y], tf.float32)}


def test_check_rejects_python_ops_placement_and_unknown_ops(tmp_path):
    module = _PyFuncModule()
    path = str(tmp_path / "bad")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f.get_concrete_function()})
    problems = graph_check.find_problems(path)
    ops = {p.op for p in problems}
    assert "EagerPyFunc" in ops, problems
    assert any("hard device placement" in p.reason and "GPU" in p.reason for p in problems), problems
    # an op no TensorFlow registers (as a custom op library would leave behind)
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    sm.ParseFromString(open(pb, "rb").read())
    node = next(n for f in sm.meta_graphs[0].graph_def.library.function for n in f.node_def if n.op == "Mul")
    node.op = "RanklineNoSuchOp"
    open(pb, "wb").write(sm.SerializeToString())
    with pytest.raises(graph_check.ServabilityError, match="RanklineNoSuchOp.*not registered"):
        graph_check.check_servable(path)


def test_failed_publish_leaves_no_version(served_export, esm2_model, raw_rows, tmp_path, monkeypatch):
    """A check failure after the files are written: nothing published, temp dir removed."""
    base = str(tmp_path / "export")
    monkeypatch.setattr(graph_check, "find_problems",
                        lambda d: [graph_check.Problem("graph", "n", "PyFunc", "injected for the test")])
    with pytest.raises(graph_check.ServabilityError, match="injected"):
        export_saved_model(esm2_model, served_export["tft_dir"], BUILTIN, base, "esm2",
                           warmup_examples=served_export["examples"][:4])
    assert os.listdir(os.path.join(base, "esm2")) == []
    assert next_version(os.path.join(base, "esm2")) == 1


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import tensorflow as tf
    import tensorflow_transform as tft
    from pipeline.train import model_inputs
    from serving.export import export_saved_model
    from tests.serving.conftest import _build_esm2
    from transforms.features import BUILTIN
    model = _build_esm2(model_inputs(BUILTIN, tft.TFTransformOutput(sys.argv[2])))
    real_save = tf.saved_model.save
    def save_then_die(obj, path, **kw):
        real_save(obj, path, **kw)                      # the version's files are on disk, not yet renamed
        open(os.path.join(sys.argv[3], "saved"), "w").write(path)
        os.kill(os.getpid(), signal.SIGKILL)
    tf.saved_model.save = save_then_die
    export_saved_model(model, sys.argv[2], BUILTIN, sys.argv[3], "esm2")
''')


def test_publish_killed_mid_write_never_shows_a_version(served_export, tmp_path):
    base = tmp_path / "export"
    base.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, repo, served_export["tft_dir"], str(base)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    tmp_written = (base / "saved").read_text()
    assert os.path.basename(tmp_written).startswith(".tmp-")
    entries = os.listdir(base / "esm2")
    assert entries and all(not e.isdigit() for e in entries), entries  # only the hidden temp dir
    assert next_version(str(base / "esm2")) == 1


def test_scorer_falls_back_to_keras_when_the_graph_cannot_reproduce_it(esm2_model, monkeypatch):
    from serving import export, scoring_graph

    assert isinstance(export.build_scorer(esm2_model, BUILTIN), scoring_graph.ESM2ScoringGraph)
    assert export.build_scorer(esm2_model, BUILTIN, optimize=False) is None
    real = scoring_graph.ESM2ScoringGraph.__call__

    def off_by_a_bit(self, features):
        return {k: v + 1e-3 for k, v in real(self, features).items()}

    monkeypatch.setattr(scoring_graph.ESM2ScoringGraph, "__call__", off_by_a_bit)
    assert export.build_scorer(esm2_model, BUILTIN) is None  # verification failed: serve the Keras model
