"""A stand-in for TF Serving's gRPC PredictionService + ModelService, for tests only.

It binds 127.0.0.1, loads SavedModel versions with ``tf.saved_model.load`` and follows TF Serving's
documented behaviour where the tests rely on it:

* model unknown, version not loaded, label unknown -> NOT_FOUND ("Servable not found for request: ...");
* ``model_spec.version`` or ``model_spec.version_label`` picks the version, neither = the highest AVAILABLE;
* signature not in the SignatureDef map -> FAILED_PRECONDITION ("Serving signature name: ... not found");
* inputs not matching the signature (names, dtype) or rejected by the graph (e.g. a malformed serialized
  example) -> INVALID_ARGUMENT; output_filter naming an unknown output -> INVALID_ARGUMENT;
* GetModelMetadata: ``metadata_field`` must be exactly ["signature_def"]; the answer packs a
  ``SignatureDefMap`` read from ``saved_model.pb``; the response's model_spec carries the resolved version;
* GetModelStatus: one ModelVersionStatus per version (LOADING until ``load_delay_s`` has passed, then
  AVAILABLE); the version filter gives NOT_FOUND for an unknown version.

A handler never lets an exception escape: anything unexpected becomes INTERNAL, so the server keeps serving.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from typing import Dict, Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

_LOADED: Dict[str, object] = {}  # SavedModel dir -> loaded object, shared by every server in the process
_LOCK = threading.Lock()


def load(path: str):
    with _LOCK:
        if path not in _LOADED:
            _LOADED[path] = tf.saved_model.load(path)
        return _LOADED[path]


def _signature_defs(path: str):
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as fh:
        sm.ParseFromString(fh.read())
    return sm.meta_graphs[0].signature_def


class _Abort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class _Version:
    def __init__(self, path: str, available_at: float):
        self.path = path
        self.available_at = available_at

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.available_at


class FakeTFServing(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """``models``: {name: {version: SavedModel dir}}; ``labels``: {name: {label: version}}.

    ``predict_delay_s`` makes Predict sleep first (deadline tests); ``load_delay_s`` keeps versions LOADING.
    """

    def __init__(self, models: Mapping[str, Mapping[int, str]], labels: Optional[Mapping[str, Mapping[str, int]]] = None,
                 port: int = 0, predict_delay_s: float = 0.0, load_delay_s: float = 0.0):
        self.labels = {m: dict(v) for m, v in (labels or {}).items()}
        self.predict_delay_s = predict_delay_s
        start = time.monotonic() + load_delay_s
        self.models = {m: {int(v): _Version(p, start) for v, p in versions.items()} for m, versions in models.items()}
        for versions in self.models.values():
            for v in versions.values():
                load(v.path)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise OSError(f"cannot bind 127.0.0.1:{port}")
        self.requests = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeTFServing":
        self.server.start()
        return self

    def stop(self, grace: Optional[float] = None) -> None:
        self.server.stop(grace).wait()

    # ---- resolution ----------------------------------------------------------------------------
    def _resolve(self, spec) -> tuple:
        if spec.name not in self.models:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        versions = self.models[spec.name]
        if spec.HasField("version"):
            v = spec.version.value
            if v not in versions or not versions[v].available:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {v})")
        elif spec.version_label:
            v = self.labels.get(spec.name, {}).get(spec.version_label)
            if v is None or v not in versions or not versions[v].available:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Unrecognized servable version label: {spec.version_label}")
        else:
            ready = [v for v, ver in versions.items() if ver.available]
            if not ready:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            v = max(ready)
        return v, versions[v].path

    def _handle(self, context, fn):
        try:
            return fn()
        except _Abort as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001  (never crash the server)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # ---- PredictionService ---------------------------------------------------------------------
    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        return self._handle(context, lambda: self._predict(request))

    def _predict(self, request):
        self.requests += 1
        if self.predict_delay_s:
            time.sleep(self.predict_delay_s)
        version, path = self._resolve(request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        sigs = load(path).signatures
        if name not in sigs:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"Serving signature name: \"{name}\" not found in signature def")
        fn = sigs[name]
        specs = fn.structured_input_signature[1]
        missing = sorted(set(specs) - set(request.inputs))
        extra = sorted(set(request.inputs) - set(specs))
        if missing or extra:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"input tensor alias not found in signature: {extra or ''} missing: {missing or ''}. "
                         f"Inputs expected to be in the set {{{', '.join(sorted(specs))}}}.")
        inputs = {}
        for key, proto in request.inputs.items():
            if proto.dtype != specs[key].dtype.as_datatype_enum:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Expects arg[{key}] to be {specs[key].dtype.name} but "
                             f"{tf.dtypes.as_dtype(proto.dtype).name} is provided")
            try:
                inputs[key] = tf.constant(tf.make_ndarray(proto))
            except Exception as exc:  # noqa: BLE001
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: bad TensorProto ({exc})") from None
            if not specs[key].shape.is_compatible_with(inputs[key].shape):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input {key}: shape {inputs[key].shape} incompatible with {specs[key].shape}")
        outputs_wanted = list(request.output_filter) or list(fn.structured_outputs)
        unknown = sorted(set(outputs_wanted) - set(fn.structured_outputs))
        if unknown:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in signature: {unknown}")
        try:
            out = fn(**inputs)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, getattr(exc, "message", str(exc))) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = name
        for key in outputs_wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(out[key].numpy())))
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._handle(context, lambda: self._metadata(request))

    def _metadata(self, request):
        if list(request.metadata_field) != ["signature_def"]:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"Metadata field(s) {list(request.metadata_field)} not supported (only signature_def)")
        version, path = self._resolve(request.model_spec)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in _signature_defs(path).items():
            sigs.signature_def[key].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(sigs)
        return response

    # ---- ModelService --------------------------------------------------------------------------
    def GetModelStatus(self, request, context):  # noqa: N802
        return self._handle(context, lambda: self._status(request))

    def _status(self, request):
        spec = request.model_spec
        if spec.name not in self.models:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
        versions = self.models[spec.name]
        if spec.HasField("version"):
            if spec.version.value not in versions:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"Could not find version {spec.version.value} of model {spec.name}")
            chosen = {spec.version.value: versions[spec.version.value]}
        else:
            chosen = versions
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for v, ver in sorted(chosen.items()):
            status = response.model_version_status.add(version=v)
            status.state = states.AVAILABLE if ver.available else states.LOADING
        return response
