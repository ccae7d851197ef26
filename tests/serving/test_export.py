"""The exported SavedModel: signatures, equality with the Keras model, servability check, atomic publish,
concurrent exports, clean-up after crashed exports, and the remote (no atomic rename) publish path."""
import json
import os
import socket
import time
import uuid
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from serving import graph_check
from serving.client import raw_columns
from serving import export as export_mod
from serving.export import export_saved_model, next_version, publish_remote, remove_stale
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
    crashed = os.path.join(base, "esm2", ".tmp-crashed")  # a crashed export's temp dir: its writer is dead
    os.makedirs(crashed)
    _write_owner(os.path.join(crashed, "owner.json"), _dead_pid(), socket.gethostname(), time.time())
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
    from pipeline.training.train import model_inputs
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
    assert os.path.basename(os.path.dirname(tmp_written)).startswith(".tmp-")
    entries = os.listdir(base / "esm2")
    assert entries and all(e.startswith(".tmp-") for e in entries), entries  # only the hidden temp dir
    assert next_version(str(base / "esm2")) == 1
    # its writer is dead (owner.json names its pid on this host): the next export's clean-up removes it
    assert remove_stale(str(base / "esm2")) == entries
    assert os.listdir(base / "esm2") == []


def test_scorer_falls_back_to_keras_when_the_graph_cannot_reproduce_it(esm2_model, monkeypatch):
    from serving import export, scoring_graph

    assert isinstance(export.build_scorer(esm2_model, BUILTIN), scoring_graph.ESM2ScoringGraph)
    assert export.build_scorer(esm2_model, BUILTIN, optimize=False) is None
    real = scoring_graph.ESM2ScoringGraph.__call__

    def off_by_a_bit(self, features):
        return {k: v + 1e-3 for k, v in real(self, features).items()}

    monkeypatch.setattr(scoring_graph.ESM2ScoringGraph, "__call__", off_by_a_bit)
    assert export.build_scorer(esm2_model, BUILTIN) is None  # verification failed: serve the Keras model


def _dead_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def _write_owner(path, pid, host, started):
    with open(path, "w") as fh:
        json.dump({"pid": pid, "host": host, "started": started}, fh)


def test_remove_stale_removes_crashed_exports_only(tmp_path):
    """Stale = the recorded writer is a dead process of this host, or the entry is older than the threshold
    (another host's writer, no owner record); a reservation is also stale once its version is published."""
    model_dir = tmp_path / "esm2"
    model_dir.mkdir()
    host, now, day = socket.gethostname(), time.time(), 24 * 3600
    dead = _dead_pid()

    def tmp_dir(name, owner=None, age_s=0.0):
        d = model_dir / name
        d.mkdir()
        (d / "version").mkdir()
        if owner is not None:
            _write_owner(d / "owner.json", *owner)
        os.utime(d, (now - age_s, now - age_s))

    def reservation(name, owner):
        _write_owner(model_dir / name, *owner)

    tmp_dir(".tmp-dead", (dead, host, now))                          # crashed writer on this host
    tmp_dir(".tmp-alive", (os.getpid(), host, now - 2 * day))        # live writer (old start): kept ...
    tmp_dir(".tmp-other-host", (1, "elsewhere", now - 60))          # ... live on another host: kept
    tmp_dir(".tmp-other-host-old", (1, "elsewhere", now - 2 * day))  # another host, 2 days old
    tmp_dir(".tmp-3-0badc0de", None, age_s=2 * day)                  # an older rankline's, 2 days old
    tmp_dir(".tmp-fresh-no-owner", None, age_s=10)                   # owner not written yet: kept
    (model_dir / "3").mkdir()
    reservation(".reserve-3", (os.getpid(), host, now))              # version 3 is published
    reservation(".reserve-5", (dead, host, now))                     # crashed between claim and rename
    reservation(".reserve-7", (os.getpid(), host, now))              # being published right now
    (model_dir / "notes").mkdir()                                    # not ours: never touched
    # a live writer older than the threshold is removed by age (an export never takes a day)
    assert sorted(remove_stale(str(model_dir))) == sorted(
        [".tmp-dead", ".tmp-alive", ".tmp-other-host-old", ".tmp-3-0badc0de", ".reserve-3", ".reserve-5"])
    assert sorted(os.listdir(model_dir)) == sorted(
        [".tmp-other-host", ".tmp-fresh-no-owner", "3", ".reserve-7", "notes"])
    # a shorter threshold takes the young ownerless and foreign ones too, never a live writer of this host
    assert sorted(remove_stale(str(model_dir), stale_after_s=5)) == [".tmp-fresh-no-owner", ".tmp-other-host"]
    assert sorted(os.listdir(model_dir)) == sorted(["3", ".reserve-7", "notes"])


