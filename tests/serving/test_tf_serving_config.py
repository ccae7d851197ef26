"""TF Serving config files: built with TF Serving's protos, parsed back, committed defaults in sync."""
import os
import re

import pytest
import yaml
from google.protobuf.descriptor import FieldDescriptor
from tensorflow_serving.config import model_server_config_pb2

from serving import tf_serving_config as cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_written_files_parse_back(tmp_path):
    models = [cfg.ServedModel("esm2", "/models/esm2", versions=[2, 1], labels={"stable": 1, "canary": 2}),
              cfg.ServedModel("esmm", "/models/esmm", versions=[3], labels={"stable": 3})]
    paths = cfg.write_configs(str(tmp_path), models, cfg.batching_parameters(
        max_batch_size=256, batch_timeout_micros=500, num_batch_threads=4, allowed_batch_sizes=[32, 128, 256]))
    assert sorted(os.listdir(tmp_path)) == sorted([cfg.MODELS_CONFIG, cfg.BATCHING_CONFIG, cfg.MONITORING_CONFIG])

    server = cfg.parse_text(open(paths[cfg.MODELS_CONFIG]).read(), model_server_config_pb2.ModelServerConfig)
    by_name = {c.name: c for c in server.model_config_list.config}
    esm2 = by_name["esm2"]
    assert esm2.base_path == "/models/esm2" and esm2.model_platform == "tensorflow"
    assert esm2.model_version_policy.WhichOneof("policy_choice") == "specific"
    assert list(esm2.model_version_policy.specific.versions) == [1, 2]
    assert dict(esm2.version_labels) == {"stable": 1, "canary": 2}
    assert dict(by_name["esmm"].version_labels) == {"stable": 3}

    batching = cfg.parse_text(open(paths[cfg.BATCHING_CONFIG]).read(), cfg.message_class("BatchingParameters"))
    assert batching.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    assert (batching.max_batch_size.value, batching.batch_timeout_micros.value, batching.num_batch_threads.value) \
        == (256, 500, 4)
    assert list(batching.allowed_batch_sizes) == [32, 128, 256]
    assert "max_batch_size {\n  value: 256\n}" in open(paths[cfg.BATCHING_CONFIG]).read()  # wrapper syntax

    monitoring = cfg.parse_text(open(paths[cfg.MONITORING_CONFIG]).read(), cfg.message_class("MonitoringConfig"))
    assert monitoring.prometheus_config.enable is True
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


PROTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_serving_protos")
_FIELD = re.compile(r"^\s*(repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", re.M)
_SCALARS = {"bool": FieldDescriptor.TYPE_BOOL, "string": FieldDescriptor.TYPE_STRING,
            "int64": FieldDescriptor.TYPE_INT64}


def _proto_messages(filename):
    """{message: {field: (repeated, type name, number)}} parsed from TF Serving's .proto text."""
    text = open(os.path.join(PROTOS, filename)).read()
    return {m.group(1): {f.group(3): (bool(f.group(1)), f.group(2), int(f.group(4))) for f in _FIELD.finditer(m.group(2))}
            for m in re.finditer(r"message\s+(\w+)\s*\{(.*?)\n\}", text, re.S)}


def _descriptor_fields(descriptor):
    out = {}
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            kind = f.message_type.full_name
        else:
            kind = next(name for name, t in _SCALARS.items() if t == f.type)
        out[f.name] = (f.label == FieldDescriptor.LABEL_REPEATED, kind, f.number)
    return out


@pytest.mark.parametrize("filename, names", [("batching_parameters.proto", ["BatchingParameters"]),
                                             ("monitoring_config.proto", ["MonitoringConfig", "PrometheusConfig"]),
                                             ("ssl_config.proto", ["SSLConfig"])])
def test_message_classes_match_tf_serving_proto_files(filename, names):
    """Every field of TF Serving 2.19.1's message (name, number, type, repeated) is in the class rankline writes
    with, and no other: a field missing from the mirror (e.g. enable_large_batch_splitting = 8) fails."""
    expected = _proto_messages(filename)
    descriptors = {"BatchingParameters": cfg.message_class("BatchingParameters").DESCRIPTOR,
                   "MonitoringConfig": cfg.message_class("MonitoringConfig").DESCRIPTOR,
                   "SSLConfig": cfg.message_class("SSLConfig").DESCRIPTOR}
    descriptors["PrometheusConfig"] = descriptors["MonitoringConfig"].fields_by_name["prometheus_config"].message_type
    for name in names:
        want = {field: (rep, kind if kind in _SCALARS else
                        (kind if "." in kind else f"tensorflow.serving.{kind}"), number)
                for field, (rep, kind, number) in expected[name].items()}
        assert want, f"no fields parsed for {name} from {filename}"
        assert descriptors[name].full_name == f"tensorflow.serving.{name}"
        assert _descriptor_fields(descriptors[name]) == want


