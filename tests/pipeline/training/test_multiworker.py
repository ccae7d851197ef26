"""MultiWorkerMirroredStrategy with two real worker processes on localhost (TF_CONFIG each, free ports).

* Two workers train the weights one process trains on the same data and global batch (ESM² on one tf.Example
  per row, STAN on columnar records; STAN's Beta state alpha/beta/count included): every worker reads the whole
  stream and keeps its replica's half of each global batch, so the two halves are the one-process batch, in its
  order (``fit_model``'s DATA sharding). 2 epochs of 8 steps, batches of 64 (32 a replica), shuffled (seed 3).
* A worker SIGKILLed mid-epoch: the cluster is restarted (the survivor cannot go on without its peer and is
  killed too), resumes from the chief's BackupAndRestore backup without redoing the steps it covers and ends
  with the weights of the uninterrupted two-worker run.

Processes run ``tests/pipeline/training/multiworker_worker.py``; every one is SIGKILLed when its test ends.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.training.train import backup_position, final_checkpoint
from tests.pipeline.training import multiworker_worker, train_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TIMEOUT_S = 300  # per process (a run takes ~20-60 s on 2 busy cores)
STEPS_PER_EPOCH = 8  # 512 train rows, batches of 64: every global batch splits evenly over 2 replicas
COMMON = {"epochs": 2, "shuffle": True, "seed": 3, "deterministic": True, "early_stopping_patience": 0,
          "backup_every_steps": 4, "batch_size": 64}
STAGE = ("alpha:0", "beta:0", "count:0", "position_sum:0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same rows as one tf.Example per row (ESM²'s input) and in the columnar format that preprocessing
    writes, 40-row blocks that batches straddle (STAN's input)."""
    rows, columnar = (str(tmp_path_factory.mktemp(n)) for n in ("mw-rows", "mw-columnar"))
    train_worker.write_data(rows, n_train=512, n_eval=128)
    multiworker_worker.write_columnar(columnar, n_train=512, n_eval=128)
    return {"esm2": rows, "stan": columnar}


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Processes:
    """Processes started by one test or fixture; on exit every one still running is SIGKILLed and reaped."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, {}

    def start(self, name, opts, tf_config=None):
        env = dict(os.environ)
        env.pop("TF_CONFIG", None)
        if tf_config is not None:
            env["TF_CONFIG"] = json.dumps(tf_config)
        with open(self.tmp / f"{name}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tests.pipeline.training.multiworker_worker",
                                     str(self.tmp / f"{name}.json"), json.dumps(opts)],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def cluster(self, prefix, opts, per_worker=({}, {})):
        """Two workers ``prefix``0 and ``prefix``1 of one cluster; ``per_worker`` adds options per worker."""
        ports = _free_ports(2)
        for i, extra in enumerate(per_worker):
            tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
            self.start(f"{prefix}{i}", dict(opts, strategy="multiworker", **extra), tf_config)

    def wait(self, name, timeout=TIMEOUT_S):
        proc = self.procs[name]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{name} ran past {timeout} s: {self.log(name)}")

    def result(self, name):
        code = self.wait(name)
        assert code == 0, f"{name} exited {code}: {self.log(name)}"
        return json.loads((self.tmp / f"{name}.json").read_text())

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()[-4000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """ESM² then STAN trained by one process and, at the same time, by an uninterrupted two-worker cluster."""
    tmp = tmp_path_factory.mktemp("mw-runs")
    opts = dict(COMMON, models=[["esm2", data["esm2"]], ["stan", data["stan"]]])
    with Processes(tmp) as procs:
        procs.start("reference", dict(opts, strategy="default", checkpoint_root=str(tmp / "ck-reference")))
        procs.cluster("worker", dict(opts, checkpoint_root=str(tmp / "ck-workers")))
        return {"reference": procs.result("reference"), "workers": [procs.result(f"worker{i}") for i in (0, 1)],
                "checkpoints": tmp / "ck-workers"}


def _assert_same_weights(actual, expected, what):
    assert set(actual) == set(expected), what
    for name in expected:
        np.testing.assert_allclose(np.asarray(actual[name]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: {name}")


@pytest.mark.parametrize("model", ["esm2", "stan"])
def test_two_workers_train_the_weights_of_one_process(runs, model):
    ref = runs["reference"][model]
    w0, w1 = (w[model] for w in runs["workers"])
    assert runs["workers"][0]["workers"] == 2 and runs["workers"][0]["replicas"] == 2
    for w in (w0, w1):
        assert w["info"]["replicas"] == 2 and w["info"]["steps_run"] == 2 * STEPS_PER_EPOCH
        assert w["iterations"] == 2 * STEPS_PER_EPOCH
    assert w0["weights"] == w1["weights"]  # mirrored: one model
    _assert_same_weights(w0["weights"], ref["weights"], f"{model}: 2 workers vs 1 process")
    # eval AUC over both workers' halves of every eval batch = one process's AUC over the eval set
    np.testing.assert_allclose(w0["history"]["val_ctr_auc"], ref["history"]["val_ctr_auc"], atol=1e-5)
    # the chief's final checkpoint holds the trained weights; the other worker's scratch copy is gone
    import tensorflow as tf

    prefix = final_checkpoint(str(runs["checkpoints"] / model))
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["ckpt.data-00000-of-00001", "ckpt.index"]
    saved = [tf.train.load_variable(prefix, n) for n, _ in tf.train.list_variables(prefix)
             if n.startswith("model/") and n.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
    for name, value in w0["weights"].items():  # every weight is in the checkpoint
        value = np.asarray(value)
        assert any(s.shape == value.shape and np.allclose(s, value, rtol=1e-6, atol=1e-7) for s in saved), name
    monitored = json.loads((runs["checkpoints"] / model / "monitor.json").read_text())
    np.testing.assert_allclose([monitored[str(e)] for e in range(2)], w0["history"]["val_ctr_auc"], atol=1e-6)
    if model == "stan":  # the Beta state after two passes, from the data alone (Algorithm 1: each event once)
        stage = {n: np.asarray(w0["weights"][n]) for n in STAGE}
        users = train_worker.arrays(512, 1)["user_id_id"]
        n_u = np.bincount(users, minlength=stage["count:0"].shape[0])
        np.testing.assert_array_equal(stage["count:0"], n_u)
        np.testing.assert_array_equal(stage["position_sum:0"], n_u * (n_u + 1) / 2)
        np.testing.assert_allclose(stage["alpha:0"] + stage["beta:0"],
                                   np.repeat(2 + (n_u * (n_u + 1) / 2)[:, None], 3, axis=1), rtol=1e-6)


def _poll(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("victim", [0, 1], ids=["chief-killed", "worker1-killed"])
def test_killed_worker_cluster_restarts_from_backup(runs, data, tmp_path, victim):
    """Backups every 4 steps; worker ``victim`` is SIGKILLed after step 12 (epoch 2, step 4 of 8) and its
    backup. The survivor is stuck at step 13 (it needs its peer) and is killed once the chief's backup of step
    12 is on disk. Both restart: they resume at epoch 2 step 4, run only the 4 remaining steps and end with the
    uninterrupted two-worker run's STAN (Beta state included)."""
    ck = str(tmp_path / "ck")
    backup = os.path.join(ck, "stan", "backup")
    opts = dict(COMMON, models=[["stan", data["stan"]]], checkpoint_root=ck)
    with Processes(tmp_path) as procs:
        kill = [{}, {}]
        kill[victim] = {"kill_after_steps": 12}
        procs.cluster("killed", opts, kill)
        code = procs.wait(f"killed{victim}")
        assert code == -signal.SIGKILL, procs.log(f"killed{victim}")
        survivor = f"killed{1 - victim}"
        assert procs.procs[survivor].poll() != 0, procs.log(survivor)  # stuck, or failed without its peer
        _poll(lambda: backup_position(backup, STEPS_PER_EPOCH) == (1, 4), 120, "the chief's backup of step 12")
        procs.procs[survivor].kill()
        procs.wait(survivor)
        assert not (tmp_path / "killed0.json").exists() and not (tmp_path / "killed1.json").exists()
        assert backup_position(backup, STEPS_PER_EPOCH) == (1, 4)

        procs.cluster("resumed", opts)
        resumed = [procs.result(f"resumed{i}")["stan"] for i in (0, 1)]
    full = runs["workers"][0]["stan"]
    for r in resumed:
        assert (r["info"]["initial_epoch"], r["info"]["initial_step"]) == (1, 4)
        assert r["info"]["steps_run"] == 2 * STEPS_PER_EPOCH - 12  # nothing redone
        assert r["iterations"] == 2 * STEPS_PER_EPOCH
        assert len(r["history"]["val_ctr_auc"]) == 1  # epoch 2 only
        np.testing.assert_allclose(r["history"]["val_ctr_auc"], full["history"]["val_ctr_auc"][1:], atol=1e-5)
    assert resumed[0]["weights"] == resumed[1]["weights"]
    _assert_same_weights(resumed[0]["weights"], full["weights"], "resumed vs uninterrupted 2-worker STAN")
    assert not os.path.exists(os.path.join(backup, "chief"))  # a finished run leaves no backup
