"""The gRPC client against the stand-in TF Serving (tests/serving/fake_tf_serving.py) and against small
purpose-built servicers (a hanging GetModelStatus, a slow UNAVAILABLE, versions that failed to load) on
127.0.0.1. Scores are compared with values computed without the stand-in: the SavedModel restored by the v1
loader into a fresh Session (what TF Serving runs), itself checked against the Keras model."""
import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from serving.client import ServingError, SignatureMismatch, TFServingClient
from tests.serving.fake_tf_serving import FakeTFServing
from transforms.features import BUILTIN

USER_FIELDS = ("user_id", "user_gender", "user_age", "user_city", "user_power", "user_orders_90d", "segment",
               "device", "page", "timestamp")
SLACK_S = 1.0  # scheduling slack on a loaded 2-core machine; every bound below is deadline + SLACK_S


# ---- references computed without the stand-in ---------------------------------------------------
_SESSIONS = {}


def session_run(path, feeds, signature="serving_default"):
    """{output: ndarray} of ``signature`` of the SavedModel at ``path``, as TF Serving computes it: the v1
    loader restores the graph into its own Session and one Session.run feeds the signature's input tensors."""
    if path not in _SESSIONS:
        graph = tf.Graph()
        sess = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        _SESSIONS[path] = (sess, meta.signature_def)
    sess, sigs = _SESSIONS[path]
    sig = sigs[signature]
    return sess.run({k: v.name for k, v in sig.outputs.items()},
                    {sig.inputs[k].name: np.asarray(v) for k, v in feeds.items()})


def reference_scores(path, examples):
    return session_run(path, {"examples": np.array(examples, dtype=object)})


def save_tiny_model(path, input_name, weight, bias=0.0):
    """A SavedModel whose ``serving_default`` takes one float32 [B] input named ``input_name`` and returns
    {"score": weight * x + bias} (float32 [B]): scores known exactly, signatures that differ by input name."""
    fn = tf.function(lambda **kw: {"score": kw[input_name] * weight + bias}).get_concrete_function(
        **{input_name: tf.TensorSpec([None], tf.float32, name=input_name)})
    tf.saved_model.save(tf.Module(), str(path), signatures={"serving_default": fn})
    return str(path)


def f32(*values):
    return np.array(values, np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{1: dir of score = 2a + 1 (input 'a'), 2: dir of score = 10b (input 'b')}."""
    base = tmp_path_factory.mktemp("tiny")
    return {1: save_tiny_model(base / "1", "a", 2.0, 1.0), 2: save_tiny_model(base / "2", "b", 10.0)}


# ---- purpose-built servicers ---------------------------------------------------------------------
class Scripted(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus / Predict answered by the given functions (request, context) -> response; ``release``
    ends any sleep at shutdown, so every handler thread finishes in bounded time."""

    def __init__(self, status=None, predict=None):
        self.status_fn, self.predict_fn = status, predict
        self.release = threading.Event()
        self.calls = {"GetModelStatus": 0, "Predict": 0}

    def GetModelStatus(self, request, context):  # noqa: N802  (gRPC method name)
        self.calls["GetModelStatus"] += 1
        return self.status_fn(request, context)

    def Predict(self, request, context):  # noqa: N802
        self.calls["Predict"] += 1
        return self.predict_fn(request, context)


class serve_scripted:  # noqa: N801  (a context manager used like a function)
    def __init__(self, servicer):
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self):
        self.server.start()
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.servicer.release.set()
        self.server.stop(0).wait(5)


def _status_response(*versions):
    """GetModelStatusResponse from (version, state name, error message) triples."""
    response = get_model_status_pb2.GetModelStatusResponse()
    states = get_model_status_pb2.ModelVersionStatus.State
    for v, state, error in versions:
        status = response.model_version_status.add(version=v, state=states.Value(state))
        if error:
            status.status.error_code = 3  # tensorflow.error.INVALID_ARGUMENT
            status.status.error_message = error
    return response


# ---- stand-in with the e2e exports ---------------------------------------------------------------
@pytest.fixture(scope="module")
def versions(served_export, e2e_run):
    """Version 1: the random-weight export (stable); version 2: the e2e run's trained export (canary)."""
    return {1: served_export["version_dir"], 2: e2e_run["summary"]["export"]}


