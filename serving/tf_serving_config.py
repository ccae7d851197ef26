"""TF Serving configuration files, built from TF Serving's own protos and written as text protos.

    python -m serving.tf_serving_config --out docker/config --model esm2 --versions 1 2 --stable 1 --canary 2

Writes into ``--out``:

* ``models.config`` (``--model_config_file``): a ``ModelServerConfig`` whose ``model_config_list`` has one
  ``ModelConfig`` per model: ``base_path`` (as the server sees it, e.g. ``/models/esm2``), platform
  ``tensorflow``, a ``specific`` version policy (exactly the listed versions are loaded) and the
  ``version_labels`` ``stable`` / ``canary``. Labelled versions must be among ``versions`` (checked here).
* ``ssl.config`` (``--ssl_config_file``, only with ``--ssl-key``/``--ssl-cert``): an ``SSLConfig`` holding the
  server's PEM key and certificate and, for mutual TLS, the client CA with ``client_verify`` (written 0600; it
  contains the private key: keep it out of version control).

Labels at start-up (TF Serving 2.19.1 ``server_core.cc``): ``ServerCore::ReloadConfig`` calls
``UpdateModelVersionLabelMap()`` *before* ``AddModelsViaModelConfigList()``, and ``UpdateModelVersionLabelMap``
returns FAILED_PRECONDITION "Request to assign label to version V of model M, which is not currently
available for inference" for a label whose version is not AVAILABLE, unless
``--allow_version_labels_for_unavailable_models`` is set and the label does not already point at another
version. At start-up nothing is loaded yet, so a config with labels only starts with that flag; the compose
files pass it. Moving an existing label (``stable`` 1 -> 2) is refused until the new version is AVAILABLE,
flag or not: promotion is two-phase (load the version, wait for AVAILABLE, then move the label).
``label_errors`` states this rule and the tests hold the generated config and compose flags to it.
* ``batching_parameters.txt`` (``--batching_parameters_file``, with ``--enable_batching``): a
  ``BatchingParameters`` text proto.
* ``monitoring.config`` (``--monitoring_config_file``): a ``MonitoringConfig`` exposing Prometheus metrics at
  ``/monitoring/prometheus/metrics`` on the REST port.

``ModelServerConfig`` comes from ``tensorflow_serving.config.model_server_config_pb2`` (tensorflow-serving-api).
That package does not ship ``monitoring_config.proto`` or ``session_bundle_config.proto``; when their modules
are absent the two messages are declared here with the same package, names, field numbers and types as
TF Serving's ``tensorflow_serving/config/monitoring_config.proto`` and
``tensorflow_serving/servables/tensorflow/session_bundle_config.proto``, so the text is what the server parses.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from google.protobuf import text_format

MODELS_CONFIG = "models.config"
BATCHING_CONFIG = "batching_parameters.txt"
MONITORING_CONFIG = "monitoring.config"
SSL_CONFIG = "ssl.config"
ALLOW_UNAVAILABLE_LABELS_FLAG = "--allow_version_labels_for_unavailable_models"
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

_messages: Dict[str, type] = {}


def _mirror_messages() -> Dict[str, type]:
    """BatchingParameters and MonitoringConfig message classes mirroring TF Serving's protos."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(name="rankline/tf_serving_mirror.proto", package="tensorflow.serving",
                                             syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    T = descriptor_pb2.FieldDescriptorProto

    def add(msg, name, number, kind, type_name=None, repeated=False):
        f = msg.field.add(name=name, number=number, type=kind,
                          label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL)
        if type_name:
            f.type_name = type_name

    batching = fdp.message_type.add(name="BatchingParameters")
    for name, number in (("max_batch_size", 1), ("batch_timeout_micros", 2), ("max_enqueued_batches", 3),
                         ("num_batch_threads", 4)):
        add(batching, name, number, T.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    add(batching, "thread_pool_name", 5, T.TYPE_MESSAGE, ".google.protobuf.StringValue")
    add(batching, "allowed_batch_sizes", 6, T.TYPE_INT64, repeated=True)
    add(batching, "pad_variable_length_inputs", 7, T.TYPE_BOOL)
    add(batching, "enable_large_batch_splitting", 8, T.TYPE_MESSAGE, ".google.protobuf.BoolValue")
    add(batching, "max_execution_batch_size", 9, T.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    prometheus = fdp.message_type.add(name="PrometheusConfig")
    add(prometheus, "enable", 1, T.TYPE_BOOL)
    add(prometheus, "path", 2, T.TYPE_STRING)
    monitoring = fdp.message_type.add(name="MonitoringConfig")
    add(monitoring, "prometheus_config", 1, T.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")
    ssl = fdp.message_type.add(name="SSLConfig")
    for name, number in (("server_key", 1), ("server_cert", 2), ("custom_ca", 3)):
        add(ssl, name, number, T.TYPE_STRING)
    add(ssl, "client_verify", 4, T.TYPE_BOOL)
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
            for name in ("BatchingParameters", "MonitoringConfig", "SSLConfig")}


def message_class(name: str) -> type:
    """``BatchingParameters``, ``MonitoringConfig`` or ``SSLConfig``: TF Serving's generated class when installed,
    else the mirror."""
    if name not in _messages:
        try:
            if name == "BatchingParameters":
                from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2 as mod
            elif name == "SSLConfig":
                from tensorflow_serving.config import ssl_config_pb2 as mod
            else:
                from tensorflow_serving.config import monitoring_config_pb2 as mod
            _messages[name] = getattr(mod, name)
        except ImportError:
            _messages.update({k: v for k, v in _mirror_messages().items() if k not in _messages})
    return _messages[name]


@dataclass(frozen=True)
class ServedModel:
    """One model directory TF Serving loads: ``base_path`` holds the numeric version directories."""

    name: str
    base_path: str
    versions: Sequence[int] = (1,)
    labels: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"model name must be non-empty without '/', got {self.name!r}")
        if not self.versions or any(int(v) < 1 for v in self.versions):
            raise ValueError(f"model {self.name!r}: versions must be positive integers, got {list(self.versions)}")
        for label, version in self.labels.items():
            if int(version) not in {int(v) for v in self.versions}:
                raise ValueError(f"model {self.name!r}: label {label!r} -> version {version}, which is not among "
                                 f"the served versions {sorted(int(v) for v in self.versions)}")


def model_server_config(models: Sequence[ServedModel]):
    """ModelServerConfig proto for ``models``."""
    from tensorflow_serving.config import model_server_config_pb2

    if not models:
        raise ValueError("at least one model is needed")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    config = model_server_config_pb2.ModelServerConfig()
    for m in models:
        entry = config.model_config_list.config.add(name=m.name, base_path=m.base_path, model_platform="tensorflow")
        entry.model_version_policy.specific.versions.extend(sorted({int(v) for v in m.versions}))
        for label, version in sorted(m.labels.items()):
            entry.version_labels[label] = int(version)
    return config


def label_errors(config, available: Optional[Mapping[str, Sequence[int]]] = None,
                 current_labels: Optional[Mapping[str, Mapping[str, int]]] = None,
                 allow_unavailable: bool = False) -> List[str]:
    """TF Serving's ``UpdateModelVersionLabelMap`` rule (server_core.cc, 2.19.1) for applying ``config``.

    ``available``: {model: versions AVAILABLE now} (start-up: none); ``current_labels``: the server's label map
    before this config (start-up: none); ``allow_unavailable``: ``--allow_version_labels_for_unavailable_models``.
    A label may point at a version that is not AVAILABLE only with the flag, and then only when the label is new
    or already points at that version. Returns TF Serving's FAILED_PRECONDITION message per refused label
    (the server stops at the first; this lists all). Empty = the server accepts the config.
    """
    available = {m: {int(v) for v in vs} for m, vs in (available or {}).items()}
    current = {m: dict(ls) for m, ls in (current_labels or {}).items()}
    errors = []
    for entry in config.model_config_list.config:
        for label, version in sorted(entry.version_labels.items()):
            existing = current.get(entry.name, {}).get(label)
            allowed = allow_unavailable and (existing is None or existing == version)
            if not allowed and version not in available.get(entry.name, set()):
                errors.append(f"Request to assign label to version {version} of model {entry.name}, which is not "
                              "currently available for inference")
    return errors


def batching_parameters(max_batch_size: int = 1024, batch_timeout_micros: int = 1000, max_enqueued_batches: int = 64,
                        num_batch_threads: int = 2, allowed_batch_sizes: Optional[Sequence[int]] = None,
                        pad_variable_length_inputs: bool = False):
    """BatchingParameters proto. ``allowed_batch_sizes`` must increase and end at ``max_batch_size``.

    Requests of several candidates are merged up to ``max_batch_size`` rows within
    ``batch_timeout_micros``; ``num_batch_threads`` ~ the cores given to the server.
    """
    if min(max_batch_size, num_batch_threads, max_enqueued_batches) < 1 or batch_timeout_micros < 0:
        raise ValueError("batching: max_batch_size, num_batch_threads, max_enqueued_batches must be >= 1 and "
                         "batch_timeout_micros >= 0")
    sizes = list(allowed_batch_sizes or [])
    if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != max_batch_size):
        raise ValueError(f"batching: allowed_batch_sizes {sizes} must increase and end at max_batch_size "
                         f"{max_batch_size}")
    msg = message_class("BatchingParameters")()
    msg.max_batch_size.value = int(max_batch_size)
    msg.batch_timeout_micros.value = int(batch_timeout_micros)
    msg.max_enqueued_batches.value = int(max_enqueued_batches)
    msg.num_batch_threads.value = int(num_batch_threads)
    msg.allowed_batch_sizes.extend(int(s) for s in sizes)
    msg.pad_variable_length_inputs = bool(pad_variable_length_inputs)
    return msg


