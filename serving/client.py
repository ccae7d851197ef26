"""gRPC client of TF Serving (official ``tensorflow_serving.apis`` stubs) for rankline exports.

    with TFServingClient("127.0.0.1:8500", "esm2", version_label="stable") as client:
        client.wait_until_available()
        scores = client.score_candidates(user_row, candidate_rows, BUILTIN)   # {"ctr": float32 [N], ...}

* Inputs are checked against the signature (``GetModelMetadata``) before a request is sent: a missing,
  unexpected or wrongly typed input fails here with the input's name, not as a server error. The signatures
  are cached per resolved version (the version ``GetModelMetadata`` answers with); with a label or the
  latest version, a Predict answered by another version, a request that does not fit the cached signature,
  or a server INVALID_ARGUMENT / FAILED_PRECONDITION makes the client ask again, so a moved label is noticed.
* Deadline: every call (``predict``, ``score_*``, ``model_status``, ``signature``) has ONE absolute deadline,
  ``timeout_s`` after it starts, shared by its metadata fetch, its chunks and all its retries; each attempt's
  gRPC timeout is min(``attempt_timeout_s``, time left).
* Retries: UNAVAILABLE (server restarting, connection refused), and only it, is retried with exponential
  backoff (``backoff_s`` doubling up to ``max_backoff_s``, times a jitter in [0.5, 1]) while the call is
  younger than ``retry_budget_s`` and before its deadline (``max_attempts`` optionally caps the count). Other
  errors are raised at once as ``ServingError`` naming the RPC, the gRPC code and the server's message.
* ``wait_until_available(timeout_s)`` polls ``GetModelStatus`` (each poll's deadline = the time left, so it
  returns or raises within ``timeout_s``); UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND mean "not yet". A version
  that failed to load (END with an error) raises ``ModelLoadError`` at once, naming each version's error.
* ``max_batch_size``: a request of more rows is sent as consecutive chunks of at most that many rows (TF
  Serving's batching rejects a larger one: "Task size N is larger than maximum input batch size M"); the
  outputs are concatenated in order.
* TLS: ``tls=True`` or any of ``root_certificates`` (the CA that signed the server's certificate; None = the
  system roots), ``private_key`` + ``certificate_chain`` (the client's own, for mutual TLS); each is PEM bytes
  or a path to a PEM file. ``ssl_target_name_override`` checks the server's certificate against that name
  instead of the target's host.
* The receive (and send) message limit is raised to ``max_message_bytes`` (gRPC's default is 4 MiB).
* ``version`` or ``version_label`` (not both) picks the model version; neither = the latest loaded.
"""
from __future__ import annotations

import os
import random
import time
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_MIN_ATTEMPT_S = 0.05  # a retry is not started with less than this left before the retry window closes


class ServingError(RuntimeError):
    """A failed RPC: ``code`` (grpc.StatusCode), ``details`` (the server's message), ``method``."""

    def __init__(self, method: str, code, details: str, attempts: int = 1):
        self.method, self.code, self.details, self.attempts = method, code, details, attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed{tries}: {getattr(code, 'name', code)}: {details}")


class ModelLoadError(ServingError):
    """Versions that ended with a load error (GetModelStatus state END): ``errors`` {version: message}."""

    def __init__(self, method: str, errors: Mapping[int, str], what: str):
        self.errors = dict(errors)
        listed = "; ".join(f"version {v}: {msg}" for v, msg in sorted(self.errors.items()))
        super().__init__(method, "END", f"{what} failed to load ({listed})")


class SignatureMismatch(ValueError):
    """The request does not fit the served signature (checked client-side before sending)."""


class _Deadline(NamedTuple):
    """One call's absolute times (time.monotonic): ``at`` its deadline, ``retry_until`` the end of retries."""
    at: float
    retry_until: float


