"""The gRPC client against the stand-in TF Serving (tests/serving/fake_tf_serving.py) on 127.0.0.1."""
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from serving.client import ServingError, SignatureMismatch, TFServingClient
from tests.serving.fake_tf_serving import FakeTFServing, load
from transforms.features import BUILTIN

USER_FIELDS = ("user_id", "user_gender", "user_age", "user_city", "user_power", "user_orders_90d", "segment",
               "device", "page", "timestamp")


@pytest.fixture(scope="module")
def versions(served_export, e2e_run):
    """Version 1: the random-weight export (stable); version 2: the e2e run's trained export (canary)."""
    return {1: served_export["version_dir"], 2: e2e_run["summary"]["export"]}


@pytest.fixture(scope="module")
def server(versions):
    srv = FakeTFServing({"esm2": versions}, labels={"esm2": {"stable": 1, "canary": 2}}).start()
    yield srv
    srv.stop(0)


def _in_process(path, examples):
    out = load(path).signatures["serving_default"](examples=tf.constant(examples))
    return {k: v.numpy() for k, v in out.items()}


def _assert_scores(got, want):
    assert set(got) == set(want) == {"ctr", "ctavr", "cvr", "ctcvr"}
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_grpc_scores_equal_in_process_scores(server, versions, served_export):
    examples = served_export["examples"]
    with TFServingClient(server.target, "esm2") as client:
        assert client.wait_until_available(timeout_s=5) == 2  # latest
        _assert_scores(client.score_examples(examples), _in_process(versions[2], examples))
    for kwargs, v in (({"version": 1}, 1), ({"version_label": "stable"}, 1), ({"version_label": "canary"}, 2)):
        with TFServingClient(server.target, "esm2", **kwargs) as client:
            _assert_scores(client.score_examples([tf.train.Example.FromString(e) for e in examples]),
                           _in_process(versions[v], examples))
    a, b = _in_process(versions[1], examples), _in_process(versions[2], examples)
    assert np.max(np.abs(a["ctr"] - b["ctr"])) > 1e-3  # the two versions really differ


def test_score_one_user_against_candidates(server, versions, raw_rows):
    from serving.examples import serialize_rows

    user = {k: raw_rows[0][k] for k in USER_FIELDS}
    from tests.serving.conftest import complete_rows

    user = complete_rows([user], BUILTIN)[0]
    user = {k: v for k, v in user.items() if k in USER_FIELDS or (k.startswith("uf_") and "item" not in k)}
    candidates = [{k: v for k, v in r.items() if k.startswith("item_") or k == "uf_item_in_history"}
                  for r in complete_rows(raw_rows[4:16], BUILTIN)]
    rows = [{**user, **c} for c in candidates]
    want = _in_process(versions[1], serialize_rows(rows, BUILTIN))
    with TFServingClient(server.target, "esm2", version=1) as client:
        _assert_scores(client.score_candidates(user, candidates, BUILTIN), want)
        _assert_scores(client.score_candidates(user, candidates, BUILTIN, signature="predict_raw"), want)
        with pytest.raises(ValueError, match=r"candidate 0: field\(s\) \['user_id'\]"):
            client.score_candidates(user, [{**candidates[0], "user_id": -5}], BUILTIN)


def test_inputs_checked_against_metadata_before_sending(server, served_export):
    with TFServingClient(server.target, "esm2", version=1) as client:
        before = server.requests
        with pytest.raises(SignatureMismatch, match=r"missing input\(s\) \['examples'\].*unexpected input\(s\) \['rows'\]"):
            client.predict({"rows": np.array([b"x"], dtype=object)})
        with pytest.raises(SignatureMismatch, match="input 'examples': dtype DT_INT64, the model takes DT_STRING"):
            client.predict({"examples": np.array([1, 2], dtype=np.int64)})
        with pytest.raises(SignatureMismatch, match="input 'examples': rank 2"):
            client.predict({"examples": np.array([[b"a"]], dtype=object)})
        with pytest.raises(SignatureMismatch, match="no signature 'nope'.*predict_raw"):
            client.predict({"examples": np.array([b"a"], dtype=object)}, signature="nope")
        with pytest.raises(SignatureMismatch, match=r"predict_raw.*missing input\(s\)"):
            client.predict({"user_id": np.array([1], np.int64)}, signature="predict_raw")
        assert server.requests == before  # none of them reached Predict


def test_server_side_errors_are_clear_and_do_not_break_the_server(server, served_export):
    examples = served_export["examples"][:3]
    with TFServingClient(server.target, "esm2", version=1) as client:
        with pytest.raises(ServingError) as err:
            client.predict({"examples": np.array([b"a"], dtype=object)}, signature="nope", check=False)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "nope" in str(err.value)
        with pytest.raises(ServingError) as err:
            client.score_examples([b"\xff\x00 definitely not a tf.Example"])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1
        with pytest.raises(ServingError) as err:
            client.predict({"wrong": np.array([b"a"], dtype=object)}, check=False)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "wrong" in err.value.details
        assert client.score_examples(examples)["ctr"].shape == (3,)  # still serving
    for kwargs, match in (({"version": 9}, "Specific\\(esm2, 9\\)"), ({"version_label": "beta"}, "beta")):
        with TFServingClient(server.target, "esm2", **kwargs) as client:
            with pytest.raises(ServingError, match=match) as err:
                client.score_examples(examples)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    with TFServingClient(server.target, "nosuchmodel") as client:
        with pytest.raises(ServingError) as err:
            client.model_status()
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_wait_until_available_follows_model_status(versions):
    srv = FakeTFServing({"esm2": {1: versions[1]}}, load_delay_s=0.8).start()
    try:
        with TFServingClient(srv.target, "esm2", version=1) as client:
            assert client.model_status() == {1: ("LOADING", "")}
            with pytest.raises(TimeoutError, match="v1: LOADING"):
                client.wait_until_available(timeout_s=0.2, poll_s=0.05)
            start = time.monotonic()
            assert client.wait_until_available(timeout_s=5, poll_s=0.05) == 1
            assert 0.3 < time.monotonic() - start < 3
            assert client.model_status() == {1: ("AVAILABLE", "")}
    finally:
        srv.stop(0)