CONCURRENT_SCRIPT = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import tensorflow_transform as tft
    from pipeline.training.train import model_inputs
    from serving import export
    from tests.serving.conftest import _build_esm2
    from transforms.features import BUILTIN
    tft_dir, base, barrier, me = sys.argv[2:6]
    model = _build_esm2(model_inputs(BUILTIN, tft.TFTransformOutput(tft_dir)))
    real, picked = export.next_version, []

    def next_version_then_wait(model_dir):
        """Both processes pick a number before either publishes: they pick the same one."""
        picked.append(real(model_dir))
        open(os.path.join(barrier, me), "w").close()
        deadline = time.time() + 240
        while len(os.listdir(barrier)) < 2:
            if time.time() > deadline:
                raise SystemExit("barrier: the other export never got here")
            time.sleep(0.02)
        return picked[-1]

    export.next_version = next_version_then_wait
    path = export.export_saved_model(model, tft_dir, BUILTIN, base, "esm2")
    print("RESULT", picked[0], path)
''')


def test_two_processes_exporting_at_once_get_distinct_complete_versions(served_export, loaded_export, tmp_path):
    """Two real processes export to one base and both pick version 1 before either publishes: one publishes
    1, the other finds the claim (or the version) taken and publishes 2; both versions are complete."""
    base, barrier = tmp_path / "export", tmp_path / "barrier"
    base.mkdir()
    barrier.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, repo, served_export["tft_dir"], str(base),
                               str(barrier), name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=400))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    results = [next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")) for out, _ in outs]
    assert [r[0] for r in results] == ["1", "1"]  # the same number was picked by both
    model_dir = base / "esm2"
    assert sorted(r[1] for r in results) == [str(model_dir / "1"), str(model_dir / "2")]
    assert sorted(os.listdir(model_dir)) == ["1", "2"]  # no temp dir or claim left behind
    examples = tf.constant(served_export["examples"])
    want = loaded_export.signatures["serving_default"](examples=examples)  # the same seeded ESM²
    for version in ("1", "2"):
        assert graph_check.find_problems(str(model_dir / version)) == []
        got = tf.saved_model.load(str(model_dir / version)).signatures["serving_default"](examples=examples)
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=f"{version}/{name}")


def _read_all(root, relpaths):
    """{relative path: bytes} of the given files under ``root`` (any tf.io.gfile filesystem)."""
    out = {}
    for rel in relpaths:
        with tf.io.gfile.GFile(os.path.join(root, rel), "rb") as fh:
            out[rel] = fh.read()
    return out


def test_remote_publish_on_ram_filesystem_copies_everything_then_returns_the_version(served_export):
    """ram:// (tf.io.gfile, no atomic rename; its rename of a directory does not even move the files, and
    it lists ``assets.extra`` as ``assets/.extra``): the published version holds every byte of the source,
    nothing else is left in the model directory, and numbers go on."""
    src = served_export["version_dir"]
    model_dir = f"ram://rankline-{uuid.uuid4().hex[:8]}/esm2"
    want = {}
    for dirpath, _, names in os.walk(src):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                want[os.path.relpath(os.path.join(dirpath, name), src)] = fh.read()
    assert "saved_model.pb" in want and any(k.startswith("variables") for k in want)
    assert publish_remote(src, model_dir) == 1
    assert _read_all(f"{model_dir}/1", want) == want
    assert publish_remote(src, model_dir) == 2
    assert sorted(n.rstrip("/") for n in tf.io.gfile.listdir(model_dir)) == ["1", "2"]
    with pytest.raises(FileExistsError, match="version 2 .* already exists"):
        publish_remote(src, model_dir, version=2)
    assert publish_remote(src, model_dir, version=7) == 7
    assert _read_all(f"{model_dir}/7", want) == want
    assert sorted(n.rstrip("/") for n in tf.io.gfile.listdir(model_dir)) == ["1", "2", "7"]


def test_remote_publish_never_shows_a_version_before_it_returns_it(served_export, tmp_path, monkeypatch):
    """Every file copy is watched: while the files go to the hidden staging copy no numeric child exists;
    ``<N>`` fills up file by file (not atomic: why the caller adds N to a ``specific`` policy only after
    the call returns); a failure in the middle leaves neither ``<N>`` nor the staging copy, and no number."""
    src = served_export["version_dir"]
    n_files = sum(len(names) for _, _, names in os.walk(src))
    model_dir = str(tmp_path / "remote" / "esm2")
    real_copy, seen = tf.io.gfile.copy, []

    def watched_copy(a, b, overwrite=False):
        numeric = {n: sum(len(f) for _, _, f in os.walk(os.path.join(model_dir, n)))
                   for n in os.listdir(model_dir) if n.isdigit()}
        seen.append((os.path.relpath(b, model_dir).split(os.sep)[0], numeric))
        if fail_at is not None and len(seen) == fail_at:
            raise tf.errors.UnavailableError(None, None, "injected: connection reset")
        return real_copy(a, b, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", watched_copy)
    for fail_at in (n_files // 2, n_files + n_files // 2):  # in the staging copy, then in the version copy
        seen.clear()
        with pytest.raises(tf.errors.UnavailableError, match="injected"):
            publish_remote(src, model_dir)
        assert os.listdir(model_dir) == []
    fail_at = None
    seen.clear()
    assert publish_remote(src, model_dir) == 1
    assert len(seen) == 2 * n_files
    staging = {dest for dest, _ in seen[:n_files]}
    assert len(staging) == 1 and staging.pop().startswith(".tmp-")
    assert all(numeric == {} for _, numeric in seen[:n_files])
    assert {dest for dest, _ in seen[n_files:]} == {"1"}
    # <N> exists during the call with k of its files before the k-th copy: partial, hence the contract
    assert [numeric for _, numeric in seen[n_files:]] == [{"1": k} for k in range(n_files)]
    assert os.listdir(model_dir) == ["1"]


def test_export_to_a_remote_base_scores_like_the_local_export(esm2_model, served_export, loaded_export, tmp_path):
    """``remote=True`` on a local path runs the remote path end to end (local write and check, gfile copy)."""
    base = str(tmp_path / "bucket")
    path = export_saved_model(esm2_model, served_export["tft_dir"], BUILTIN, base, "esm2", remote=True)
    assert path == os.path.join(base, "esm2", "1") and os.listdir(os.path.join(base, "esm2")) == ["1"]
    examples = tf.constant(served_export["examples"])
    want = loaded_export.signatures["serving_default"](examples=examples)
    got = tf.saved_model.load(path).signatures["serving_default"](examples=examples)
    for name in want:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)
    assert export_mod.is_remote("gs://bucket/models") and not export_mod.is_remote(base)


def test_local_export_fsyncs_the_new_directories_and_the_rename(esm2_model, served_export, tmp_path, monkeypatch):
    """A crash right after the export must not lose the new version: the parents of the directories the
    export created (the export base and its own parent here) and the model directory after the rename
    (when it lists the version) are fsynced."""
    base = tmp_path / "new" / "base"
    synced = []
    real = export_mod._fsync_path

    def recording(path):
        model_dir = base / "esm2"
        synced.append((os.path.abspath(path), sorted(os.listdir(model_dir)) if model_dir.is_dir() else None))
        real(path)

    monkeypatch.setattr(export_mod, "_fsync_path", recording)
    path = export_saved_model(esm2_model, served_export["tft_dir"], BUILTIN, str(base), "esm2", check=False)
    assert path == str(base / "esm2" / "1")
    dirs = [p for p, _ in synced]
    assert str(tmp_path) in dirs and str(tmp_path / "new") in dirs and str(base) in dirs  # new entries' parents
    assert any(p == str(base / "esm2") and "1" in listing for p, listing in synced)   # after the rename
    version_files = [p for p in dirs if p.startswith(str(base / "esm2") + os.sep)]
    assert any(p.endswith("saved_model.pb") for p in version_files)                  # the files themselves