def monitoring_config(path: str = PROMETHEUS_PATH):
    """MonitoringConfig proto enabling the Prometheus endpoint at ``path``."""
    if not path.startswith("/"):
        raise ValueError(f"prometheus path must start with '/', got {path!r}")
    msg = message_class("MonitoringConfig")()
    msg.prometheus_config.enable = True
    msg.prometheus_config.path = path
    return msg


def ssl_config(server_key: str, server_cert: str, custom_ca: Optional[str] = None, client_verify: bool = False):
    """SSLConfig proto (TF Serving's ``--ssl_config_file``): PEM *contents*, not paths (server.cc reads the fields
    as the key, certificate and CA themselves). ``client_verify`` (mutual TLS) needs ``custom_ca``."""
    for name, pem in (("server_key", server_key), ("server_cert", server_cert)):
        if "-----BEGIN" not in (pem or ""):
            raise ValueError(f"ssl: {name} is not a PEM text")
    if client_verify and not custom_ca:
        raise ValueError("ssl: client_verify (mutual TLS) needs custom_ca, the CA that signs the client certificates")
    msg = message_class("SSLConfig")()
    msg.server_key, msg.server_cert = server_key, server_cert
    msg.custom_ca = custom_ca or ""
    msg.client_verify = bool(client_verify)
    return msg