def _read_pem(value, what: str) -> Optional[bytes]:
    """PEM bytes, a PEM string, or a path to a PEM file -> bytes (None stays None)."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None if value is None else bytes(value)
    if str(value).lstrip().startswith("-----BEGIN"):
        return str(value).encode("ascii")
    try:
        with open(os.fspath(value), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise OSError(f"{what}: cannot read {value!r} ({exc.strerror or exc})") from None


class TFServingClient:
    """One channel to a TF Serving gRPC endpoint, bound to one model (and optionally a version or label).

    ``timeout_s``: deadline of one call, all its retries and chunks included (default 30 s).
    ``attempt_timeout_s``: the most one RPC attempt may take (default 10 s; never past the call's deadline).
    ``retry_budget_s``: how long after a call starts UNAVAILABLE is still retried (default 30 s, long enough
    for a restarted server to reload its models; capped by the call's deadline).
    ``max_batch_size``: largest number of rows per Predict (None = no splitting).
    """

    RETRYABLE = ("UNAVAILABLE",)
    NOT_YET = ("NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION")

    def __init__(self, target: str, model_name: str, *, version: Optional[int] = None,
                 version_label: Optional[str] = None, timeout_s: float = 30.0, attempt_timeout_s: float = 10.0,
                 retry_budget_s: float = 30.0, max_attempts: Optional[int] = None, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, max_batch_size: Optional[int] = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: bool = False, root_certificates=None,
                 private_key=None, certificate_chain=None, ssl_target_name_override: Optional[str] = None,
                 channel=None):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        if version is not None and version_label is not None:
            raise ValueError("give version or version_label, not both")
        if min(timeout_s, attempt_timeout_s) <= 0 or retry_budget_s < 0:
            raise ValueError("timeout_s and attempt_timeout_s must be > 0, retry_budget_s >= 0")
        if (max_attempts is not None and max_attempts < 1) or (max_batch_size is not None and max_batch_size < 1):
            raise ValueError("max_attempts and max_batch_size must be >= 1 (or None)")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain (the client's key and "
                             "certificate)")
        self.target, self.model_name = target, model_name
        self.version, self.version_label = version, version_label
        self.timeout_s, self.attempt_timeout_s = float(timeout_s), float(attempt_timeout_s)
        self.retry_budget_s, self.max_attempts = float(retry_budget_s), max_attempts
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.max_batch_size = max_batch_size
        self.tls = bool(tls or root_certificates is not None or private_key is not None)
        if ssl_target_name_override and not self.tls:
            raise ValueError("ssl_target_name_override needs TLS (tls=True or root_certificates)")
        self._own_channel = channel is None
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", int(max_message_bytes)),
                ("grpc.max_send_message_length", int(max_message_bytes)),
                # Reconnect quickly after a server restart (gRPC's default first backoff is 1 s).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if ssl_target_name_override:
                options.append(("grpc.ssl_target_name_override", ssl_target_name_override))
            if self.tls:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read_pem(root_certificates, "root_certificates"),
                    private_key=_read_pem(private_key, "private_key"),
                    certificate_chain=_read_pem(certificate_chain, "certificate_chain"))
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self.channel = channel
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._sigdefs: Dict[int, Dict[str, object]] = {}  # resolved version -> {signature name: SignatureDef}
        self._resolved: Optional[int] = version  # the version the label / latest last resolved to
        self._sleep: Callable[[float], None] = time.sleep

    # ---- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _where(self, method: str) -> str:
        return f"{method}({self.model_name}@{self.target})"

    def deadline(self, timeout_s: Optional[float] = None) -> _Deadline:
        """The deadline of a call starting now (``timeout_s`` default: the client's)."""
        now = time.monotonic()
        at = now + (self.timeout_s if timeout_s is None else float(timeout_s))
        return _Deadline(at, min(at, now + self.retry_budget_s))

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

    def _call(self, method: str, rpc, request, deadline: _Deadline, retry: bool = True):
        """``rpc(request)`` before ``deadline.at``, retrying UNAVAILABLE with exponential backoff and jitter
        until ``deadline.retry_until``; each attempt's timeout is min(attempt_timeout_s, time left)."""
        import grpc

        attempt, start = 0, time.monotonic()
        while True:
            left = deadline.at - time.monotonic()
            if left <= 0:
                raise ServingError(self._where(method), grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "the call's deadline passed before this request could be sent", max(attempt, 1))
            attempt += 1
            try:
                return rpc(request, timeout=min(self.attempt_timeout_s, left))
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if (code is None or code.name not in self.RETRYABLE or not retry
                        or (self.max_attempts is not None and attempt >= self.max_attempts)):
                    raise ServingError(self._where(method), code, details, attempt) from None
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                delay = min(delay, deadline.retry_until - time.monotonic() - _MIN_ATTEMPT_S)
                if delay < 0:
                    raise ServingError(self._where(method), code,
                                       f"{details} (gave up after {time.monotonic() - start:.1f}s of retries: retry "
                                       f"budget {self.retry_budget_s:g}s, call deadline {self.timeout_s:g}s)",
                                       attempt) from None
                self._sleep(delay)

    # ---- model service -------------------------------------------------------------------------
    def model_status(self, version: Optional[int] = None, timeout_s: Optional[float] = None,
                     retry: bool = True) -> Dict[int, Tuple[str, str]]:
        """{version: (state name, error message)} from GetModelStatus (all versions unless ``version``).

        The message is empty unless the version's status carries an error (a failed load)."""
        from tensorflow_serving.apis import get_model_status_pb2, model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name)
        if version is not None:
            spec.version.value = int(version)
        response = self._call("GetModelStatus", self._models.GetModelStatus,
                              get_model_status_pb2.GetModelStatusRequest(model_spec=spec),
                              self.deadline(timeout_s), retry)
        states = get_model_status_pb2.ModelVersionStatus.State
        out = {}
        for s in response.model_version_status:
            error = s.status.error_message or (f"error code {s.status.error_code}" if s.status.error_code else "")
            out[s.version] = (states.Name(s.state), error)
        return out

    def wait_until_available(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> int:
        """Blocks until the selected version (``version``; else any) is AVAILABLE; returns that version.

        With ``version_label`` it also waits until the label resolves (GetModelMetadata answers) and returns
        the version it resolves to. Returns or raises within ``timeout_s`` (each RPC's deadline is the time
        left): TimeoutError with the last state seen; ModelLoadError at once when the selected version, or
        every version, ended with a load error.
        """
        end = time.monotonic() + float(timeout_s)
        last = "no answer yet"
        while True:
            left = end - time.monotonic()
            try:
                status = self.model_status(self.version, timeout_s=left, retry=False)
                failed = {v: err for v, (state, err) in status.items() if state == "END" and err}
                if self.version is not None and self.version in failed:
                    raise ModelLoadError(self._where("GetModelStatus"), {self.version: failed[self.version]},
                                         f"version {self.version}")
                if failed and all(state == "END" for state, _ in status.values()):  # nothing left to wait for
                    what = "every version" if len(failed) == len(status) else \
                        f"version(s) {sorted(failed)} (the others were unloaded)"
                    raise ModelLoadError(self._where("GetModelStatus"), failed, what)
                last = ", ".join(f"v{v}: {s}" for v, (s, _) in sorted(status.items())) or "no versions"
                if any(state == "AVAILABLE" for state, _ in status.values()):
                    if self.version_label is None:
                        return self.version if self.version is not None else \
                            max(v for v, (state, _) in status.items() if state == "AVAILABLE")
                    return self._fetch_metadata(_Deadline(end, end), retry=False)
            except ModelLoadError:
                raise
            except ServingError as exc:
                name = getattr(exc.code, "name", exc.code)
                label_not_yet = name == "INVALID_ARGUMENT" and "version label" in exc.details
                if name not in self.NOT_YET and not label_not_yet:
                    raise
                last = str(exc)
            self._sleep(max(0.0, min(poll_s, end - time.monotonic())))
            if end - time.monotonic() < 0.01:  # no time left for another poll
                raise TimeoutError(f"model {self.model_name!r} at {self.target} not available within "
                                   f"{timeout_s:g}s (last: {last})")

    # ---- metadata ------------------------------------------------------------------------------
    def _fetch_metadata(self, deadline: _Deadline, retry: bool = True) -> int:
        """GetModelMetadata -> caches the SignatureDefs under the version it answers for; returns it."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self.model_spec(),
                                                                 metadata_field=["signature_def"])
        response = self._call("GetModelMetadata", self._predict.GetModelMetadata, request, deadline, retry)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(sigs):
            raise ServingError(self._where("GetModelMetadata"), "DATA_LOSS",
                               "metadata 'signature_def' is not a SignatureDefMap")
        version = int(response.model_spec.version.value)
        self._sigdefs[version] = dict(sigs.signature_def)
        if self.version is None:
            self._resolved = version
        return version

    def signatures(self, deadline: Optional[_Deadline] = None, refresh: bool = False) -> Tuple[int, Dict]:
        """(resolved version, {name: SignatureDef}), from the cache unless ``refresh`` or not cached yet."""
        version = self._resolved
        if refresh or version is None or version not in self._sigdefs:
            version = self._fetch_metadata(deadline or self.deadline())
        return version, self._sigdefs[version]

    def signature(self, name: str = "serving_default", deadline: Optional[_Deadline] = None):
        """The served ``SignatureDef``; raises SignatureMismatch if the model has no such signature."""
        deadline = deadline or self.deadline()
        version, sigs = self.signatures(deadline)
        if name not in sigs and self.version is None:
            version, sigs = self.signatures(deadline, refresh=True)  # the label may have moved
        if name not in sigs:
            raise SignatureMismatch(f"model {self.model_name!r} version {version} has no signature {name!r} "
                                    f"(has {sorted(k for k in sigs if not k.startswith('__'))})")
        return sigs[name]

    def _mismatch(self, signature: str, tensors: Mapping[str, object], deadline: _Deadline,
                  refresh: bool) -> Optional[str]:
        """Why ``tensors`` (TensorProtos) do not fit ``signature`` of the resolved version (None: they fit)."""
        from tensorflow.core.framework import types_pb2

        version, sigs = self.signatures(deadline, refresh)
        where = f"signature {signature!r} of model {self.model_name!r} version {version}"
        if signature not in sigs:
            return (f"model {self.model_name!r} version {version} has no signature {signature!r} "
                    f"(has {sorted(k for k in sigs if not k.startswith('__'))})")
        sig = sigs[signature]
        missing = sorted(set(sig.inputs) - set(tensors))
        extra = sorted(set(tensors) - set(sig.inputs))
        if missing or extra:
            parts = ([f"missing input(s) {missing}"] if missing else []) + \
                    ([f"unexpected input(s) {extra}"] if extra else [])
            return f"{where}: {'; '.join(parts)} (it takes {sorted(sig.inputs)})"
        for name, proto in tensors.items():
            info = sig.inputs[name]
            if info.dtype != proto.dtype:
                return (f"{where}: input {name!r}: dtype {types_pb2.DataType.Name(proto.dtype)}, the model takes "
                        f"{types_pb2.DataType.Name(info.dtype)}")
            shape = info.tensor_shape
            if not shape.unknown_rank and len(shape.dim) != len(proto.tensor_shape.dim):
                return f"{where}: input {name!r}: rank {len(proto.tensor_shape.dim)}, the model takes rank " \
                       f"{len(shape.dim)}"
        return None

    def check_inputs(self, signature: str, tensors: Mapping[str, object],
                     deadline: Optional[_Deadline] = None) -> None:
        """Names, dtypes and ranks of ``tensors`` (TensorProtos) against the served signature; with a label
        or the latest version a mismatch with the cached signature is checked again against fresh metadata."""
        deadline = deadline or self.deadline()
        problem = self._mismatch(signature, tensors, deadline, refresh=False)
        if problem and self.version is None:
            problem = self._mismatch(signature, tensors, deadline, refresh=True)
        if problem:
            raise SignatureMismatch(problem)

    # ---- predict -------------------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, object], signature: str = "serving_default",
                output_filter: Sequence[str] = (), check: bool = True,
                timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Predict on ``signature``; ``inputs``: name -> array-like [B, ...] (or TensorProto). Returns name ->
        ndarray. With ``max_batch_size`` < B the rows go in consecutive chunks (outputs concatenated on axis 0),
        all within the one deadline ``timeout_s``."""
        import tensorflow as tf
        from tensorflow.core.framework import tensor_pb2

        arrays = {name: tf.make_ndarray(v) if isinstance(v, tensor_pb2.TensorProto) else _as_array(name, v)
                  for name, v in inputs.items()}
        deadline = self.deadline(timeout_s)
        rows = {a.shape[0] if a.ndim else None for a in arrays.values()}
        m = self.max_batch_size
        if m is None or len(rows) != 1 or None in rows or next(iter(rows)) <= m:
            return self._predict_once(arrays, signature, output_filter, check, deadline)
        n = next(iter(rows))
        parts = [self._predict_once({k: a[i:i + m] for k, a in arrays.items()}, signature, output_filter, check,
                                    deadline) for i in range(0, n, m)]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def _predict_once(self, arrays: Mapping[str, np.ndarray], signature: str, output_filter: Sequence[str],
                      check: bool, deadline: _Deadline) -> Dict[str, np.ndarray]:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=self.model_spec(signature), output_filter=list(output_filter))
        for name, arr in arrays.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
        if check:
            self.check_inputs(signature, request.inputs, deadline)
        try:
            response = self._call("Predict", self._predict.Predict, request, deadline)
        except ServingError as exc:
            if check and self.version is None and exc.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                                               grpc.StatusCode.FAILED_PRECONDITION):
                before = self._resolved
                try:
                    after, _ = self.signatures(deadline, refresh=True)
                except ServingError:
                    after = before
                if after != before:  # the label moved: say what the new version takes
                    self.check_inputs(signature, request.inputs, deadline)
            raise
        if self.version is None and response.model_spec.HasField("version"):
            self._resolved = int(response.model_spec.version.value)  # a moved label is noticed here
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