def test_deadline_fires_and_is_not_retried(versions, served_export):
    srv = FakeTFServing({"esm2": {1: versions[1]}}, predict_delay_s=1.5).start()
    try:
        with TFServingClient(srv.target, "esm2", timeout_s=0.3) as client:
            client.signature("serving_default")  # metadata is not delayed
            start = time.monotonic()
            with pytest.raises(ServingError) as err:
                client.score_examples(served_export["examples"][:2])
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
            assert time.monotonic() - start < 1.2
    finally:
        srv.stop(0)


def test_retries_survive_a_server_restart(versions, served_export):
    examples = served_export["examples"][:5]
    srv = FakeTFServing({"esm2": {1: versions[1]}}).start()
    port = srv.port
    with TFServingClient(srv.target, "esm2", max_attempts=8, backoff_s=0.1, timeout_s=2) as client:
        first = client.score_examples(examples)
        srv.stop(0)
        holder = {}

        def restart():
            time.sleep(0.6)
            holder["srv"] = FakeTFServing({"esm2": {1: versions[1]}}, port=port).start()

        thread = threading.Thread(target=restart)
        thread.start()
        delays = []
        real_sleep = client._sleep
        client._sleep = lambda s: (delays.append(s), real_sleep(s))
        try:
            again = client.score_examples(examples)
        finally:
            thread.join()
            holder["srv"].stop(0)
        _assert_scores(again, first)
        assert delays, "the call should have been retried while the server was down"


def test_unavailable_gives_up_after_bounded_backoff():
    with TFServingClient("127.0.0.1:1", "esm2", max_attempts=4, backoff_s=0.01, timeout_s=1) as client:
        delays = []
        client._sleep = delays.append
        with pytest.raises(ServingError) as err:
            client.score_examples([b""])
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 4
    assert len(delays) == 3
    assert all(0.5 * 0.01 * 2 ** i <= d <= 0.01 * 2 ** i for i, d in enumerate(delays)), delays


def test_score_cli_target_backend(server, versions, raw_rows, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw_rows[:5]))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "serving.score", "--target", server.target, "--version-label",
                           "stable", "--input", str(path)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines[0] == ["row", "ctavr", "ctcvr", "ctr", "cvr"] and len(lines) == 6
    from serving.examples import serialize_rows

    want = _in_process(versions[1], serialize_rows(raw_rows[:5], BUILTIN))
    got = np.array([[float(x) for x in line[1:]] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([want[n] for n in lines[0][1:]], axis=1), atol=2e-6)
    bad = subprocess.run([sys.executable, "-m", "serving.score", "--target", server.target, "--version", "9",
                          "--input", str(path)], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Specific(esm2, 9)" in bad.stderr


def test_bench_latency_grpc_path_against_the_stand_in(server, e2e_run):
    from serving.bench_latency import bench_grpc, format_table

    parquet = os.path.join(e2e_run["summary"]["input"]["dir"], "part-00000.parquet")
    before = server.requests
    got = bench_grpc(server.target, "esm2", parquet, [1, 5], reps=10, timeout_s=10)
    assert set(got) == {1, 5} and all(0 < p50 <= p99 for p50, p99 in got.values())
    assert server.requests - before == 2 * (10 + 10)  # warmup + timed calls per size
    assert "grpc p99" in format_table({"grpc": got}, [1, 5])


def test_bench_latency_grpc_overhead_runs_the_served_version_in_process(server, versions, e2e_run):
    """With export_dir the served version also runs in-process on the same examples (scores checked equal
    first); a directory holding another version is refused, since the difference would mean nothing."""
    from serving.bench_latency import bench_grpc, format_grpc_overhead

    parquet = os.path.join(e2e_run["summary"]["input"]["dir"], "part-00000.parquet")
    before, local = server.requests, {}
    got = bench_grpc(server.target, "esm2", parquet, [3], reps=10, timeout_s=10, export_dir=versions[2], local=local)
    assert server.requests - before == 10 + 10  # warmup (the first compared with in-process), timed calls
    assert set(local) == {3} and 0 < local[3][0] <= local[3][1]
    head, row = format_grpc_overhead(got, local, [3]).splitlines()
    assert "gRPC adds p50" in head
    assert [float(v) for v in row.split()] == pytest.approx(
        [3, got[3][0] - local[3][0], got[3][1] - local[3][1]], abs=1e-3)
    with pytest.raises(ValueError, match="differently from the model served"):
        bench_grpc(server.target, "esm2", parquet, [3], reps=10, timeout_s=10, export_dir=versions[1], local={})