def to_text(message) -> str:
    return text_format.MessageToString(message)


def parse_text(text: str, message_type: type, source: str = "<text>"):
    """Parses a text proto into ``message_type``; errors name ``source``."""
    msg = message_type()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ValueError(f"{source}: not a valid {message_type.DESCRIPTOR.full_name} text proto ({exc})") from None
    return msg


def write_text_atomic(path: str, text: str, mode: int = 0o644) -> str:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a polling server never reads half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_configs(out_dir: str, models: Sequence[ServedModel], batching=None, monitoring=None,
                  ssl=None) -> Dict[str, str]:
    """Writes the config files into ``out_dir`` (``ssl.config`` only when ``ssl`` is given, mode 0600);
    returns {file name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    texts = {MODELS_CONFIG: to_text(model_server_config(models)),
             BATCHING_CONFIG: to_text(batching if batching is not None else batching_parameters()),
             MONITORING_CONFIG: to_text(monitoring if monitoring is not None else monitoring_config())}
    paths = {name: write_text_atomic(os.path.join(out_dir, name), text) for name, text in texts.items()}
    if ssl is not None:
        paths[SSL_CONFIG] = write_text_atomic(os.path.join(out_dir, SSL_CONFIG), to_text(ssl), mode=0o600)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.tf_serving_config", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for models.config, batching_parameters.txt, monitoring.config")
    p.add_argument("--model", default="esm2", help="model name (the directory under --models-root)")
    p.add_argument("--models-root", default="/models", help="where the server sees the export base (default /models)")
    p.add_argument("--versions", type=int, nargs="+", default=[1], help="versions to load (specific policy)")
    p.add_argument("--stable", type=int, default=None, help="version labelled 'stable' (default: the highest)")
    p.add_argument("--canary", type=int, default=None, help="version labelled 'canary' (default: none)")
    p.add_argument("--max-batch-size", type=int, default=1024)
    p.add_argument("--batch-timeout-micros", type=int, default=1000)
    p.add_argument("--num-batch-threads", type=int, default=2)
    p.add_argument("--ssl-key", help="server private key (PEM file): also writes ssl.config for --ssl_config_file")
    p.add_argument("--ssl-cert", help="server certificate chain (PEM file)")
    p.add_argument("--ssl-client-ca", help="CA (PEM file) that signs client certificates: mutual TLS (client_verify)")
    args = p.parse_args(argv)
    labels = {"stable": args.stable if args.stable is not None else max(args.versions)}
    if args.canary is not None:
        labels["canary"] = args.canary
    try:
        model = ServedModel(args.model, f"{args.models_root.rstrip('/')}/{args.model}", args.versions, labels)
        ssl = None
        if args.ssl_key or args.ssl_cert or args.ssl_client_ca:
            if not (args.ssl_key and args.ssl_cert):
                raise ValueError("--ssl-key and --ssl-cert go together (--ssl-client-ca adds mutual TLS)")
            pems = {k: open(v, encoding="utf-8").read() if v else None
                    for k, v in (("key", args.ssl_key), ("cert", args.ssl_cert), ("ca", args.ssl_client_ca))}
            ssl = ssl_config(pems["key"], pems["cert"], pems["ca"], client_verify=bool(args.ssl_client_ca))
        paths = write_configs(args.out, [model], batching_parameters(
            max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros,
            num_batch_threads=args.num_batch_threads), ssl=ssl)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
