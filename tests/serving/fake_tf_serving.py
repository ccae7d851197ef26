"""A stand-in for TF Serving 2.19's gRPC PredictionService + ModelService, for tests only.

It mirrors ``tensorflow_model_server`` (github.com/tensorflow/serving, tag 2.19.1) wherever the tests rely on
it; each rule below names the source line it copies (paths under ``tensorflow_serving/`` unless they start
with ``tensorflow/``, which are TensorFlow's own C++ sources that TF Serving links).

Loading (one ``_Servable`` per model version, like a LoaderHarness)
* A version is loaded like ``LoadSavedModel``: ``tf.compat.v1.saved_model.loader.load`` with tag "serve" into
  its own ``tf.compat.v1.Session`` and ``tf.Graph``; Predict is one ``Session.run`` of the SignatureDef's
  input/output tensor names (predict_util.cc:107), fed through the C API, so TF's own C++ checks answer
  (e.g. "Expects arg[0] to be string but int64 is provided", tensorflow/core/framework/function.cc
  FunctionCallFrame::SetArgs). No TF2 ``.signatures`` function is used.
* Warmup: ``assets.extra/tf_serving_warmup_requests`` (TFRecord of PredictionLog) is replayed through the
  same Predict path (batching included) before the version becomes AVAILABLE
  (saved_model_bundle_source_adapter.cc:79-84, saved_model_warmup_util.cc:61-238); a failing record fails
  the load; more than 1000 records fail it (:123-127); a corrupt file is DATA_LOSS (:226-230).
* A failed load is retried ``max_num_load_retries`` times ``load_retry_interval_s`` apart (loader_harness.cc:82,
  util/retrier.cc:27-54; TF Serving's defaults are 5 and 60 s, server.h:68-69, the stand-in's 0 and 1 s so a
  failing test ends at once), then the version is END with the load's error in GetModelStatus
  (get_model_status_impl.cc:54-62 + util/status_util.cc:23-31) and is not reloaded while it stays aspired
  (aspired_versions_manager.cc:296-337).
* Availability-preserving policy (availability_preserving_policy.cc:47-88, set in server.cc:310): a version
  that leaves the aspired set is unloaded only once an aspired version is AVAILABLE; new versions load
  highest first; UNLOADING waits for in-flight requests. States go START -> LOADING -> AVAILABLE ->
  UNLOADING -> END and stay in GetModelStatus after END (core/servable_state_monitor.cc:276-282),
  newest version first (servable_state_monitor.h:68-69).

Model sources
* ``models={name: {version: dir}}`` (fixed versions, platform "tensorflow"), or ``model_config_file=`` (a
  ModelServerConfig text proto: ``name``, ``base_path``, ``model_platform``, ``model_version_policy``
  latest/all/specific, ``version_labels``). Base paths are polled every ``file_system_poll_wait_seconds``
  (0: once, <0: never; file_system_storage_path_source.cc:413-438) in a background thread for children
  that ``absl::SimpleAtoi`` reads as a number (:87-89: optional sign/blank around digits, so "007" is 7);
  a missing base path aborts that whole poll (:257-262, :333); no version left unloads the model (:463).
  ``model_config_file_poll_wait_seconds`` > 0 re-reads the file and reloads it (server.cc:163-178, 335-348).
* ``ModelService.HandleReloadConfigRequest`` runs ``ServerCore::ReloadConfig`` (model_service_impl.cc:44-82,
  server_core.cc:447-512): duplicate names / relative base paths / a missing or changed platform are
  INVALID_ARGUMENT (:89-153, :50-78, :626-631); labels are checked before anything loads (:479); removed
  models are unloaded, and only NEW models are awaited (:383-411), new versions of kept models arrive with
  the next file-system poll. A model entry with an empty ``base_path`` keeps the stand-in's fixed versions
  for a model given in ``models=`` (stand-in convenience, so label moves can be tested on such servers).

Labels (server_core.cc:514-579, 837-856)
* A label may only name a version that is AVAILABLE at that moment: FAILED_PRECONDITION "Request to assign
  label to version V of model M, which is not currently available for inference". The label map is built
  before any model loads (:479 before :489), so labels in the start-up config fail start-up unless
  ``allow_version_labels_for_unavailable_models=True``, which allows an unavailable version when the label
  is new or keeps its version (:528-537; at start-up every label is new, :841-844);
  ``force_allow_any_version_labels_for_unavailable_models=True`` allows all (:526-527).
* A request's label unknown: INVALID_ARGUMENT "Unrecognized servable version label: X" (:854-855).

Requests
* ModelSpec: no name -> INVALID_ARGUMENT "ModelSpec has no name specified." (server_core.cc:807-809);
  nothing AVAILABLE -> NOT_FOUND "Servable not found for request: Latest(m)" / "Specific(m, 3)"
  (core/basic_manager.cc:133-137, core/manager.h:150-161); latest = highest AVAILABLE (basic_manager.cc:186-217).
* Predict (predict_impl.cc:37-58, predict_util.cc:78-190): no model_spec INVALID_ARGUMENT "Missing ModelSpec";
  unknown signature FAILED_PRECONDITION 'Serving signature key "X" not found.'; input count/names
  INVALID_ARGUMENT "input size does not match signature: ..." (:51-73) or, same count, "Signature input
  alias: ..." / "Inputs contains invalid name. ..." (tensorflow/cc/saved_model/util.cc:59-86); an unparsable
  TensorProto "tensor parsing error: X"; output_filter unknown alias "output tensor alias not found in
  signature: X Outputs expected to be in the set {a,b}." and repeated alias "duplicate output tensor alias:
  X" (:133-151); outputs are written with Tensor::AsProtoField (typed ``*_val`` fields, :175-180).
* Batching (``max_batch_size=N`` = ``--enable_batching`` with a batching_parameters_file; server.cc:224-233,
  bundle_factory_util.cc:100-167): every signature is batched (batching_session.cc:395-410); inputs must
  share a 0th dimension (batching/batching_util.h:84-107); a request of more than N rows is INVALID_ARGUMENT
  "Task size R is larger than maximum input batch size N" and a full queue is UNAVAILABLE "The batch
  scheduling queue to which this task was submitted is full; ..." (tensorflow/core/kernels/batching_util/
  shared_batch_scheduler.h, Queue::ValidateBatchTaskQueueCapacity); outputs need a 0th dimension equal to
  the rows (batching_session.cc:629-637). Warmup goes through the batcher too.
* GetModelMetadata (get_model_metadata_impl.cc:33-97): metadata_field must be non-empty and only
  "signature_def"; the answer packs the loaded MetaGraphDef's SignatureDefMap and the resolved name/version.
* GetModelStatus (get_model_status_impl.cc:66-109): a version filter gives NOT_FOUND "Could not find version
  V of model M", no states "Could not find any versions of model M"; a version_label is ignored.
* Messages longer than 1024 characters are cut with "...TRUNCATED" (model_servers/grpc_status_util.cc:24-35);
  messages up to 2 GiB are accepted (server.cc:395).

Start-up and restarts
* ``start()`` returns only after each model's newest version reached AVAILABLE or END (server_core.cc:362,
  load_servables_fast.cc:84-118) and only then opens the port (server.cc:330 before :415), so a client sees
  connection refused (UNAVAILABLE) until the models are loaded. A start-up failure raises ServerStartError
  "Failed to start server. Error: <CODE>: <message>" (main.cc:342-345), e.g. "UNKNOWN: 1 servable(s) did not
  become available: {{name: m version: 1} due to error: ...}, }". ``open_port_after_load=False`` opens the
  port first and loads in the background (not TF Serving; lets a client watch LOADING at start-up).
  ``start_timeout_s`` bounds the wait (TF Serving waits forever).
* ``start_in_background(delay_s)`` starts the server from a thread (a restart on a fixed ``port`` for a
  client retry test): join the returned thread, then ``stop()``; an error is kept in ``start_error``.

Test hooks
* ``predict_delay_s``: Predict sleeps first; ``status_delay_s``: GetModelStatus sleeps first (a hanging server);
  ``load_delay_s``: every load stays LOADING that long first.
* ``requests``: Predict calls received; ``batch_sizes``: for each, the 0th dimension of its first input
  (sorted by alias; None without inputs); ``queue_full = True`` makes batched Predicts fail as a full queue.
* ``poll_errors`` / ``config_poll_errors``: what TF Serving would only log.
``stop()`` ends the gRPC server and every background thread and closes the sessions.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from typing import Dict, List, Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

_LOADED: Dict[str, object] = {}  # SavedModel dir -> tf.saved_model.load object (tests' in-process reference)
_LOCK = threading.Lock()

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # saved_model_warmup_util.h:30
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def load(path: str):
    """``tf.saved_model.load(path)``, cached per process: the tests' in-process reference scores (the server
    itself loads every version into its own TF1 Session)."""
    with _LOCK:
        if path not in _LOADED:
            _LOADED[path] = tf.saved_model.load(path)
        return _LOADED[path]


class TFStatus(Exception):
    """A non-OK ``absl::Status``: gRPC code and message; ``str()`` is absl's ``Status::ToString``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ServerStartError(RuntimeError):
    """``start()`` failed where ``tensorflow_model_server`` exits with "Failed to start server. Error: <status>"
    (main.cc:342-345); ``code`` / ``message`` are the status's."""

    def __init__(self, status: TFStatus):
        super().__init__(f"Failed to start server. Error: {status}")
        self.code, self.message = status.code, status.message


