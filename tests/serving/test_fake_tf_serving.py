"""The stand-in TF Serving (tests/serving/fake_tf_serving.py) answers like TF Serving 2.19.1.

Every expected code and message is copied from TF Serving's (or TensorFlow's) C++ source, cited next to the
assertion (paths under github.com/tensorflow/serving tensorflow_serving/, tag 2.19.1). The models are tiny
TF2 SavedModels written here (y = x * scale, z = x + scale, x: float32 [B]), so expected scores are numpy
arithmetic, independent of the stand-in. Calls go through raw gRPC stubs, not serving/client.py.
"""
import os
import shutil
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from tests.serving.fake_tf_serving import FakeTFServing, ServerStartError

C = grpc.StatusCode
X = np.array([1.0, 2.0, 4.0], np.float32)


class _Scaler(tf.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = tf.Variable(float(scale))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x):
        return {"y": x * self.scale, "z": x + self.scale}


def _warmup_request(rows=4, signature=""):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    req.model_spec.signature_name = signature
    req.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones(rows, np.float32)))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=req))


def _export(path, scale, warmup=(_warmup_request(),)):
    module = _Scaler(scale)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    if warmup:
        os.makedirs(os.path.join(path, "assets.extra"))
        with tf.io.TFRecordWriter(os.path.join(path, "assets.extra", "tf_serving_warmup_requests")) as writer:
            for record in warmup:
                writer.write(record.SerializeToString())
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """SavedModel dirs: 'v1'..'v3' (scale 1..3, one warmup record of 4 rows) and 'bad_warmup' (scale 5, its
    warmup record calls a signature the model lacks)."""
    root = tmp_path_factory.mktemp("library")
    out = {f"v{s}": _export(str(root / f"v{s}"), s) for s in (1, 2, 3)}
    out["bad_warmup"] = _export(str(root / "bad_warmup"), 5, warmup=(_warmup_request(signature="nope"),))
    return out


@pytest.fixture
def servers():
    """make(*args, **kwargs) -> an unstarted FakeTFServing that is stopped when the test ends."""
    made = []

    def make(*args, **kwargs):
        made.append(FakeTFServing(*args, **kwargs))
        return made[-1]

    yield make
    for srv in made:
        srv.stop(0)


