"""Two-phase promotion against the stand-in TF Serving (which follows TF Serving's label and loading rules):
labels move only once the version is AVAILABLE, a client scoring through ``stable`` during the swaps never
fails, a version that fails to load leaves ``stable`` where it was, retention deletes only unloaded versions."""
import os
import shutil
import threading
import time

import grpc
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import promote as P
from serving import tf_serving_config as tsc
from tests.serving.fake_tf_serving import FakeTFServing


def _predict_version(target, examples, label="stable"):
    """Predict through ``label``; returns the version that answered (TF Serving's response model_spec)."""
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "esm2"
    request.model_spec.version_label = label
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples[:4]))
    with grpc.insecure_channel(target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert tf.make_ndarray(response.outputs["ctr"]).shape == (4,)
    return response.model_spec.version.value


class ContinuousScoring:
    """A thread predicting through ``stable`` until stopped: ``seen`` the answering versions, ``failures`` every
    failed request (gRPC code and message, or the exception)."""

    def __init__(self, target, examples, pause_s=0.01):
        self.seen, self.failures, self._stop = [], [], threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target, examples, pause_s), daemon=True)

    def _run(self, target, examples, pause_s):
        while not self._stop.is_set():
            try:
                self.seen.append(_predict_version(target, examples))
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            except Exception as exc:  # noqa: BLE001  (any failed request fails the test)
                self.failures.append(repr(exc))
            time.sleep(pause_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def served(served_export, tmp_path):
    """A model base with version 1, a models.config with stable=1, and a stand-in polling both."""
    base = tmp_path / "models" / "esm2"
    base.mkdir(parents=True)
    shutil.copytree(served_export["version_dir"], base / "1")
    config_path = str(tmp_path / "models.config")
    paths = tsc.write_configs(str(tmp_path), [tsc.ServedModel("esm2", str(base), versions=[1], labels={"stable": 1})])
    assert paths[tsc.MODELS_CONFIG] == config_path
    server = FakeTFServing(model_config_file=config_path, file_system_poll_wait_seconds=0.2,
                           allow_version_labels_for_unavailable_models=True).start()
    yield {"server": server, "base": base, "config": config_path, "examples": served_export["examples"],
           "version_dir": served_export["version_dir"]}
    server.stop(0)


def test_promotion_moves_stable_after_load_under_continuous_scoring_and_retires_old_versions(served):
    target, base = served["server"].target, served["base"]
    promoter = P.Promoter(served["config"], "esm2", target=target, export_base=str(base), timeout_s=60, poll_s=0.1)
    with ContinuousScoring(target, served["examples"]) as client:
        for version in (2, 3):
            shutil.copytree(served["version_dir"], base / str(version))
            record = promoter.promote(version, keep=2)
            assert record["mode"] == "two-phase"
            # right after promote returns, stable answers with the new version
            assert _predict_version(target, served["examples"]) == version
            assert _predict_version(target, served["examples"], "canary") == version
    seen, failures = client.seen, client.failures
    assert failures == []
    assert seen[0] == 1 and seen[-1] == 3 and sorted(set(seen)) == [1, 2, 3]
    assert seen == sorted(seen)  # stable only ever moved forward
    # retention: version 1 left the policy, was unloaded, then deleted; 2 and 3 stay
    config = P.read_config(served["config"])
    assert P.served_versions(config, "esm2") == [2, 3]
    assert dict(config.model_config_list.config[0].version_labels) == {"stable": 3, "canary": 3}
    assert sorted(os.listdir(base)) == ["2", "3"]
    states = promoter.status()
    assert states[1][0] == "END" and states[2][0] == states[3][0] == "AVAILABLE"
    assert record["retired"] == [1] and record["deleted"] == [str(base / "1")]


def test_version_that_fails_to_load_leaves_stable_and_the_policy_as_they_were(served):
    target, base = served["server"].target, served["base"]
    broken = base / "2"
    shutil.copytree(served["version_dir"], broken)
    with open(broken / "assets.extra" / "tf_serving_warmup_requests", "wb") as fh:
        fh.write(b"not a TFRecord")
    promoter = P.Promoter(served["config"], "esm2", target=target, export_base=str(base), timeout_s=60, poll_s=0.1)
    with pytest.raises(P.PromotionError, match=r"version 2 of esm2 failed to load: .*; stable stays at 1"):
        promoter.promote(2)
    config = P.read_config(served["config"])
    assert P.served_versions(config, "esm2") == [1]
    assert dict(config.model_config_list.config[0].version_labels) == {"stable": 1}
    assert _predict_version(target, served["examples"]) == 1
    assert os.path.isdir(base / "1")


def test_labels_on_a_version_not_loaded_are_refused_by_the_server(served):
    """Why the promotion has two phases: the one-step config (version + stable) is refused while it loads."""
    target, base = served["server"].target, served["base"]
    shutil.copytree(served["version_dir"], base / "2")
    promoter = P.Promoter(served["config"], "esm2", target=target, timeout_s=30)
    one_step = P.with_versions(P.read_config(served["config"]), "esm2", [1, 2], {"stable": 2})
    with pytest.raises(P.PromotionError, match="Request to assign label to version 2 of model esm2, which is not "
                                               "currently available for inference"):
        promoter.apply(one_step)
    assert _predict_version(target, served["examples"]) == 1


def test_without_a_server_the_file_gets_version_and_labels_at_once(tmp_path):
    tsc.write_configs(str(tmp_path), [tsc.ServedModel("esm2", "/models/esm2", versions=[1], labels={"stable": 1})])
    path = str(tmp_path / tsc.MODELS_CONFIG)
    record = P.Promoter(path, "esm2").promote(2, keep=3)
    config = P.read_config(path)
    assert P.served_versions(config, "esm2") == [1, 2] and record["mode"] == "file only"
    assert dict(config.model_config_list.config[0].version_labels) == {"stable": 2, "canary": 2}
    # at start-up this file is accepted by a server started with the compose flag, refused without it
    assert tsc.label_errors(config, {}, allow_unavailable=True) == []
    assert tsc.label_errors(config, {}, allow_unavailable=False)