def _invalid(msg):
    return TFStatus(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _simple_atoi(text: str) -> Optional[int]:
    """absl::SimpleAtoi for int64 (file_system_storage_path_source.cc:87-89): ASCII blanks around an optional
    sign and decimal digits."""
    s = text.strip(" \t\n\v\f\r")
    digits = s[1:] if s[:1] in "+-" else s
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(s)
    return value if -2 ** 63 <= value < 2 ** 63 else None


_PROTO_FIELD = {np.float32: "float_val", np.float64: "double_val", np.int32: "int_val", np.int16: "int_val",
                np.int8: "int_val", np.uint8: "int_val", np.uint16: "int_val", np.int64: "int64_val",
                np.uint32: "uint32_val", np.uint64: "uint64_val", np.bool_: "bool_val"}


def _as_proto_field(array: np.ndarray):
    """Tensor::AsProtoField (predict_util.cc:175-180): dtype, shape and the typed repeated ``*_val`` field."""
    array = np.asarray(array)
    text = array.dtype == object or array.dtype.kind in "SU"
    if not text and array.dtype.type not in _PROTO_FIELD:  # other dtypes (half, complex): TF's own encoding
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=(tf.string if text else tf.as_dtype(array.dtype)).as_datatype_enum,
                                   tensor_shape=tf.TensorShape(array.shape).as_proto())
    flat = array.reshape(-1)
    if text:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    else:
        getattr(proto, _PROTO_FIELD[array.dtype.type]).extend(flat.tolist())
    return proto