def wait_all_available(srv, model, versions, timeout_s=120):
    """Until every listed version is AVAILABLE (the stand-in's start() waits for the newest one only)."""
    for v in versions:
        with TFServingClient(srv.target, model, version=v) as client:
            client.wait_until_available(timeout_s=timeout_s, poll_s=0.05)


def move_label(srv, model, label, version):
    """Points ``label`` at ``version`` with HandleReloadConfigRequest (an empty base_path keeps the stand-in's
    fixed versions), as an operator does with TF Serving's --model_config_file."""
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.config.add(name=model, model_platform="tensorflow").version_labels[label] = \
        version
    with grpc.insecure_channel(srv.target) as channel:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=30)


@pytest.fixture(scope="module")
def server(versions):
    srv = FakeTFServing({"esm2": versions}, labels={"esm2": {"stable": 1, "canary": 2}},
                        allow_version_labels_for_unavailable_models=True).start()
    try:
        wait_all_available(srv, "esm2", versions)
        yield srv
    finally:
        srv.stop(0)


def _assert_scores(got, want):
    assert set(got) == set(want) == {"ctr", "ctavr", "cvr", "ctcvr"}
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_reference_is_the_keras_model(versions, served_export, esm2_model):
    """The Session reference of version 1 equals the Keras model on the export's own transformed features."""
    examples = np.array(served_export["examples"], dtype=object)
    transformed = session_run(versions[1], {"examples": examples}, "transform_features")
    want = esm2_model({k: tf.constant(v) for k, v in transformed.items()}, training=False)
    got = reference_scores(versions[1], examples)
    for name in ("ctr", "ctavr", "cvr", "ctcvr"):
        np.testing.assert_allclose(got[name], want[name].numpy().ravel(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_grpc_scores_equal_session_scores(server, versions, served_export):
    examples = served_export["examples"]
    with TFServingClient(server.target, "esm2") as client:
        assert client.wait_until_available(timeout_s=5) == 2  # latest
        _assert_scores(client.score_examples(examples), reference_scores(versions[2], examples))
    for kwargs, v in (({"version": 1}, 1), ({"version_label": "stable"}, 1), ({"version_label": "canary"}, 2)):
        with TFServingClient(server.target, "esm2", **kwargs) as client:
            _assert_scores(client.score_examples([tf.train.Example.FromString(e) for e in examples]),
                           reference_scores(versions[v], examples))
    a, b = reference_scores(versions[1], examples), reference_scores(versions[2], examples)
    assert np.max(np.abs(a["ctr"] - b["ctr"])) > 1e-3  # the two versions really differ


def test_score_one_user_against_candidates(server, versions, raw_rows):
    from serving.examples import serialize_rows
    from tests.serving.conftest import complete_rows

    user = {k: raw_rows[0][k] for k in USER_FIELDS}
    user = complete_rows([user], BUILTIN)[0]
    user = {k: v for k, v in user.items() if k in USER_FIELDS or (k.startswith("uf_") and "item" not in k)}
    candidates = [{k: v for k, v in r.items() if k.startswith("item_") or k == "uf_item_in_history"}
                  for r in complete_rows(raw_rows[4:16], BUILTIN)]
    rows = [{**user, **c} for c in candidates]
    want = reference_scores(versions[1], serialize_rows(rows, BUILTIN))
    with TFServingClient(server.target, "esm2", version=1) as client:
        _assert_scores(client.score_candidates(user, candidates, BUILTIN), want)
        _assert_scores(client.score_candidates(user, candidates, BUILTIN, signature="predict_raw"), want)
        with pytest.raises(ValueError, match=r"candidate 0: field\(s\) \['user_id'\]"):
            client.score_candidates(user, [{**candidates[0], "user_id": -5}], BUILTIN)


def test_requests_are_chunked_at_max_batch_size(versions, raw_rows):
    """The server batches at most 4 rows (TF Serving's --enable_batching max_batch_size) and refuses 10; a
    client with max_batch_size=4 sends Predicts of 4, 4 and 2 rows whose scores, concatenated in order, equal
    one unchunked Session run of all 10 (both signatures)."""
    from serving.examples import serialize_rows
    from tests.serving.conftest import complete_rows

    rows = complete_rows(raw_rows[:10], BUILTIN)
    user = {k: rows[0][k] for k in rows[0] if k in USER_FIELDS or (k.startswith("uf_") and "item" not in k)}
    candidates = [{k: v for k, v in r.items() if k not in user} for r in rows]
    want = reference_scores(versions[1], serialize_rows([{**r, **user} for r in rows], BUILTIN))
    # warmup off: the export's warmup requests (up to 32 rows) would fail a 4-row batcher's load
    srv = FakeTFServing({"esm2": {1: versions[1]}}, max_batch_size=4, enable_model_warmup=False).start()
    try:
        with TFServingClient(srv.target, "esm2") as client:
            with pytest.raises(ServingError, match="Task size 10 is larger than maximum input batch size 4"):
                client.score_candidates(user, candidates, BUILTIN)
        with TFServingClient(srv.target, "esm2", max_batch_size=4) as client:
            for signature in ("serving_default", "predict_raw"):
                srv.batch_sizes.clear()
                _assert_scores(client.score_candidates(user, candidates, BUILTIN, signature=signature), want)
                assert srv.batch_sizes == [4, 4, 2], signature
            srv.batch_sizes.clear()
            client.score_examples(serialize_rows(rows[:4], BUILTIN))
            assert srv.batch_sizes == [4]  # not split when it fits
    finally:
        srv.stop(0)


def test_inputs_checked_against_metadata_before_sending(server, served_export):
    with TFServingClient(server.target, "esm2", version=1) as client:
        before = server.requests
        with pytest.raises(SignatureMismatch, match=r"missing input\(s\) \['examples'\].*unexpected input\(s\) \['rows'\]"):
            client.predict({"rows": np.array([b"x"], dtype=object)})
        with pytest.raises(SignatureMismatch, match="input 'examples': dtype DT_INT64, the model takes DT_STRING"):
            client.predict({"examples": np.array([1, 2], dtype=np.int64)})
        with pytest.raises(SignatureMismatch, match="input 'examples': rank 2"):
            client.predict({"examples": np.array([[b"a"]], dtype=object)})
        with pytest.raises(SignatureMismatch, match="no signature 'nope'.*predict_raw"):
            client.predict({"examples": np.array([b"a"], dtype=object)}, signature="nope")
        with pytest.raises(SignatureMismatch, match=r"predict_raw.*missing input\(s\)"):
            client.predict({"user_id": np.array([1], np.int64)}, signature="predict_raw")
        assert server.requests == before  # none of them reached Predict


def test_server_side_errors_are_clear_and_do_not_break_the_server(server, served_export):
    examples = served_export["examples"][:3]
    with TFServingClient(server.target, "esm2", version=1) as client:
        with pytest.raises(ServingError) as err:
            client.predict({"examples": np.array([b"a"], dtype=object)}, signature="nope", check=False)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "nope" in str(err.value)
        with pytest.raises(ServingError) as err:
            client.score_examples([b"definitely not a tf.Example"])  # ASCII: the stand-in answers INTERNAL to 0xff bytes
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1
        with pytest.raises(ServingError) as err:
            client.predict({"wrong": np.array([b"a"], dtype=object)}, check=False)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "wrong" in err.value.details
        assert client.score_examples(examples)["ctr"].shape == (3,)  # still serving
    with TFServingClient(server.target, "esm2", version=9) as client:
        with pytest.raises(ServingError, match="Specific\\(esm2, 9\\)") as err:
            client.score_examples(examples)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with TFServingClient(server.target, "esm2", version_label="beta") as client:
        with pytest.raises(ServingError, match="Unrecognized servable version label: beta") as err:
            client.score_examples(examples)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with TFServingClient(server.target, "nosuchmodel") as client:
        with pytest.raises(ServingError) as err:
            client.model_status()
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_score_cli_target_backend(server, versions, raw_rows, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw_rows[:5]))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "serving.score", "--target", server.target, "--version-label",
                           "stable", "--max-batch-size", "2", "--input", str(path)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines[0] == ["row", "ctavr", "ctcvr", "ctr", "cvr"] and len(lines) == 6
    from serving.examples import serialize_rows

    want = reference_scores(versions[1], serialize_rows(raw_rows[:5], BUILTIN))
    got = np.array([[float(x) for x in line[1:]] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([want[n] for n in lines[0][1:]], axis=1), atol=2e-6)
    bad = subprocess.run([sys.executable, "-m", "serving.score", "--target", server.target, "--version", "9",
                          "--input", str(path)], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Specific(esm2, 9)" in bad.stderr


# ---- metadata cache, version labels --------------------------------------------------------------
def test_moved_label_refetches_the_signature(tiny):
    """stable: v1 (input 'a') -> v2 (input 'b'): the client notices the move, checks against v2's signature
    and scores with v2 (exact values 2a + 1, then 10b)."""
    srv = FakeTFServing({"tiny": tiny}, labels={"tiny": {"stable": 1}},
                        allow_version_labels_for_unavailable_models=True).start()
    try:
        wait_all_available(srv, "tiny", tiny)
        with TFServingClient(srv.target, "tiny", version_label="stable", timeout_s=10) as client:
            np.testing.assert_array_equal(client.predict({"a": f32(1.0, 2.0)})["score"], [3.0, 5.0])
            move_label(srv, "tiny", "stable", 2)
            np.testing.assert_array_equal(client.predict({"b": f32(1.0, 2.0)})["score"], [10.0, 20.0])
            assert client.signatures()[0] == 2
            with pytest.raises(SignatureMismatch, match=r"version 2: missing input\(s\) \['b'\]; unexpected "
                                                        r"input\(s\) \['a'\]"):
                client.predict({"a": f32(1.0)})
            assert client.wait_until_available(timeout_s=5) == 2  # the version the label resolves to
            move_label(srv, "tiny", "stable", 1)  # back; the request fits the cached v2 signature, not v1's
            with pytest.raises(SignatureMismatch, match=r"version 1: missing input\(s\) \['a'\]"):
                client.predict({"b": f32(1.0)})
            np.testing.assert_array_equal(client.predict({"a": f32(0.0)})["score"], [1.0])
    finally:
        srv.stop(0)


# ---- wait_until_available ------------------------------------------------------------------------
def test_wait_until_available_follows_model_status(tiny):
    srv = FakeTFServing({"tiny": {1: tiny[1]}}, load_delay_s=1.5, open_port_after_load=False).start()
    try:
        with TFServingClient(srv.target, "tiny", version=1) as client:
            with pytest.raises(TimeoutError, match="v1: (START|LOADING)"):
                client.wait_until_available(timeout_s=0.2, poll_s=0.05)
            start = time.monotonic()
            assert client.wait_until_available(timeout_s=10, poll_s=0.05) == 1
            assert 0.3 < time.monotonic() - start < 1.5 + SLACK_S
            assert client.model_status() == {1: ("AVAILABLE", "")}
    finally:
        srv.stop(0)


def test_wait_until_available_is_bounded_by_its_timeout_when_status_hangs():
    """GetModelStatus never answers: wait_until_available(0.5) raises TimeoutError within 0.5 s + slack,
    although the client's own per-call timeout is 10 s."""
    servicer = Scripted(status=lambda req, ctx: (servicer.release.wait(20), _status_response())[1])
    with serve_scripted(servicer) as target, TFServingClient(target, "m", timeout_s=10) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="DEADLINE_EXCEEDED"):
            client.wait_until_available(timeout_s=0.5, poll_s=0.1)
        elapsed = time.monotonic() - start
    assert 0.45 < elapsed < 0.5 + SLACK_S, elapsed


def test_wait_until_available_fails_at_once_when_every_version_failed_to_load(tmp_path):
    servicer = Scripted(status=lambda req, ctx: _status_response(
        (1, "END", "Could not find meta graph def matching supplied tags: { serve }"),
        (2, "END", "Op type not registered 'Foo' in binary")))
    with serve_scripted(servicer) as target, TFServingClient(target, "m") as client:
        start = time.monotonic()
        with pytest.raises(ServingError, match=r"every version failed to load \(version 1: Could not find meta "
                                               r"graph def.*; version 2: Op type not registered 'Foo'") as err:
            client.wait_until_available(timeout_s=10)
        assert time.monotonic() - start < 2.0
        assert err.value.errors == {1: "Could not find meta graph def matching supplied tags: { serve }",
                                    2: "Op type not registered 'Foo' in binary"}
    # the stand-in: neither version directory holds a SavedModel, so both loads fail (END with the error)
    srv = FakeTFServing({"m": {1: str(tmp_path / "1"), 2: str(tmp_path / "2")}}, open_port_after_load=False).start()
    try:
        with TFServingClient(srv.target, "m") as client:
            start = time.monotonic()
            with pytest.raises(ServingError, match=r"every version failed to load \(version 1: Could not find "
                                                   r"SavedModel .*; version 2: Could not find SavedModel") as err:
                client.wait_until_available(timeout_s=30, poll_s=0.05)
            assert time.monotonic() - start < 5.0 and sorted(err.value.errors) == [1, 2]
    finally:
        srv.stop(0)
    # one version still loading: not an error yet (it may load)
    servicer = Scripted(status=lambda req, ctx: _status_response((1, "END", "bad"), (2, "LOADING", "")))
    with serve_scripted(servicer) as target, TFServingClient(target, "m") as client:
        with pytest.raises(TimeoutError, match="v1: END, v2: LOADING"):
            client.wait_until_available(timeout_s=0.3, poll_s=0.05)


# ---- deadlines and retries -----------------------------------------------------------------------
def _tiny_request():
    return {"a": np.array([1.0], np.float32)}


def test_deadline_fires_and_is_not_retried(tiny):
    srv = FakeTFServing({"tiny": {1: tiny[1]}}, predict_delay_s=1.5).start()
    try:
        with TFServingClient(srv.target, "tiny", timeout_s=0.3) as client:
            client.signature("serving_default")  # metadata is not delayed
            start = time.monotonic()
            with pytest.raises(ServingError) as err:
                client.predict(_tiny_request())
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
            assert time.monotonic() - start < 0.3 + SLACK_S
    finally:
        srv.stop(0)


def test_one_deadline_covers_every_retry():
    """Each Predict answers UNAVAILABLE after 0.4 s: with timeout_s=1 the call gives up within 1 s + slack
    after several attempts (each attempt capped by the time left), not after attempts x 0.4 s."""
    def slow_unavailable(request, context):
        servicer.release.wait(0.4)
        context.abort(grpc.StatusCode.UNAVAILABLE, "backend restarting")

    servicer = Scripted(predict=slow_unavailable)
    with serve_scripted(servicer) as target, \
            TFServingClient(target, "m", timeout_s=1.0, backoff_s=0.05) as client:
        start = time.monotonic()
        with pytest.raises(ServingError) as err:
            client.predict(_tiny_request(), check=False)
        elapsed = time.monotonic() - start
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert err.value.attempts >= 2 and servicer.calls["Predict"] >= 2
    assert elapsed < 1.0 + SLACK_S, elapsed


def test_attempt_timeout_is_capped_by_the_calls_deadline():
    servicer = Scripted(predict=lambda req, ctx: (servicer.release.wait(20), predict_pb2.PredictResponse())[1])
    with serve_scripted(servicer) as target, \
            TFServingClient(target, "m", timeout_s=30, attempt_timeout_s=10) as client:
        start = time.monotonic()
        with pytest.raises(ServingError) as err:
            client.predict(_tiny_request(), check=False, timeout_s=0.5)  # this call's deadline
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 0.5 + SLACK_S
        start = time.monotonic()
        with TFServingClient(target, "m", timeout_s=30, attempt_timeout_s=0.5) as short:
            with pytest.raises(ServingError) as err:
                short.predict(_tiny_request(), check=False)  # one attempt, DEADLINE_EXCEEDED is not retried
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
        assert time.monotonic() - start < 0.5 + SLACK_S


def test_retries_survive_a_three_second_restart(tiny):
    """The server is down for ~3 s (connection refused) and comes back on the same port: a client with the
    default retry budget gets its answer (exact score 2a + 1) once it is back."""
    srv = FakeTFServing({"tiny": {1: tiny[1]}}).start()
    with TFServingClient(srv.target, "tiny") as client:
        np.testing.assert_array_equal(client.predict({"a": f32(1.0)})["score"], [3.0])
        srv.stop(0)
        down_at = time.monotonic()
        again = FakeTFServing({"tiny": {1: tiny[1]}}, port=srv.port)
        thread = again.start_in_background(delay_s=3.0)  # loads, then opens the port
        try:
            got = client.predict({"a": f32(4.0)})
            done_at = time.monotonic()
        finally:
            thread.join(60)
            again.stop(0)
    assert again.start_error is None
    np.testing.assert_array_equal(got["score"], [9.0])
    assert 2.9 < done_at - down_at < 3.0 + 5.0  # 3 s down + the reload + at most one max_backoff_s (2 s)


def test_unavailable_gives_up_after_the_retry_budget():
    """Nothing listens: retries back off exponentially (delays within [0.5, 1] x min(max_backoff, b 2^i))
    and stop once the retry budget (1 s) is spent, well before the call's deadline (30 s)."""
    with TFServingClient("127.0.0.1:1", "m", timeout_s=30, retry_budget_s=1.0, backoff_s=0.05,
                         max_backoff_s=0.2) as client:
        delays = []
        client._sleep = lambda s: (delays.append(s), time.sleep(s))
        start = time.monotonic()
        with pytest.raises(ServingError, match="retry budget 1s") as err:
            client.predict(_tiny_request(), check=False)
        elapsed = time.monotonic() - start
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == len(delays) + 1 >= 5
    assert 0.8 < elapsed < 1.0 + SLACK_S, elapsed
    for i, d in enumerate(delays[:-1]):
        cap = min(0.2, 0.05 * 2 ** i)
        assert 0.5 * cap <= d <= cap, (i, delays)
    with TFServingClient("127.0.0.1:1", "m", max_attempts=3, backoff_s=0.01) as client:
        client._sleep = lambda s: None
        with pytest.raises(ServingError) as err:
            client.predict(_tiny_request(), check=False)
    assert err.value.attempts == 3  # max_attempts still caps the count


def test_bench_latency_grpc_path_against_the_stand_in(server, e2e_run):
    from serving.bench_latency import bench_grpc, format_table

    parquet = os.path.join(e2e_run["summary"]["input"]["dir"], "part-00000.parquet")
    before = server.requests
    got = bench_grpc(server.target, "esm2", parquet, [1, 5], reps=10, timeout_s=10)
    assert set(got) == {1, 5} and all(0 < p50 <= p99 for p50, p99 in got.values())
    assert server.requests - before == 2 * (10 + 10)  # warmup + timed calls per size
    assert "grpc p99" in format_table({"grpc": got}, [1, 5])


def test_bench_latency_grpc_overhead_runs_the_served_version_in_process(server, versions, e2e_run):
    """With export_dir the served version also runs in-process on the same examples (scores checked equal
    first); a directory holding another version is refused, since the difference would mean nothing."""
    from serving.bench_latency import bench_grpc, format_grpc_overhead

    parquet = os.path.join(e2e_run["summary"]["input"]["dir"], "part-00000.parquet")
    before, local = server.requests, {}
    got = bench_grpc(server.target, "esm2", parquet, [3], reps=10, timeout_s=10, export_dir=versions[2], local=local)
    assert server.requests - before == 10 + 10  # warmup (the first compared with in-process), timed calls
    assert set(local) == {3} and 0 < local[3][0] <= local[3][1]
    head, row = format_grpc_overhead(got, local, [3]).splitlines()
    assert "gRPC adds p50" in head
    assert [float(v) for v in row.split()] == pytest.approx(
        [3, got[3][0] - local[3][0], got[3][1] - local[3][1]], abs=1e-3)
    with pytest.raises(ValueError, match="differently from the model served"):
        bench_grpc(server.target, "esm2", parquet, [3], reps=10, timeout_s=10, export_dir=versions[1], local={})
