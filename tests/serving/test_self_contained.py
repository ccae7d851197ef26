"""The exported SavedModel needs neither this project nor the transform output directory: a process that
cannot import either scores raw tf.Examples exactly as this process does running the signature the way TF
Serving does (a TF1 Session on the SignatureDef's tensor names)."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq

from serving.examples import serialize_rows
from transforms.features import BUILTIN

BLOCKED = ["models", "pipeline", "transforms", "serving", "tests", "tensorflow_transform", "tfx_bsl",
           "apache_beam", "tf_keras", "tensorflow_recommenders"]

SCRIPT = textwrap.dedent('''
    import sys
    BLOCKED = set(sys.argv[3].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    sys.path = [p for p in sys.path if p and p.rstrip('/') != sys.argv[4].rstrip('/')]
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is importable")
    import numpy as np
    import tensorflow as tf
    examples = open(sys.argv[2], "rb").read().split(b"\\n--\\n")
    model = tf.saved_model.load(sys.argv[1])
    out = model.signatures["serving_default"](examples=tf.constant(examples))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    arr = {k: v.numpy() for k, v in out.items()}
    np.save(sys.argv[5], arr, allow_pickle=True)
''')


def test_savedmodel_scores_in_a_process_without_project_or_transform_dir(e2e_run, tmp_path):
    work = e2e_run["work_dir"]
    export = shutil.copytree(e2e_run["summary"]["export"], str(tmp_path / "model" / "1"))
    tft_dir = os.path.join(work, "preprocessed", "transform_fn_output")
    os.rename(tft_dir, tft_dir + ".away")  # the transform output is gone while the model is loaded
    try:
        _score_in_clean_process(e2e_run, export, tmp_path)
    finally:
        os.rename(tft_dir + ".away", tft_dir)


def _score_in_clean_process(e2e_run, export, tmp_path):
    data_dir = e2e_run["summary"]["input"]["dir"]
    table = pq.read_table(os.path.join(data_dir, "part-00000.parquet")).slice(0, 6)
    rows = table.to_pylist()
    rows[0]["item_price"] = None  # a missing value travels as an absent feature
    blob = b"\n--\n".join(serialize_rows(rows, BUILTIN))
    assert all(b"\n--\n" not in e for e in serialize_rows(rows, BUILTIN))
    (tmp_path / "examples.bin").write_bytes(blob)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out_file = str(tmp_path / "scores.npy")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, export, str(tmp_path / "examples.bin"), ",".join(BLOCKED),
                           repo, out_file], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.load(out_file, allow_pickle=True).item()
    want = _session_scores(export, serialize_rows(rows, BUILTIN))
    assert set(scores) == set(want) == {"ctr", "ctavr", "cvr", "ctcvr"}
    for name, value in want.items():
        assert value.shape == (6,) and scores[name].shape == (6,)
        np.testing.assert_allclose(scores[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert len(np.unique(want["ctr"])) == 6  # six different rows, six different scores: the order is checked


def _session_scores(export, examples):
    """{output: [B]} of ``serving_default`` run as TF Serving runs it: load the MetaGraph into a TF1 Session
    and feed/fetch the SignatureDef's tensor names (no tf.function / Python object graph involved)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export)
        signature = meta.signature_def["serving_default"]
        fetches = {name: info.name for name, info in signature.outputs.items()}
        return sess.run(fetches, {signature.inputs["examples"].name: examples})