def _batch_dim(request) -> Optional[int]:
    if not request.inputs:
        return None
    dims = request.inputs[sorted(request.inputs)[0]].tensor_shape.dim
    return int(dims[0].size) if dims else None


class _Servable:
    """One model version: LoaderHarness state ("new", "loading", "ready", "unloading", "disabled", "error")."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.aspired = True
        self.harness = "new"
        self.cancel_retry = False
        self.session = self.graph = None
        self.signature_defs = {}
        self.in_flight = 0


class _Model:
    """One ModelConfig: ``fixed`` {version: dir} (the ``models=`` form) or a polled ``base_path``."""

    def __init__(self, config, fixed: Optional[Mapping[int, str]] = None):
        self.config, self.fixed = config, dict(fixed) if fixed is not None else None

    @property
    def name(self) -> str:
        return self.config.name


class FakeTFServing(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """``models``: {name: {version: SavedModel dir}}; ``labels``: {name: {label: version}} (its version_labels);
    or ``model_config_file``: a ModelServerConfig text file. See the module docstring for every option."""

    def __init__(self, models: Optional[Mapping[str, Mapping[int, str]]] = None,
                 labels: Optional[Mapping[str, Mapping[str, int]]] = None, port: int = 0,
                 predict_delay_s: float = 0.0, load_delay_s: float = 0.0, *,
                 model_config_file: Optional[str] = None, file_system_poll_wait_seconds: float = 1.0,
                 model_config_file_poll_wait_seconds: float = 0.0,
                 allow_version_labels_for_unavailable_models: bool = False,
                 force_allow_any_version_labels_for_unavailable_models: bool = False,
                 max_batch_size: Optional[int] = None, max_enqueued_batches: int = 10,
                 enable_model_warmup: bool = True, max_num_load_retries: int = 0, load_retry_interval_s: float = 1.0,
                 status_delay_s: float = 0.0, open_port_after_load: bool = True, start_timeout_s: float = 120.0,
                 max_workers: int = 8):
        if (models is None) == (model_config_file is None):
            raise ValueError("FakeTFServing: give exactly one of models= and model_config_file=")
        if labels and model_config_file is not None:
            raise ValueError("FakeTFServing: labels= goes with models=; put version_labels in the config file")
        if max_batch_size is not None and (max_batch_size < 1 or max_enqueued_batches < 1):
            raise ValueError("FakeTFServing: max_batch_size and max_enqueued_batches must be >= 1")
        self._fixed = {m: {int(v): str(p) for v, p in vs.items()} for m, vs in (models or {}).items()}
        self._labels_arg = {m: dict(v) for m, v in (labels or {}).items()}
        unknown = sorted(set(self._labels_arg) - set(self._fixed))
        if unknown:
            raise ValueError(f"FakeTFServing: labels= names model(s) {unknown} not in models=")
        self.model_config_file = model_config_file
        self.requested_port = int(port)
        self.port = int(port)
        self.predict_delay_s, self.load_delay_s, self.status_delay_s = predict_delay_s, load_delay_s, status_delay_s
        self.file_system_poll_wait_seconds = file_system_poll_wait_seconds
        self.model_config_file_poll_wait_seconds = model_config_file_poll_wait_seconds
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self.force_allow_labels = force_allow_any_version_labels_for_unavailable_models
        self.max_batch_size, self.max_enqueued_batches = max_batch_size, max_enqueued_batches
        self.enable_model_warmup = enable_model_warmup
        self.max_num_load_retries, self.load_retry_interval_s = max_num_load_retries, load_retry_interval_s
        self.open_port_after_load, self.start_timeout_s, self.max_workers = open_port_after_load, start_timeout_s, max_workers
        # test hooks / observations
        self.requests = 0
        self.batch_sizes: List[Optional[int]] = []
        self.queue_full = False
        self.poll_errors: List[str] = []
        self.config_poll_errors: List[str] = []
        self.start_error: Optional[BaseException] = None
        # ServerCore state
        self._mu = threading.Condition(threading.RLock())
        self._config_mu = threading.Lock()  # ServerCore::config_mu_
        self._config = None  # ModelServerConfig last accepted (config_ in server_core.cc)
        self._source: Optional[Dict[str, _Model]] = None  # the FileSystemStoragePathSource's servables
        self._labels: Optional[Dict[str, Dict[str, int]]] = None  # model_labels_to_versions_ (None = nullptr)
        self._managed: Dict[str, Dict[int, _Servable]] = {}
        self._pending: Dict[str, Dict[int, str]] = {}  # aspired-versions requests not yet handled
        self._states: Dict[str, Dict[int, tuple]] = {}  # ServableStateMonitor: (state, TFStatus|None, seq)
        self._seq = 0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: List[threading.Thread] = []
        self._bg_start: Optional[threading.Thread] = None
        self.server = None

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeTFServing":
        """ServerCore::Create (load the config, wait for the models), then open the port (server.cc:330, 415).
        Raises ServerStartError as ``tensorflow_model_server`` would fail to start."""
        config = self._initial_config()
        if not self.open_port_after_load:
            self._open_port()
        try:
            self._thread(self._manage_loop, "manager")
            self._reload_config(config, wait=self.open_port_after_load)
        except TFStatus as status:
            self.stop(0)
            raise ServerStartError(status) from None
        if self.model_config_file and self.model_config_file_poll_wait_seconds > 0:
            self._thread(self._config_poll_loop, "config-poll")
        if self.open_port_after_load:
            self._open_port()
        return self

    def start_in_background(self, delay_s: float = 0.0) -> threading.Thread:
        """Runs ``start()`` in a thread after ``delay_s`` (e.g. a restart on the same port); join it, then stop()."""

        def run():
            if self._stopping.wait(delay_s):
                return
            try:
                self.start()
            except BaseException as exc:  # noqa: BLE001  (kept for the test to inspect)
                self.start_error = exc

        self._bg_start = threading.Thread(target=run, name="fake-tfs-start", daemon=True)
        self._bg_start.start()
        return self._bg_start

    def stop(self, grace: Optional[float] = None) -> None:
        self._stopping.set()
        self._wake.set()
        with self._mu:
            self._mu.notify_all()
        if self._bg_start is not None and self._bg_start is not threading.current_thread():
            self._bg_start.join()
        if self.server is not None:
            self.server.stop(grace).wait()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._mu:
            for servables in self._managed.values():
                for s in servables.values():
                    if s.session is not None:
                        s.session.close()
                        s.session = None

    def _thread(self, fn, name):
        thread = threading.Thread(target=fn, name=f"fake-tfs-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _open_port(self):
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 2 ** 31 - 1),
                   ("grpc.max_send_message_length", 2 ** 31 - 1)]  # SetMaxMessageSize(kint32max), server.cc:395
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.requested_port}")
        if not self.port:
            raise OSError(f"cannot bind 127.0.0.1:{self.requested_port}")
        self.server.start()

    def _initial_config(self):
        if self.model_config_file is None:
            config = model_server_config_pb2.ModelServerConfig()
            for name in self._fixed:
                entry = config.model_config_list.config.add(name=name, model_platform="tensorflow")
                for label, version in self._labels_arg.get(name, {}).items():
                    entry.version_labels[label] = int(version)
            return config
        try:
            return self._read_config_file()
        except TFStatus as status:
            raise ServerStartError(status) from None

    def _read_config_file(self):
        config = model_server_config_pb2.ModelServerConfig()
        try:
            with open(self.model_config_file) as fh:
                text_format.Parse(fh.read(), config)
        except (OSError, text_format.ParseError) as exc:
            raise _invalid(f"{self.model_config_file}: {exc}") from None
        return config

    # ---- ServerCore::ReloadConfig (server_core.cc:447-512) ---------------------------------------
    def _reload_config(self, new_config, wait: bool = True) -> None:
        with self._config_mu:
            first = self._config is None
            kind = new_config.WhichOneof("config")
            if not first and not (self._config.WhichOneof("config") == "model_config_list" == kind):
                raise TFStatus(grpc.StatusCode.FAILED_PRECONDITION,  # :453-461
                               "Cannot transition to requested config. It is only legal to transition from one "
                               "ModelConfigList to another.")
            if kind is None:  # :462-467
                return
            if kind != "model_config_list":
                raise _invalid("stand-in: only model_config_list configs are supported")
            models = self._validate(new_config.model_config_list)
            self._config = new_config  # :477 (kept even if the label check below fails, as TF Serving does)
            self._update_label_map()  # :479, before any model is added
            self._add_models(models, first, wait)  # :489

    def _validate(self, config_list) -> Dict[str, _Model]:
        names, models = set(), {}
        for config in config_list.config:
            if config.name in names:  # :93-98
                raise _invalid(f"Illegal to list model {config.name} multiple times in config list")
            names.add(config.name)
            fixed = self._fixed.get(config.name) if not config.base_path else None
            if fixed is None and not os.path.isabs(config.base_path) and "://" not in config.base_path:  # :114-120
                raise _invalid(f"Expected model {config.name} to have an absolute path or URI; got "
                               f"base_path()={config.base_path}")
            models[config.name] = _Model(config, fixed)
        old = {c.name: c.model_platform for c in self._config.model_config_list.config} if self._config else {}
        for config in config_list.config:
            if not config.model_platform:  # GetPlatform, :71-76
                raise _invalid("Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                               f"ModelServerConfig::model_platform, model name is {config.name}")
            if config.name in old and old[config.name] != config.model_platform:  # :145-150
                raise _invalid(f"Illegal to change a model's platform. For model {config.name} platform was "
                               f"{old[config.name]} and new platform requested is {config.model_platform}")
            if config.model_platform != "tensorflow":  # CreateStoragePathRoutes, :627-631
                raise _invalid(f"Model {config.name} requests unsupported platform {config.model_platform}")
        return models

    def _update_label_map(self) -> None:
        """UpdateModelVersionLabelMap (server_core.cc:514-579)."""
        new_map: Dict[str, Dict[str, int]] = {}
        with self._mu:
            for config in self._config.model_config_list.config:
                states = self._states.get(config.name, {})
                for label, version in config.version_labels.items():
                    allow_any = self.force_allow_labels  # :526-527
                    if not allow_any and self.allow_unavailable_labels:  # :528-537
                        existing = (self._labels or {}).get(config.name, {}).get(label)
                        allow_any = not (self._labels is not None and existing is not None and existing != version)
                    if not allow_any and states.get(version, ("",))[0] != "AVAILABLE":  # :540-549
                        raise TFStatus(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"Request to assign label to version {version} of model {config.name}, "
                                       "which is not currently available for inference")
                    new_map.setdefault(config.name, {})[label] = int(version)
            self._labels = new_map  # :575-576

    def _add_models(self, models: Dict[str, _Model], first: bool, wait: bool) -> None:
        """AddModelsViaModelConfigList (server_core.cc:338-414)."""
        with self._mu:
            start_seq = self._seq  # a fresh ServableStateMonitor for a reload (:380-381)
            old = self._source or {}
            new_names = [name for name in models if name not in old]  # :384-385
            for name in old:
                if name not in models:  # UpdateConfig unaspires deleted models (fs source :393-395)
                    self._pending[name] = {}
            self._source = models
        self._wake.set()
        if first:
            self._thread(self._source_loop, "fs-poll")  # SetAspiredVersionsCallback starts polling (:413-438)
            if wait:
                self._await_models(list(models), start_seq, "servable(s)")  # load_servables_fast.cc:84-118
        else:
            self._await_models(new_names, start_seq, "model(s)")  # WaitUntilModelsAvailable, :299-336

    def _await_models(self, names, start_seq: int, what: str) -> None:
        """Waits until, for each model, some version (newest first) reached AVAILABLE or END after start_seq
        (servable_state_monitor.cc:82-101); any END -> UNKNOWN "N <what> did not become available: {...}"."""
        deadline = time.monotonic() + self.start_timeout_s
        with self._mu:
            while True:
                reached = {}
                for name in names:
                    for version, (state, _, seq) in sorted(self._states.get(name, {}).items(), reverse=True):
                        if seq > start_seq and state in ("AVAILABLE", "END"):
                            reached[name] = (version, state)
                            break
                if len(reached) == len(names):
                    break
                if self._stopping.is_set():
                    raise TFStatus(grpc.StatusCode.CANCELLED, "stand-in: stopped while loading")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TFStatus(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"stand-in: {sorted(set(names) - set(reached))} not loaded within "
                                   f"start_timeout_s={self.start_timeout_s}")
                self._mu.wait(min(left, 0.05))
            bad = sorted((name, v) for name, (v, state) in reached.items() if state != "AVAILABLE")
            if bad:
                parts = []
                for name, v in bad:
                    health = self._states[name][v][1]
                    parts.append(f"{{{{name: {name} version: {v}}}{' due to error: ' + str(health) if health else ''}}}, ")
                raise TFStatus(grpc.StatusCode.UNKNOWN, f"{len(bad)} {what} did not become available: {{{''.join(parts)}}}")

    # ---- sources ---------------------------------------------------------------------------------
    def _source_loop(self):
        interval = self.file_system_poll_wait_seconds
        if interval < 0:
            return
        while not self._stopping.is_set():
            self._poll_file_system()
            if interval == 0 or self._stopping.wait(interval):
                return

    def _poll_file_system(self):
        """PollFileSystemAndInvokeCallback (file_system_storage_path_source.cc:441-466)."""
        with self._mu:
            models = dict(self._source or {})
        found = {}
        for name, model in models.items():
            try:
                found[name] = model.fixed if model.fixed is not None else self._poll_servable(model.config)
            except TFStatus as status:  # one bad base path aborts the whole poll (:333, :415-418)
                self.poll_errors.append(str(status))
                return
        with self._mu:
            for name, versions in found.items():
                if self._source is not None and name in self._source:
                    self._pending[name] = versions
        self._wake.set()

    @staticmethod
    def _poll_servable(config) -> Dict[int, str]:
        """PollFileSystemForServable (file_system_storage_path_source.cc:250-321)."""
        base = config.base_path
        if not os.path.exists(base):  # :257-262
            raise _invalid(f"Could not find base path {base} for servable {config.name} with error "
                           f"NOT_FOUND: {base} not found")
        by_version: Dict[int, str] = {}
        for child in sorted(os.listdir(base)):  # files too: GetChildren lists every child
            version = _simple_atoi(child)
            if version is not None:
                by_version[version] = os.path.join(base, child)  # IndexChildrenByVersion, :119-137
        policy = config.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        if choice == "all":  # :97-114
            return by_version
        if choice == "specific":  # :215-247
            wanted = set(policy.specific.versions)
            return {v: p for v, p in by_version.items() if v in wanted}
        keep = max(policy.latest.num_versions, 1)  # latest is the default, :144-165, :293-299
        return {v: by_version[v] for v in sorted(by_version, reverse=True)[:keep]}

    def _config_poll_loop(self):
        """PollFilesystemAndReloadConfig every model_config_file_poll_wait_seconds (server.cc:163-178)."""
        while not self._stopping.wait(self.model_config_file_poll_wait_seconds):
            try:
                self._reload_config(self._read_config_file())
            except TFStatus as status:
                self.config_poll_errors.append(str(status))

    # ---- AspiredVersionsManager + BasicManager ---------------------------------------------------
    def _manage_loop(self):
        while not self._stopping.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            if self._stopping.is_set():
                return
            self._manage_once()

    def _manage_once(self):
        with self._mu:
            deferred = {}
            for name, versions in self._pending.items():
                servables = self._managed.setdefault(name, {})
                if any(not s.aspired and v in versions for v, s in servables.items()):  # re-aspired: wait (:367-380)
                    deferred[name] = versions
                    continue
                for v, s in servables.items():  # ProcessAspiredVersionsRequest, :284-365
                    if v not in versions:
                        s.aspired = False
                        s.cancel_retry = True
                for v, path in versions.items():
                    if v not in servables:
                        servables[v] = _Servable(name, v, path)
                        self._publish(name, v, "START")
            self._pending = deferred
            actions = [a for a in (self._next_action(list(s.values())) for s in self._managed.values()) if a]
        for kind, servable in actions:
            if self._stopping.is_set():
                return
            self._load(servable) if kind == "load" else self._unload(servable)
        if actions:
            self._wake.set()  # the policy may have a next step (e.g. unload after a load)
        with self._mu:  # FlushServables: forget finished harnesses and unaspired new/errored ones
            for servables in self._managed.values():
                for v in [v for v, s in servables.items()
                          if s.harness == "disabled" or (not s.aspired and s.harness in ("new", "error"))]:
                    del servables[v]

    @staticmethod
    def _next_action(servables):
        """AvailabilityPreservingPolicy::GetNextAction (availability_preserving_policy.cc:47-88)."""
        aspired = [s for s in servables if s.aspired]
        has_aspired_serving = any(s.harness == "ready" for s in aspired)
        unaspired_serving = [s for s in servables if not s.aspired and s.harness == "ready"]
        if not aspired or has_aspired_serving or len(unaspired_serving) > 1:
            if unaspired_serving:
                return "unload", min(unaspired_serving, key=lambda s: s.version)
        new = [s for s in aspired if s.harness == "new"]
        if new:
            return "load", max(new, key=lambda s: s.version)
        return None

    def _publish(self, name, version, state, status: Optional[TFStatus] = None):
        with self._mu:
            self._seq += 1
            self._states.setdefault(name, {})[version] = (state, status, self._seq)
            self._mu.notify_all()

    def _load(self, s: _Servable):
        """LoaderHarness::Load with Retry (loader_harness.cc:75-113, util/retrier.cc:27-54)."""
        with self._mu:
            s.harness = "loading"
            self._publish(s.name, s.version, "LOADING")
        tries = 0
        while True:
            status = self._load_once(s)
            tries += 1
            if status is None or tries > self.max_num_load_retries or s.cancel_retry:
                break
            if self._stopping.wait(self.load_retry_interval_s):
                break
        with self._mu:
            if status is None:
                s.harness = "ready"
                self._publish(s.name, s.version, "AVAILABLE")
            else:
                s.harness = "error"
                self._publish(s.name, s.version, "END", status)

    def _load_once(self, s: _Servable) -> Optional[TFStatus]:
        if self.load_delay_s and self._stopping.wait(self.load_delay_s):
            return TFStatus(grpc.StatusCode.CANCELLED, "stand-in: stopped while loading")
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        try:
            if not any(os.path.exists(os.path.join(s.path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
                raise TFStatus(grpc.StatusCode.NOT_FOUND,  # tensorflow/cc/saved_model/reader.cc ReadSavedModel
                               "Could not find SavedModel .pb or .pbtxt at supplied export directory path: "
                               f"{s.path}. Check that the directory exists and that you have the right "
                               "permissions for accessing it.")
            try:
                with graph.as_default():
                    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], s.path)
            except RuntimeError as exc:
                if "could not be found in SavedModel" not in str(exc):
                    raise
                raise TFStatus(grpc.StatusCode.NOT_FOUND,  # tensorflow/cc/saved_model/reader.cc FindMetaGraphDef
                               "Could not find meta graph def matching supplied tags: { serve }. To inspect "
                               "available tag-sets in the SavedModel, please use the SavedModel CLI: "
                               "`saved_model_cli`") from None
            s.graph, s.session, s.signature_defs = graph, session, dict(meta_graph.signature_def)
            if self.enable_model_warmup:
                self._warmup(s)
            return None
        except TFStatus as status:
            failed = status
        except tf.errors.OpError as exc:
            failed = TFStatus(_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message)
        except Exception as exc:  # noqa: BLE001  (a load error never crashes the server)
            failed = TFStatus(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        session.close()
        s.graph = s.session = None
        s.signature_defs = {}
        return failed

    def _warmup(self, s: _Servable) -> None:
        """internal::RunSavedModelWarmup (saved_model_warmup_util.cc:61-238) + RunWarmupRequest
        (saved_model_warmup.cc:39-78), one request iteration, one thread."""
        path = os.path.join(s.path, WARMUP_FILE)
        if not os.path.exists(path):  # :81-85
            return
        count = 0
        try:
            for raw in tf.compat.v1.io.tf_record_iterator(path):
                log = prediction_log_pb2.PredictionLog()
                try:
                    log.ParseFromString(raw)
                except Exception:  # noqa: BLE001  (DecodeError)
                    raise _invalid(f"Failed to parse warmup record: {raw!r} from {path}") from None  # :114-117
                kind = log.WhichOneof("log_type")
                if kind == "predict_log":
                    self._run_predict(s, log.predict_log.request, version=None)
                elif kind in ("session_run_log", "predict_streamed_log"):  # :68-73
                    number = log.DESCRIPTOR.fields_by_name[kind].number
                    raise TFStatus(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {number}")
                elif kind is not None:
                    raise TFStatus(grpc.StatusCode.UNIMPLEMENTED, f"stand-in: {kind} warmup records not replayed")
                count += 1
                if count > MAX_WARMUP_RECORDS:  # :123-127
                    raise _invalid(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
        except tf.errors.DataLossError as exc:  # :226-230
            raise TFStatus(grpc.StatusCode.DATA_LOSS,
                           f"{exc.message}. Please verify your warmup data is in TFRecord format.") from None

    def _unload(self, s: _Servable):
        with self._mu:
            s.harness = "unloading"  # leaves the serving map at once; in-flight requests finish first
            self._publish(s.name, s.version, "UNLOADING")
            while s.in_flight and not self._stopping.is_set():
                self._mu.wait(0.05)
            if s.session is not None:
                s.session.close()
            s.session = s.graph = None
            s.harness = "disabled"
            self._publish(s.name, s.version, "END")

    # ---- request resolution ------------------------------------------------------------------------
    def _acquire(self, spec) -> _Servable:
        """ServerCore::GetServableHandle (server_core.h:267-282, server_core.cc:805-835)."""
        if not spec.name:
            raise _invalid("ModelSpec has no name specified.")
        choice = spec.WhichOneof("version_choice")
        version = None
        if choice == "version":
            version = spec.version.value
        elif choice == "version_label":
            version = self._version_for_label(spec.name, spec.version_label)
        with self._mu:
            ready = {v: s for v, s in self._managed.get(spec.name, {}).items() if s.harness == "ready"}
            if version is None and ready:
                version = max(ready)
            if version not in ready:
                what = f"Specific({spec.name}, {version})" if choice else f"Latest({spec.name})"
                raise TFStatus(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}")
            ready[version].in_flight += 1
            return ready[version]

    def _release(self, s: _Servable):
        with self._mu:
            s.in_flight -= 1
            self._mu.notify_all()

    def _version_for_label(self, name: str, label: str) -> int:
        """GetModelVersionForLabel (server_core.cc:837-856)."""
        with self._mu:
            if self._labels is None:
                raise TFStatus(grpc.StatusCode.UNAVAILABLE, f"Model labels does not init yet.{label}")
            version = self._labels.get(name, {}).get(label)
        if version is None:
            raise _invalid(f"Unrecognized servable version label: {label}")
        return version

    def _handle(self, context, fn):
        try:
            return fn()
        except TFStatus as status:
            message = status.message
            if len(message) > 1024:  # ToGRPCStatus, grpc_status_util.cc:24-35
                message = message[:1024] + "...TRUNCATED"
            context.abort(status.code, message)
        except Exception as exc:  # noqa: BLE001  (never crash the server)
            context.abort(grpc.StatusCode.INTERNAL, f"stand-in: {type(exc).__name__}: {exc}")

    # ---- PredictionService -------------------------------------------------------------------------
    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        return self._handle(context, lambda: self._predict(request))

    def _predict(self, request):
        with self._mu:
            self.requests += 1
            self.batch_sizes.append(_batch_dim(request))
        if self.predict_delay_s:
            time.sleep(self.predict_delay_s)
        if not request.HasField("model_spec"):  # predict_impl.cc:37-41
            raise _invalid("Missing ModelSpec")
        s = self._acquire(request.model_spec)
        try:
            return self._run_predict(s, request, version=s.version)
        finally:
            self._release(s)

    def _run_predict(self, s: _Servable, request, version: Optional[int]):
        """internal::RunPredict (predict_util.cc:78-117)."""
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if name not in s.signature_defs:  # :88-92
            raise TFStatus(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        sig = s.signature_defs[name]
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name  # MakeModelSpec, util.cc:261-275
        response.model_spec.signature_name = name
        if version is not None:
            response.model_spec.version.value = version
        feeds, fetch_names, aliases = self._preprocess(sig, request)
        outputs = self._session_run(s, feeds, fetch_names)
        for alias, value in zip(aliases, outputs):  # PostProcessPredictionResult, :163-190
            response.outputs[alias].CopyFrom(_as_proto_field(value))
        return response

    @staticmethod
    def _preprocess(sig, request):
        """PreProcessPrediction (predict_util.cc:119-161) with saved_model::GetInputValues
        (tensorflow/cc/saved_model/util.cc:45-89); aliases taken in sorted order (C++ map order is unspecified)."""
        sent, expected = sorted(request.inputs), sorted(sig.inputs)
        if len(sent) > len(expected) or (len(sent) < len(expected) and not sig.defaults):  # :51-73
            extra = sorted(set(sent) - set(expected))
            missing = sorted(set(expected) - set(sent))
            raise _invalid(f"input size does not match signature: {len(sent)}!={len(expected)} "
                           f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). Sent extra: "
                           f"{{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
        feeds, seen = [], []
        for alias in expected:
            info = sig.inputs[alias]
            if alias in request.inputs:
                proto = request.inputs[alias]
                seen.append(alias)
            elif alias in sig.defaults:
                proto = sig.defaults[alias]
            else:  # util.cc:59-65
                raise _invalid(f"Signature input alias: {alias}(feed name: {info.name}) not found in request "
                               "and no default value provided. Inputs expected to be in the request "
                               f"{{{','.join(sent)}}}, or default input alias set: {','.join(sorted(sig.defaults))}")
            try:
                value = tf.make_ndarray(proto)
            except Exception:  # noqa: BLE001  (Tensor::FromProto failed, util.cc:73-77)
                raise _invalid(f"tensor parsing error: {alias}") from None
            feeds.append((info.name, value))
        if sent and len(seen) != len(sent):  # util.cc:82-87
            raise _invalid(f"Inputs contains invalid name. Used request inputs: {','.join(seen)}, request input: "
                           f"{','.join(sent)}")
        fetch_names, aliases = [], []
        for alias in request.output_filter:  # predict_util.cc:130-151
            if alias not in sig.outputs:
                raise _invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                               f"the set {{{','.join(sorted(sig.outputs))}}}.")
            if alias in aliases:
                raise _invalid(f"duplicate output tensor alias: {alias}")
            fetch_names.append(sig.outputs[alias].name)
            aliases.append(alias)
        if not fetch_names:  # :154-159
            aliases = sorted(sig.outputs)
            fetch_names = [sig.outputs[a].name for a in aliases]
        return feeds, fetch_names, aliases

    def _session_run(self, s: _Servable, feeds, fetch_names):
        rows = None
        if self.max_batch_size is not None:  # BatchingSession::InternalRun (batching_session.cc:376-458)
            if not feeds:  # batching_util.h:84-87
                raise _invalid("Batching Run() must have at least one input tensor")
            for _, value in feeds:
                if value.ndim == 0:  # :91-95
                    raise _invalid("Batching Run() input tensors must have at least one dimension")
                if rows is not None and value.shape[0] != rows:  # :102-106
                    raise _invalid("Batching Run() input tensors must have equal 0th-dimension size")
                rows = value.shape[0]
            if rows > self.max_batch_size:  # shared_batch_scheduler.h ValidateBatchTaskQueueCapacity
                raise _invalid(f"Task size {rows} is larger than maximum input batch size {self.max_batch_size}")
            if self.queue_full:
                raise TFStatus(grpc.StatusCode.UNAVAILABLE,
                               "The batch scheduling queue to which this task was submitted is full; currently "
                               f"{self.max_enqueued_batches} batches enqueued and max_enqueued_batches is "
                               f"{self.max_enqueued_batches}")
        graph = s.graph
        try:
            feed_dict = {graph.get_tensor_by_name(n)._as_tf_output(): v for n, v in feeds}
            fetches = [graph.get_tensor_by_name(n)._as_tf_output() for n in fetch_names]
        except (KeyError, ValueError) as exc:
            raise _invalid(str(exc)) from None
        try:  # the C API (TF_SessionRun), no Python-side dtype conversion or shape check
            outputs = s.session._call_tf_sessionrun(None, feed_dict, fetches, [], None)
        except tf.errors.OpError as exc:
            raise TFStatus(_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message) from None
        except UnicodeDecodeError as exc:
            # TF's Python binding fails to decode a C++ status message quoting non-UTF-8 input bytes (e.g. a
            # serialized "example" of 0xff bytes); TF Serving returns that status as is: ParseExample's
            # INVALID_ARGUMENT, with the bytes in the message.
            raise _invalid("Could not parse example input, value: "
                           f"'{exc.object.decode('utf-8', 'replace')[:200]}'") from None
        if rows is not None:
            for value in outputs:  # batching_session.cc:629-637
                if np.ndim(value) == 0:
                    raise TFStatus(grpc.StatusCode.FAILED_PRECONDITION, "Batched output tensor has 0 dimensions")
                if np.shape(value)[0] != rows:
                    raise TFStatus(grpc.StatusCode.FAILED_PRECONDITION,
                                   "Batched output tensor's 0th dimension does not equal the sum of the 0th "
                                   "dimension sizes of the input tensors")
        return outputs

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._handle(context, lambda: self._metadata(request))

    def _metadata(self, request):
        """GetModelMetadataImpl (get_model_metadata_impl.cc:33-97)."""
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise _invalid(f"Metadata field {field} is not supported")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        for _ in request.metadata_field:
            s = self._acquire(request.model_spec)
            try:
                sigs = get_model_metadata_pb2.SignatureDefMap()
                for key, sig in s.signature_defs.items():
                    sigs.signature_def[key].CopyFrom(sig)
                response.model_spec.name = s.name
                response.model_spec.version.value = s.version
                response.metadata["signature_def"].Pack(sigs)
            finally:
                self._release(s)
        return response

    # ---- ModelService ------------------------------------------------------------------------------
    def GetModelStatus(self, request, context):  # noqa: N802
        return self._handle(context, lambda: self._status(request))

    def _status(self, request):
        """GetModelStatusImpl (get_model_status_impl.cc:66-109)."""
        if self.status_delay_s:
            time.sleep(self.status_delay_s)
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        spec = request.model_spec
        with self._mu:
            states = dict(self._states.get(spec.name, {}))
        if spec.HasField("version"):
            if spec.version.value not in states:
                raise TFStatus(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {spec.version.value} of model {spec.name}")
            states = {spec.version.value: states[spec.version.value]}
        elif not states:
            raise TFStatus(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        enum = get_model_status_pb2.ModelVersionStatus.State
        for version, (state, health, _) in sorted(states.items(), reverse=True):
            entry = response.model_version_status.add(version=version, state=enum.Value(state))
            entry.status.SetInParent()  # always set, error_code OK when healthy
            if health is not None:  # ToStatusProto, util/status_util.cc:23-31
                entry.status.error_code = health.code.value[0]
                entry.status.error_message = health.message
        return response

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        return self._handle(context, lambda: self._handle_reload(request))

    def _handle_reload(self, request):
        """ModelServiceImpl::HandleReloadConfigRequest (model_service_impl.cc:44-82): a non-OK status is the
        RPC's status (:81); OK comes back as ReloadConfigResponse.status with error_code OK."""
        if request.config.WhichOneof("config") != "model_config_list":
            raise _invalid("ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                           "ModelConfigList is currently supported")
        self._reload_config(request.config)
        return model_management_pb2.ReloadConfigResponse()
