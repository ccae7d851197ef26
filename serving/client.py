"""gRPC client of TF Serving (official ``tensorflow_serving.apis`` stubs) for rankline exports.

    with TFServingClient("127.0.0.1:8500", "esm2", version_label="stable") as client:
        client.wait_until_available()
        scores = client.score_candidates(user_row, candidate_rows, BUILTIN)   # {"ctr": float32 [N], ...}

* Inputs are checked against the signature (``GetModelMetadata``) before a request is sent: a missing,
  unexpected or wrongly typed input fails here with the input's name, not as a server error.
* ``wait_until_available`` polls ``GetModelStatus`` until the version is AVAILABLE (warmup done).
* Every call has a deadline (``timeout_s``); UNAVAILABLE (server restarting, connection refused) is retried
  at most ``max_attempts`` times with exponential backoff and jitter; other errors are raised at once as
  ``ServingError`` naming the RPC, the gRPC code and the server's message.
* The receive (and send) message limit is raised to ``max_message_bytes`` (gRPC's default is 4 MiB).
* ``version`` or ``version_label`` (not both) picks the model version; neither = the latest loaded.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingError(RuntimeError):
    """A failed RPC: ``code`` (grpc.StatusCode), ``details`` (the server's message), ``method``."""

    def __init__(self, method: str, code, details: str, attempts: int = 1):
        self.method, self.code, self.details, self.attempts = method, code, details, attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed{tries}: {getattr(code, 'name', code)}: {details}")


class SignatureMismatch(ValueError):
    """The request does not fit the served signature (checked client-side before sending)."""


class TFServingClient:
    """One channel to a TF Serving gRPC endpoint, bound to one model (and optionally a version or label)."""

    RETRYABLE = ("UNAVAILABLE",)

    def __init__(self, target: str, model_name: str, *, version: Optional[int] = None,
                 version_label: Optional[str] = None, timeout_s: float = 10.0, max_attempts: int = 5,
                 backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel=None):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        if version is not None and version_label is not None:
            raise ValueError("give version or version_label, not both")
        if max_attempts < 1 or timeout_s <= 0:
            raise ValueError("max_attempts must be >= 1 and timeout_s > 0")
        self.target, self.model_name = target, model_name
        self.version, self.version_label = version, version_label
        self.timeout_s, self.max_attempts = float(timeout_s), int(max_attempts)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.max_send_message_length", int(max_message_bytes)),
            # Reconnect quickly after a server restart (gRPC's default first backoff is 1 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._signatures: Dict[str, object] = {}
        self._sleep: Callable[[float], None] = time.sleep

    # ---- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def model_spec(self, signature: Optional[str] = None, version: Optional[int] = None):
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name)
        if signature:
            spec.signature_name = signature
        version = self.version if version is None else version
        if version is not None:
            spec.version.value = int(version)
        elif self.version_label is not None:
            spec.version_label = self.version_label
        return spec

    def _call(self, method: str, rpc, request, timeout_s: Optional[float] = None):
        """``rpc(request)`` with a deadline, retrying UNAVAILABLE with exponential backoff and jitter."""
        import grpc

        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        for attempt in range(1, self.max_attempts + 1):
            try:
                return rpc(request, timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code is None or code.name not in self.RETRYABLE or attempt == self.max_attempts:
                    raise ServingError(f"{method}({self.model_name}@{self.target})", code, details,
                                       attempt) from None
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                self._sleep(delay * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    # ---- model service -------------------------------------------------------------------------
    def model_status(self, version: Optional[int] = None) -> Dict[int, Tuple[str, str]]:
        """{version: (state name, error message)} from GetModelStatus (all versions unless ``version``)."""
        from tensorflow_serving.apis import get_model_status_pb2, model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name)
        if version is not None:
            spec.version.value = int(version)
        response = self._call("GetModelStatus", self._models.GetModelStatus,
                              get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        states = get_model_status_pb2.ModelVersionStatus.State
        return {s.version: (states.Name(s.state), s.status.error_message) for s in response.model_version_status}

    def wait_until_available(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> int:
        """Blocks until the selected version (``version``; else any) is AVAILABLE; returns that version.

        With ``version_label`` it also waits until the label resolves (GetModelMetadata succeeds).
        Raises TimeoutError with the last state seen, or ServingError if the version failed to load.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                status = self.model_status(self.version)
                available = sorted(v for v, (state, _) in status.items() if state == "AVAILABLE")
                failed = {v: err for v, (state, err) in status.items() if state == "END" and err}
                if self.version is not None and self.version in failed:
                    raise ServingError("GetModelStatus", "END", f"version {self.version} failed to load: "
                                       f"{failed[self.version]}")
                last = ", ".join(f"v{v}: {s}" for v, (s, _) in sorted(status.items())) or "no versions"
                if available:
                    if self.version_label is None:
                        return self.version if self.version is not None else available[-1]
                    self._signatures.clear()
                    return self._metadata_version()
            except ServingError as exc:
                if getattr(exc.code, "name", exc.code) not in ("NOT_FOUND", "UNAVAILABLE", "FAILED_PRECONDITION"):
                    raise
                last = str(exc)
            if time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"model {self.model_name!r} at {self.target} not available within "
                                   f"{timeout_s:g}s (last: {last})")
            self._sleep(poll_s)

    # ---- metadata ------------------------------------------------------------------------------
    def _metadata(self, signature: str = "serving_default"):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self.model_spec(),
                                                                 metadata_field=["signature_def"])
        response = self._call("GetModelMetadata", self._predict.GetModelMetadata, request)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(sigs):
            raise ServingError("GetModelMetadata", "DATA_LOSS", "metadata 'signature_def' is not a SignatureDefMap")
        return response, sigs

    def _metadata_version(self) -> int:
        response, sigs = self._metadata()
        self._signatures.update(sigs.signature_def)
        return int(response.model_spec.version.value)

    def signature(self, name: str = "serving_default"):
        """The served ``SignatureDef`` (cached); raises SignatureMismatch if the model has no such signature."""
        if name not in self._signatures:
            _, sigs = self._metadata()
            self._signatures.update(sigs.signature_def)
            if name not in sigs.signature_def:
                raise SignatureMismatch(f"model {self.model_name!r} has no signature {name!r} "
                                        f"(has {sorted(k for k in sigs.signature_def if not k.startswith('__'))})")
        return self._signatures[name]

    def check_inputs(self, signature: str, tensors: Mapping[str, object]) -> None:
        """Names, dtypes and ranks of ``tensors`` (TensorProtos) against the served signature."""
        sig = self.signature(signature)
        missing = sorted(set(sig.inputs) - set(tensors))
        extra = sorted(set(tensors) - set(sig.inputs))
        if missing or extra:
            parts = ([f"missing input(s) {missing}"] if missing else []) + \
                    ([f"unexpected input(s) {extra}"] if extra else [])
            raise SignatureMismatch(f"signature {signature!r} of model {self.model_name!r}: {'; '.join(parts)} "
                                    f"(it takes {sorted(sig.inputs)})")
        from tensorflow.core.framework import types_pb2

        for name, proto in tensors.items():
            info = sig.inputs[name]
            if info.dtype != proto.dtype:
                raise SignatureMismatch(f"signature {signature!r} input {name!r}: dtype "
                                        f"{types_pb2.DataType.Name(proto.dtype)}, the model takes "
                                        f"{types_pb2.DataType.Name(info.dtype)}")
            shape = info.tensor_shape
            if not shape.unknown_rank and len(shape.dim) != len(proto.tensor_shape.dim):
                raise SignatureMismatch(f"signature {signature!r} input {name!r}: rank {len(proto.tensor_shape.dim)}, "
                                        f"the model takes rank {len(shape.dim)}")

    # ---- predict -------------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, object], signature: str = "serving_default",
                output_filter: Sequence[str] = (), check: bool = True,
                timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Predict on ``signature``; ``inputs``: name -> array-like (or TensorProto). Returns name -> ndarray."""
        import tensorflow as tf
        from tensorflow.core.framework import tensor_pb2
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=self.model_spec(signature), output_filter=list(output_filter))
        for name, value in inputs.items():
            proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(_as_array(name, value))
            request.inputs[name].CopyFrom(proto)
        if check:
            self.check_inputs(signature, request.inputs)
        response = self._call("Predict", self._predict.Predict, request, timeout_s)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def score_examples(self, examples: Iterable, signature: str = "serving_default",
                       timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Scores serialized raw ``tf.Example``s (bytes or ``tf.train.Example``) -> {task: float32 [N]}."""
        serialized = [e if isinstance(e, (bytes, bytearray)) else e.SerializeToString() for e in examples]
        if not serialized:
            raise ValueError("no examples to score")
        return self.predict({"examples": np.array(serialized, dtype=object)}, signature, timeout_s=timeout_s)

    def score_candidates(self, user: Mapping, candidates: Sequence[Mapping], contract,
                         signature: str = "serving_default",
                         timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Scores one user (request-level raw fields: user, context, timestamp) against N candidate dicts.

        ``serving_default`` sends tf.Examples (missing values allowed); ``predict_raw`` sends one dense
        column per raw serving column (every value must be present). Returns {task: float32 [N]}.
        """
        rows = merge_user_candidates(user, candidates)
        if signature == "predict_raw":
            return self.predict(raw_columns(rows, contract), signature, timeout_s=timeout_s)
        from serving.examples import serialize_rows

        return self.score_examples(serialize_rows(rows, contract), signature, timeout_s=timeout_s)


def _as_array(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind == "U":
        arr = np.array([str(v).encode("utf-8") for v in arr.ravel()], dtype=object).reshape(arr.shape)
    if arr.dtype == object and arr.size and not all(isinstance(v, (bytes, bytearray)) for v in arr.ravel()):
        raise SignatureMismatch(f"input {name!r}: object arrays must hold bytes (serialized examples or strings)")
    return arr


def merge_user_candidates(user: Mapping, candidates: Sequence[Mapping]) -> List[Dict]:
    """One raw row per candidate: the user's fields plus the candidate's. A field given by both with
    different values is an error (it would be ambiguous which one is meant)."""
    if not candidates:
        raise ValueError("no candidates to score")
    rows = []
    for i, cand in enumerate(candidates):
        clash = sorted(k for k in set(user) & set(cand) if user[k] != cand[k])
        if clash:
            raise ValueError(f"candidate {i}: field(s) {clash} given by both the user and the candidate")
        rows.append({**user, **cand})
    return rows


def raw_columns(rows: Sequence[Mapping], contract) -> Dict[str, np.ndarray]:
    """Rows -> one 1-D column per raw serving column for ``predict_raw`` (dtype from the contract)."""
    from serving.examples import _is_missing  # noqa: PLC2701  (same notion of missing as the examples)

    sequences = {s.name: s for s in getattr(contract, "sequences", ())}
    out = {}
    for name in contract.serving_columns:
        values = [r.get(name) for r in rows]
        absent = [i for i, v in enumerate(values) if _is_missing(v)]
        if absent:
            raise ValueError(f"predict_raw: column {name!r} is missing in row(s) {absent[:10]}; a dense column "
                             f"cannot carry missing values, use the serving_default signature (tf.Examples)")
        if name in sequences:
            sep = sequences[name].separator
            values = [sep.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in values]
            out[name] = np.array([v.encode("utf-8") for v in values], dtype=object)
            continue
        kind = contract.raw_dtype(name) if hasattr(contract, "raw_dtype") else _raw_dtype(contract, name)
        if kind == "string":
            out[name] = np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=object)
        elif kind == "int64":
            out[name] = np.array([int(v) for v in values], dtype=np.int64)
        else:
            out[name] = np.array([float(v) for v in values], dtype=np.float32)
    return out


def _raw_dtype(contract, name: str) -> str:
    for f in tuple(contract.categorical) + tuple(contract.numeric):
        if f.name == name:
            return f.dtype
    return "int64"  # the timestamp