def test_compose_start_up_obeys_tf_serving_label_rule():
    """At start-up nothing is AVAILABLE; TF Serving (server_core.cc, ReloadConfig -> UpdateModelVersionLabelMap
    before AddModelsViaModelConfigList) refuses every label then, unless the compose command sets the flag."""
    server = cfg.parse_text(open(os.path.join(REPO, "docker", "config", cfg.MODELS_CONFIG)).read(),
                            model_server_config_pb2.ModelServerConfig)
    assert dict(server.model_config_list.config[0].version_labels) == {"stable": 1}
    assert cfg.label_errors(server, available={}, allow_unavailable=False) == [
        "Request to assign label to version 1 of model esm2, which is not currently available for inference"]
    for name in ("docker-compose.yml", "docker-compose.tls.yml"):
        with open(os.path.join(REPO, "docker", name)) as fh:
            command = yaml.safe_load(fh)["services"]["tf-serving"]["command"]
        flags = dict(arg.split("=", 1) for arg in command)
        allow = flags.get(cfg.ALLOW_UNAVAILABLE_LABELS_FLAG) == "true"
        assert cfg.label_errors(server, available={}, allow_unavailable=allow) == [], name


def test_label_rule_as_tf_serving_states_it():
    """server_core.cc UpdateModelVersionLabelMap: with the flag a *new* label may name an unloaded version, an
    existing label may not move to one; without the flag only AVAILABLE versions take labels."""
    models = [cfg.ServedModel("esm2", "/models/esm2", versions=[1, 2], labels={"stable": 2, "canary": 2})]
    config = cfg.model_server_config(models)
    moved = "Request to assign label to version 2 of model esm2, which is not currently available for inference"
    # v1 serving with stable=1, v2 still loading: moving stable is refused even with the flag; canary (new) is not.
    assert cfg.label_errors(config, {"esm2": [1]}, {"esm2": {"stable": 1}}, allow_unavailable=True) == [moved]
    assert cfg.label_errors(config, {"esm2": [1]}, {"esm2": {"stable": 1}}, allow_unavailable=False) == [moved, moved]
    # once v2 is AVAILABLE both labels may point at it (phase two of a promotion)
    assert cfg.label_errors(config, {"esm2": [1, 2]}, {"esm2": {"stable": 1}}) == []
    # re-applying an unchanged label to a version that went away is allowed only with the flag
    same = cfg.model_server_config([cfg.ServedModel("esm2", "/models/esm2", versions=[2], labels={"stable": 2})])
    assert cfg.label_errors(same, {"esm2": []}, {"esm2": {"stable": 2}}, allow_unavailable=True) == []


def test_ssl_config_written_with_pem_contents(tmp_path):
    """--ssl-key/--ssl-cert/--ssl-client-ca write an SSLConfig holding the PEM texts (server.cc uses the fields
    as key and certificates, not paths), client_verify for mutual TLS, readable by the owner only."""
    pems = {}
    for name in ("key", "cert", "ca"):
        pems[name] = f"-----BEGIN {name.upper()}-----\n{name}-body\n-----END {name.upper()}-----\n"
        (tmp_path / f"{name}.pem").write_text(pems[name])
    out = tmp_path / "tls"
    assert cfg.main(["--out", str(out), "--ssl-key", str(tmp_path / "key.pem"), "--ssl-cert", str(tmp_path / "cert.pem"),
                     "--ssl-client-ca", str(tmp_path / "ca.pem")]) == 0
    path = out / cfg.SSL_CONFIG
    assert (path.stat().st_mode & 0o777) == 0o600
    ssl = cfg.parse_text(path.read_text(), cfg.message_class("SSLConfig"))
    assert (ssl.server_key, ssl.server_cert, ssl.custom_ca, ssl.client_verify) == (
        pems["key"], pems["cert"], pems["ca"], True)
    assert cfg.main(["--out", str(out), "--ssl-key", str(tmp_path / "key.pem")]) == 2
    with pytest.raises(ValueError, match="client_verify"):
        cfg.ssl_config(pems["key"], pems["cert"], None, client_verify=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": {"canary": 3}}, "label 'canary' -> version 3"),
    ({"versions": []}, "versions must be positive"),
])
def test_invalid_model_config(kwargs, match):
    args = dict(name="esm2", base_path="/models/esm2", versions=[1, 2])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cfg.ServedModel(**args)


def test_invalid_batching_and_bad_text():
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        cfg.batching_parameters(max_batch_size=64, allowed_batch_sizes=[32, 16])
    with pytest.raises(ValueError, match="models.config: not a valid tensorflow.serving.ModelServerConfig"):
        cfg.parse_text("model_config_list { nope: 1 }", model_server_config_pb2.ModelServerConfig, "models.config")


def test_committed_docker_configs_are_generator_output(tmp_path):
    assert cfg.main(["--out", str(tmp_path), "--model", "esm2", "--versions", "1"]) == 0
    for name in (cfg.MODELS_CONFIG, cfg.BATCHING_CONFIG, cfg.MONITORING_CONFIG):
        committed = open(os.path.join(REPO, "docker", "config", name)).read()
        assert committed == (tmp_path / name).read_text(), f"docker/config/{name} is stale: regenerate it"