def _stubs(target):
    """(PredictionService stub, its Predict, ModelService stub) on one channel."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])  # no shared backoff
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return stub, stub.Predict, model_service_pb2_grpc.ModelServiceStub(channel)


def _request(name="m", x=X, version=None, label=None, signature=None, output_filter=(), inputs=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if signature is not None:
        req.model_spec.signature_name = signature
    for key, value in (inputs if inputs is not None else {"x": x}).items():
        req.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    req.output_filter.extend(output_filter)
    return req


def _error(call, request, timeout=10):
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=timeout)
    return err.value.code(), err.value.details()


def _scores(predict, request):
    response = predict(request, timeout=10)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}, response


def _status(models, name="m"):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    response = models.GetModelStatus(request, timeout=10)
    names = get_model_status_pb2.ModelVersionStatus.State.Name
    return [(s.version, names(s.state), s.status.error_code, s.status.error_message)
            for s in response.model_version_status]


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _config(*models):
    """ModelServerConfig from (name, base_path, policy text, {label: version}) tuples."""
    config = model_server_config_pb2.ModelServerConfig()
    for name, base, policy, labels in models:
        entry = config.model_config_list.config.add(name=name, base_path=base, model_platform="tensorflow")
        if policy:
            from google.protobuf import text_format

            text_format.Parse(policy, entry.model_version_policy)
        for label, version in labels.items():
            entry.version_labels[label] = version
    return config


def _reload(models, config):
    return models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- Predict --------------------------------------------------------------------------------------------------
def test_predict_runs_the_signature_in_a_tf1_session(servers, library):
    srv = servers({"m": {1: library["v1"], 2: library["v2"]}}).start()
    _, predict, models = _stubs(srv.target)
    # start-up waits for the newest version only (servable_state_monitor.cc:82-101); v1 may still be loading
    _wait(lambda: [s[1] for s in _status(models)] == ["AVAILABLE", "AVAILABLE"])
    for kwargs, scale in (({}, 2), ({"version": 1}, 1), ({"version": 2}, 2)):
        out, response = _scores(predict, _request(**kwargs))
        np.testing.assert_allclose(out["y"], X * scale)
        np.testing.assert_allclose(out["z"], X + scale)
        # RunPredict answers name, signature and the version served (predict_util.cc:95-96, util.cc:261-275)
        assert (response.model_spec.name, response.model_spec.signature_name,
                response.model_spec.version.value) == ("m", "serving_default", scale)
        # Tensor::AsProtoField writes float_val, not tensor_content (predict_util.cc:175-180)
        assert list(response.outputs["y"].float_val) == pytest.approx(list(X * scale))
        assert not response.outputs["y"].tensor_content
    out, _ = _scores(predict, _request(output_filter=["z"]))  # only the filtered alias (predict_util.cc:130-151)
    assert set(out) == {"z"}
    # a dtype mismatch is caught by the C++ session's call frame, as in TF Serving (not by a TF2 function):
    # tensorflow/core/framework/function.cc FunctionCallFrame::SetArgs
    assert _error(predict, _request(x=np.array([1, 2], np.int64))) == (
        C.INVALID_ARGUMENT, "Expects arg[0] to be float but int64 is provided")


def test_request_errors_carry_tf_serving_codes_and_messages(servers, library):
    srv = servers({"m": {1: library["v1"]}}).start()
    stub, predict, models = _stubs(srv.target)
    no_spec = predict_pb2.PredictRequest()
    no_spec.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    cases = [
        # predict_impl.cc:37-41
        (no_spec, C.INVALID_ARGUMENT, "Missing ModelSpec"),
        # server_core.cc:807-809
        (_request(name=""), C.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        # basic_manager.cc:133-137 with manager.h:150-161
        (_request(name="nosuch"), C.NOT_FOUND, "Servable not found for request: Latest(nosuch)"),
        (_request(version=9), C.NOT_FOUND, "Servable not found for request: Specific(m, 9)"),
        # server_core.cc:854-855: an unknown label is INVALID_ARGUMENT, not NOT_FOUND
        (_request(label="beta"), C.INVALID_ARGUMENT, "Unrecognized servable version label: beta"),
        # predict_util.cc:88-92
        (_request(signature="nope"), C.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        # predict_util.cc:53-70
        (_request(inputs={"x": X, "w": X}), C.INVALID_ARGUMENT,
         "input size does not match signature: 2!=1 len({w,x}) != len({x}). Sent extra: {w}. "
         "Missing but required: {}."),
        (_request(inputs={}), C.INVALID_ARGUMENT,
         "input size does not match signature: 0!=1 len({}) != len({x}). Sent extra: {}. "
         "Missing but required: {x}."),
        # tensorflow/cc/saved_model/util.cc:59-65 (same count, wrong name)
        (_request(inputs={"w": X}), C.INVALID_ARGUMENT,
         "Signature input alias: x(feed name: serving_default_x:0) not found in request and no default value "
         "provided. Inputs expected to be in the request {w}, or default input alias set: "),
        # predict_util.cc:135-141 and 143-147
        (_request(output_filter=["q"]), C.INVALID_ARGUMENT,
         "output tensor alias not found in signature: q Outputs expected to be in the set {y,z}."),
        (_request(output_filter=["y", "y"]), C.INVALID_ARGUMENT, "duplicate output tensor alias: y"),
    ]
    for request, code, message in cases:
        assert _error(predict, request) == (code, message), message
    meta = get_model_metadata_pb2.GetModelMetadataRequest()
    meta.model_spec.name = "m"
    # get_model_metadata_impl.cc:34-43
    assert _error(stub.GetModelMetadata, meta) == (
        C.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    meta.metadata_field.append("inputs")
    assert _error(stub.GetModelMetadata, meta) == (
        C.INVALID_ARGUMENT, "Metadata field inputs is not supported")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "m"
    status.model_spec.version.value = 9
    # get_model_status_impl.cc:88-91 and 98-101
    assert _error(models.GetModelStatus, status) == (C.NOT_FOUND, "Could not find version 9 of model m")
    status.model_spec.name = "nosuch"
    status.model_spec.ClearField("version")
    assert _error(models.GetModelStatus, status) == (C.NOT_FOUND, "Could not find any versions of model nosuch")
    assert _scores(predict, _request())[0]["y"].tolist() == X.tolist()  # still serving


def test_metadata_answers_the_loaded_signature_defs(servers, library):
    srv = servers({"m": {1: library["v1"], 2: library["v2"]}}).start()
    stub, _, models = _stubs(srv.target)
    _wait(lambda: [s[1] for s in _status(models)] == ["AVAILABLE", "AVAILABLE"])
    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta.model_spec.name = "m"
    meta.model_spec.version.value = 1
    response = stub.GetModelMetadata(meta, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    # get_model_metadata_impl.cc:54-63: the MetaGraphDef's map (TF2 exports add __saved_model_init_op)
    assert set(sigs.signature_def) == {"serving_default", "__saved_model_init_op"}
    assert set(sigs.signature_def["serving_default"].inputs) == {"x"}
    assert (response.model_spec.name, response.model_spec.version.value) == ("m", 1)


def test_batch_limit_and_full_queue(servers, library):
    srv = servers({"m": {1: library["v1"]}}, max_batch_size=4, max_enqueued_batches=3).start()
    _, predict, _ = _stubs(srv.target)
    five = np.arange(5, dtype=np.float32)
    # tensorflow/core/kernels/batching_util/shared_batch_scheduler.h, ValidateBatchTaskQueueCapacity
    assert _error(predict, _request(x=five)) == (C.INVALID_ARGUMENT,
                                                 "Task size 5 is larger than maximum input batch size 4")
    np.testing.assert_allclose(_scores(predict, _request(x=five[:4]))[0]["y"], five[:4])
    srv.queue_full = True
    assert _error(predict, _request(x=five[:2])) == (
        C.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full; currently 3 "
                       "batches enqueued and max_enqueued_batches is 3")
    # batching/batching_util.h:91-95: a scalar input cannot be batched
    srv.queue_full = False
    assert _error(predict, _request(x=np.float32(1.0))) == (
        C.INVALID_ARGUMENT, "Batching Run() input tensors must have at least one dimension")
    assert srv.requests == 4 and srv.batch_sizes == [5, 4, 2, None]


def test_warmup_goes_through_the_batcher_and_a_failing_record_fails_start_up(servers, library):
    # the one warmup record has 4 rows: over max_batch_size=2 the load fails (saved_model_bundle_factory.cc:
    # 195-210 wraps the session before saved_model_bundle_source_adapter.cc:79-84 replays the warmup), and a
    # start-up whose only version fails exits (load_servables_fast.cc:98-117, main.cc:342-345)
    with pytest.raises(ServerStartError) as err:
        servers({"m": {1: library["v1"]}}, max_batch_size=2).start()
    assert err.value.code == C.UNKNOWN
    assert str(err.value) == (
        "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become available: {{{name: m version: 1} "
        "due to error: INVALID_ARGUMENT: Task size 4 is larger than maximum input batch size 2}, }")
    with pytest.raises(ServerStartError, match=r'due to error: FAILED_PRECONDITION: Serving signature key '
                                               r'"nope" not found\.'):
        servers({"m": {1: library["bad_warmup"]}}).start()
    servers({"m": {1: library["bad_warmup"]}}, enable_model_warmup=False).start()  # --enable_model_warmup=false


def test_warmup_failure_ends_the_new_version_and_keeps_the_old_one_serving(servers, library, tmp_path):
    base = tmp_path / "m"
    shutil.copytree(library["v1"], base / "1")
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: '
                      '"tensorflow" } }')
    srv = servers(model_config_file=str(config), file_system_poll_wait_seconds=0.1).start()
    _, predict, models = _stubs(srv.target)
    shutil.copytree(library["bad_warmup"], base / "2")
    _wait(lambda: _status(models)[0][1] == "END")
    # a failed load: END with the warmup's status (get_model_status_impl.cc:54-62, util/status_util.cc:23-31)
    assert _status(models) == [(2, "END", C.FAILED_PRECONDITION.value[0], 'Serving signature key "nope" not found.'),
                               (1, "AVAILABLE", 0, "")]
    # availability_preserving_policy.cc:68-75: v1 left the policy but stays, since no aspired version serves
    time.sleep(0.3)
    assert _status(models)[1][:2] == (1, "AVAILABLE")
    np.testing.assert_allclose(_scores(predict, _request())[0]["y"], X)


# ---- labels ---------------------------------------------------------------------------------------------------
def test_label_on_a_version_not_loaded_yet_fails_start_up_unless_allowed(servers, library):
    # server_core.cc:479 builds the label map before :489 loads anything; :540-549 refuses the label
    srv = servers({"m": {1: library["v1"]}}, labels={"m": {"stable": 1}})
    with pytest.raises(ServerStartError) as err:
        srv.start()
    assert (err.value.code, err.value.message) == (
        C.FAILED_PRECONDITION,
        "Request to assign label to version 1 of model m, which is not currently available for inference")
    assert srv.server is None  # the port was never opened
    # --allow_version_labels_for_unavailable_models: at start-up every label is new (server_core.cc:528-537)
    srv = servers({"m": {1: library["v1"], 2: library["v2"]}}, labels={"m": {"stable": 1}},
                  allow_version_labels_for_unavailable_models=True).start()
    _, predict, models = _stubs(srv.target)
    _wait(lambda: [s[1] for s in _status(models)] == ["AVAILABLE", "AVAILABLE"])
    np.testing.assert_allclose(_scores(predict, _request(label="stable"))[0]["y"], X * 1)


def test_reload_config_moves_labels_with_tf_serving_rule(servers, library):
    srv = servers({"m": {1: library["v1"], 2: library["v2"]}}).start()
    _, predict, models = _stubs(srv.target)
    _wait(lambda: [s[1] for s in _status(models)] == ["AVAILABLE", "AVAILABLE"])
    response = _reload(models, _config(("m", "", None, {"stable": 1})))
    assert response.status.error_code == 0  # model_service_impl.cc:79-81
    np.testing.assert_allclose(_scores(predict, _request(label="stable"))[0]["y"], X * 1)
    _reload(models, _config(("m", "", None, {"stable": 2})))  # both AVAILABLE: the move is accepted
    np.testing.assert_allclose(_scores(predict, _request(label="stable"))[0]["y"], X * 2)
    # a label on a version that is not AVAILABLE: the RPC fails (server_core.cc:540-549, model_service_impl.cc:81)
    assert _error(lambda r, timeout: _reload(models, r.config),
                  model_management_pb2.ReloadConfigRequest(config=_config(("m", "", None, {"stable": 2, "canary": 7})))
                  ) == (C.FAILED_PRECONDITION,
                        "Request to assign label to version 7 of model m, which is not currently available for "
                        "inference")
    np.testing.assert_allclose(_scores(predict, _request(label="stable"))[0]["y"], X * 2)  # map unchanged
    assert _error(predict, _request(label="canary"))[0] == C.INVALID_ARGUMENT


def test_allow_flag_admits_new_or_unchanged_labels_only(servers, library):
    srv = servers({"m": {1: library["v1"], 2: library["v2"]}}, allow_version_labels_for_unavailable_models=True).start()
    _, predict, models = _stubs(srv.target)
    _wait(lambda: [s[1] for s in _status(models)] == ["AVAILABLE", "AVAILABLE"])
    _reload(models, _config(("m", "", None, {"stable": 1, "canary": 7})))  # canary is new: allowed (:528-537)
    assert _error(predict, _request(label="canary")) == (C.NOT_FOUND, "Servable not found for request: Specific(m, 7)")
    _reload(models, _config(("m", "", None, {"stable": 1, "canary": 7})))  # unchanged: allowed
    # moving an existing label onto an unavailable version is still refused (:530-536)
    code, message = _error(lambda r, timeout: _reload(models, r.config), model_management_pb2.ReloadConfigRequest(
        config=_config(("m", "", None, {"stable": 9, "canary": 7}))))
    assert (code, message) == (C.FAILED_PRECONDITION, "Request to assign label to version 9 of model m, which is "
                                                      "not currently available for inference")
    _reload(models, _config(("m", "", None, {"stable": 2, "canary": 7})))  # onto an AVAILABLE one: fine
    np.testing.assert_allclose(_scores(predict, _request(label="stable"))[0]["y"], X * 2)


# ---- config reload and file-system polling --------------------------------------------------------------------
def test_reload_adds_and_removes_models(servers, library, tmp_path):
    for name, version in (("a", 1), ("a", 3), ("b", 2)):
        shutil.copytree(library[f"v{version}"], tmp_path / name / str(version))
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "a" base_path: "{tmp_path / "a"}" model_platform: '
                      '"tensorflow" } }')
    srv = servers(model_config_file=str(config), file_system_poll_wait_seconds=0.1).start()
    _, predict, models = _stubs(srv.target)
    assert _status(models, "a") == [(3, "AVAILABLE", 0, "")]  # latest policy: one version (fs source :144-165)
    # a new model is awaited before the reload returns (server_core.cc:409-411)
    _reload(models, _config(("a", str(tmp_path / "a"), "all {}", {}), ("b", str(tmp_path / "b"), "", {})))
    np.testing.assert_allclose(_scores(predict, _request(name="b"))[0]["y"], X * 2)
    _wait(lambda: [s[:2] for s in _status(models, "a")] == [(3, "AVAILABLE"), (1, "AVAILABLE")])  # 'all' policy
    _reload(models, _config(("b", str(tmp_path / "b"), "", {})))  # drops a: unloaded (fs source :393-395)
    _wait(lambda: [s[1] for s in _status(models, "a")] == ["END", "END"])
    assert _error(predict, _request(name="a"))[0] == C.NOT_FOUND
    # server_core.cc:93-98, 114-120, 71-76
    for bad, message in (
            (_config(("b", str(tmp_path / "b"), "", {}), ("b", str(tmp_path / "b"), "", {})),
             "Illegal to list model b multiple times in config list"),
            (_config(("b", "relative/b", "", {})), "Expected model b to have an absolute path or URI; got "
                                                   "base_path()=relative/b")):
        assert _error(lambda r, timeout: _reload(models, r.config),
                      model_management_pb2.ReloadConfigRequest(config=bad)) == (C.INVALID_ARGUMENT, message)
    no_platform = _config(("b", str(tmp_path / "b"), "", {}))
    no_platform.model_config_list.config[0].ClearField("model_platform")
    assert _error(lambda r, timeout: _reload(models, r.config),
                  model_management_pb2.ReloadConfigRequest(config=no_platform)) == (
        C.INVALID_ARGUMENT, "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                            "ModelServerConfig::model_platform, model name is b")


def test_polling_swaps_versions_without_a_gap(servers, library, tmp_path):
    """A client polling Latest while v2 appears (loading slowly) only ever sees v1 then v2: v2 is loaded and
    warmed up before v1 is unloaded (availability_preserving_policy.cc:68-84)."""
    base = tmp_path / "m"
    shutil.copytree(library["v1"], base / "1")
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: "tensorflow" '
                      'model_version_policy { latest { num_versions: 1 } } } }')
    srv = servers(model_config_file=str(config), file_system_poll_wait_seconds=0.1, load_delay_s=0.6).start()
    _, predict, models = _stubs(srv.target)
    seen, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                seen.append(int(predict(_request(), timeout=5).model_spec.version.value))
            except grpc.RpcError as exc:
                errors.append((exc.code(), exc.details()))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        # names absl::SimpleAtoi rejects are not versions (file_system_storage_path_source.cc:87-89, 119-126)
        shutil.copytree(library["v3"], base / "3.partial")
        shutil.copytree(library["v2"], base / "tmp2")
        os.rename(base / "tmp2", base / "2")
        _wait(lambda: [s[:2] for s in _status(models)] == [(2, "AVAILABLE"), (1, "END")])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert seen[0] == 1 and seen[-1] == 2 and seen == sorted(seen)
    assert 3 not in {s[0] for s in _status(models)}


def test_model_config_file_is_polled(servers, library, tmp_path):
    shutil.copytree(library["v1"], tmp_path / "m" / "1")
    config = tmp_path / "models.config"
    text = (f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "m"}" model_platform: "tensorflow" '
            '%s } }')
    config.write_text(text % "")
    srv = servers(model_config_file=str(config), model_config_file_poll_wait_seconds=0.2).start()
    _, predict, _ = _stubs(srv.target)
    assert _error(predict, _request(label="stable"))[0] == C.INVALID_ARGUMENT
    config.write_text(text % 'version_labels { key: "stable" value: 1 }')  # server.cc:163-178, 335-348

    def labelled():
        try:
            return _scores(predict, _request(label="stable"))[0]["y"].tolist() == X.tolist()
        except grpc.RpcError:
            return False

    _wait(labelled)


# ---- start-up, restarts and hooks -----------------------------------------------------------------------------
def test_port_opens_only_after_the_models_loaded(servers, library):
    port = _free_port()
    srv = servers({"m": {1: library["v1"]}}, port=port, load_delay_s=1.0)
    thread = srv.start_in_background()
    _, predict, _ = _stubs(f"127.0.0.1:{port}")
    time.sleep(0.3)
    # server.cc:330 (ServerCore::Create waits for the models) runs before :415 (BuildAndStart opens the port)
    assert _error(predict, _request(), timeout=1)[0] == C.UNAVAILABLE
    thread.join(timeout=30)
    assert srv.start_error is None and srv.port == port
    _, _, models = _stubs(srv.target)  # a fresh channel (the first one is in reconnect backoff)
    assert _status(models) == [(1, "AVAILABLE", 0, "")]


def test_hooks_delay_status_and_predict(servers, library):
    srv = servers({"m": {1: library["v1"]}}, status_delay_s=1.0, predict_delay_s=1.0).start()
    _, predict, models = _stubs(srv.target)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "m"
    assert _error(models.GetModelStatus, request, timeout=0.2)[0] == C.DEADLINE_EXCEEDED
    assert _error(predict, _request(), timeout=0.2)[0] == C.DEADLINE_EXCEEDED
    assert srv.requests == 1 and srv.batch_sizes == [3]


def test_project_export_serves_through_a_tf1_session(servers, served_export):
    """The project's export (tf.Transform tables, warmup records) loads with the TF1 loader, replays its
    warmup and scores like the TF2 in-process load of the same directory (an independent code path)."""
    srv = servers({"esm2": {1: served_export["version_dir"]}}).start()
    _, predict, models = _stubs(srv.target)
    assert _status(models, "esm2") == [(1, "AVAILABLE", 0, "")]  # warmup replayed without error
    examples = served_export["examples"][:6]
    request = _request(name="esm2", inputs={"examples": np.array(examples, dtype=object)})
    got, _ = _scores(predict, request)
    want = tf.saved_model.load(served_export["version_dir"]).signatures["serving_default"](
        examples=tf.constant(examples))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-6, atol=1e-7, err_msg=key)
