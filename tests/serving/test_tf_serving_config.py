"""TF Serving config files: built with TF Serving's protos, parsed back, committed defaults in sync."""
import os

import pytest
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


def test_field_numbers_match_tf_serving_protos():
    batching = cfg.message_class("BatchingParameters").DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in batching.items()} == {
        "max_batch_size": 1, "batch_timeout_micros": 2, "max_enqueued_batches": 3, "num_batch_threads": 4,
        "thread_pool_name": 5, "allowed_batch_sizes": 6, "pad_variable_length_inputs": 7}
    prometheus = cfg.message_class("MonitoringConfig").DESCRIPTOR.fields_by_name["prometheus_config"].message_type
    assert {f.name: f.number for f in prometheus.fields} == {"enable": 1, "path": 2}


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
