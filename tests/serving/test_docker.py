"""Static checks of docker/: compose files (PyYAML), the GPU override, the pipeline Dockerfile."""
import os
import re

import yaml

DOCKER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docker")


def _compose(name):
    with open(os.path.join(DOCKER, name)) as fh:
        return yaml.safe_load(fh)


def _flags(service):
    return dict(arg.split("=", 1) for arg in service["command"])


def _pinned(image):
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest") and re.match(r"^[\w][\w.-]*$", tag)


def test_serving_service_flags_ports_and_mounts():
    svc = _compose("docker-compose.yml")["services"]["tf-serving"]
    assert svc["image"].startswith("tensorflow/serving:") and _pinned(svc["image"])
    flags = _flags(svc)
    assert flags["--port"] == "8500" and flags["--rest_api_port"] == "8501"
    assert flags["--model_config_file"] == "/config/models.config"
    assert flags["--enable_batching"] == "true"
    assert flags["--batching_parameters_file"] == "/config/batching_parameters.txt"
    assert flags["--monitoring_config_file"] == "/config/monitoring.config"
    assert flags["--allow_version_labels_for_unavailable_models"] == "true"  # labels at start-up (server_core.cc)
    assert sorted(svc["ports"]) == ["127.0.0.1:8500:8500", "127.0.0.1:8501:8501"]
    mounts = {m["target"]: m for m in svc["volumes"]}
    assert set(mounts) == {"/models", "/config"}
    assert all(m["read_only"] is True and m["type"] == "bind" for m in mounts.values())
    # every config file a flag names is mounted and exists in the repo
    for flag in ("--model_config_file", "--batching_parameters_file", "--monitoring_config_file"):
        path = flags[flag]
        assert path.startswith("/config/")
        assert os.path.isfile(os.path.join(DOCKER, "config", os.path.basename(path))), path


def test_no_port_is_published_on_all_interfaces():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for svc in _compose(name)["services"].values():
            for port in svc.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), (name, port)


def test_gpu_override_uses_gpu_image_and_reserves_a_device():
    base = _compose("docker-compose.yml")["services"]["tf-serving"]["image"]
    svc = _compose("docker-compose.gpu.yml")["services"]["tf-serving"]
    assert svc["image"] == base + "-gpu" and _pinned(svc["image"])
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) >= 1 for d in devices)


def test_all_images_pinned():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for svc_name, svc in _compose(name)["services"].items():
            if "image" in svc:
                assert _pinned(svc["image"]), (name, svc_name, svc["image"])
    with open(os.path.join(DOCKER, "pipeline.Dockerfile")) as fh:
        dockerfile = fh.read()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert bases and all(_pinned(b) for b in bases), bases
    assert bases[0].startswith("python:3.11")


def test_pipeline_dockerfile_installs_with_setup_script():
    with open(os.path.join(DOCKER, "pipeline.Dockerfile")) as fh:
        text = fh.read()
    assert "scripts/setup.sh" in text and "requirements.lock" in text
    assert 'ENTRYPOINT ["python", "-m", "pipeline.run"]' in text
    pipeline = _compose("docker-compose.yml")["services"]["pipeline"]
    assert pipeline["build"]["dockerfile"] == "docker/pipeline.Dockerfile"
    assert pipeline["profiles"] == ["pipeline"]  # never started by a plain `up`
    with open(os.path.join(DOCKER, "pipeline.Dockerfile.dockerignore")) as fh:
        ignored = fh.read().split()
    assert ".venv" in ignored and "artifacts" in ignored


def test_root_compose_file_includes_the_serving_stack():
    root = os.path.dirname(DOCKER)
    with open(os.path.join(root, "compose.yaml")) as fh:
        doc = yaml.safe_load(fh)
    included = [os.path.normpath(os.path.join(root, p)) for p in doc["include"]]
    assert included == [os.path.join(DOCKER, "docker-compose.yml")]
    assert "tf-serving" in _compose("docker-compose.yml")["services"]


def test_tls_override_is_the_base_command_plus_ssl_config():
    """Compose replaces `command` whole, so the TLS override repeats the base flags and adds --ssl_config_file,
    read from a separately mounted, read-only directory (ssl.config holds the private key)."""
    base = _compose("docker-compose.yml")["services"]["tf-serving"]
    tls = _compose("docker-compose.tls.yml")["services"]["tf-serving"]
    assert tls["command"] == base["command"] + ["--ssl_config_file=/tls/ssl.config"]
    mounts = {m["target"]: m for m in tls["volumes"]}
    assert mounts["/tls"]["read_only"] is True and mounts["/tls"]["type"] == "bind"
    assert "/tls" not in {m["target"] for m in base["volumes"]}


def test_serving_image_is_the_tensorflow_that_writes_the_savedmodels():
    """TF Serving loads the SavedModels that the installed TensorFlow exports: the image tags (CPU and GPU) name
    the same major.minor release as ``tensorflow.__version__`` (an older server may lack ops the exporter uses)."""
    import tensorflow as tf

    want = ".".join(tf.__version__.split(".")[:2])
    cpu = _compose("docker-compose.yml")["services"]["tf-serving"]["image"]
    gpu = _compose("docker-compose.gpu.yml")["services"]["tf-serving"]["image"]
    for image, suffix in ((cpu, ""), (gpu, "-gpu")):
        name, _, tag = image.rpartition(":")
        assert name == "tensorflow/serving", image
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)" + re.escape(suffix), tag)
        assert m, image
        assert f"{m.group(1)}.{m.group(2)}" == want, (image, tf.__version__)
