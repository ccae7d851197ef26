"""The training loop: config validation, resume after SIGKILL, MirroredStrategy (STAN's Beta state included),
MultiWorkerMirroredStrategy from TF_CONFIG. Processes that are killed or split the CPU run as subprocesses."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from pipeline.training.train import TrainConfig, backup_position
from tests.pipeline.training import train_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train-data"))
    train_worker.write_data(d)  # 600 train rows -> 10 steps of 64 per epoch
    return d


def _spawn(mode, data_dir, out, opts=None, env=None):
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.training.train_worker", mode, data_dir, str(out),
                             json.dumps(opts or {})], cwd=ROOT, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.parametrize("kwargs,needle", [
    ({"epochs": 0}, "epochs"), ({"strategy": "tpu"}, "strategy"), ({"early_stopping_patience": -1}, "patience"),
    ({"backup_every_steps": 0}, "backup_every_steps"), ({"steps_per_execution": 0}, "steps_per_execution"),
])
def test_train_config_is_validated(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kwargs)


def test_run_killed_mid_epoch_resumes_without_redoing_steps(data_dir, tmp_path):
    """Uninterrupted run vs a run SIGKILLed after 14 steps (backups every 7) and restarted: the restart starts
    at epoch 2 step 4, runs only the remaining 16 steps and ends with the uninterrupted run's weights."""
    common = {"epochs": 3, "backup_every_steps": 7, "deterministic": True, "early_stopping_patience": 0,
              "steps_per_execution": 1}  # killed after a step, not after a call of several
    full = _spawn("fit", data_dir, tmp_path / "full.json", dict(common, checkpoint_dir=str(tmp_path / "ck-full")))
    ck = str(tmp_path / "ck")
    killed = _spawn("fit", data_dir, tmp_path / "killed.json", dict(common, checkpoint_dir=ck, kill_after_steps=14))
    code, err = _wait(killed)
    assert code == -signal.SIGKILL, err
    assert not (tmp_path / "killed.json").exists()
    assert backup_position(os.path.join(ck, "backup"), 10) == (1, 4)
    resumed = _spawn("fit", data_dir, tmp_path / "resumed.json", dict(common, checkpoint_dir=ck))
    for proc in (full, resumed):
        code, err = _wait(proc)
        assert code == 0, err
    full, resumed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "resumed"))
    assert full["steps_per_epoch"] == 10 and full["steps_run"] == 30 and full["iterations"] == 30
    assert (resumed["initial_epoch"], resumed["initial_step"]) == (1, 4)
    assert resumed["steps_run"] == 30 - 14  # nothing redone
    assert resumed["iterations"] == 30
    assert len(resumed["history"]["val_ctr_auc"]) == 2  # epochs 2 and 3
    np.testing.assert_allclose(resumed["history"]["val_ctr_auc"], full["history"]["val_ctr_auc"][1:], atol=1e-5)
    for a, b in zip(resumed["weights"], full["weights"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert not os.path.exists(os.path.join(ck, "backup", "chief"))  # a finished run leaves no backup
    assert os.path.exists(os.path.join(ck, "best", "weights.index"))
    # The best checkpoint continued from the killed run's epoch 1: it is the uninterrupted run's best.
    monitored = json.loads(open(os.path.join(ck, "monitor.json")).read())
    np.testing.assert_allclose([monitored[str(e)] for e in range(3)], full["history"]["val_ctr_auc"], atol=1e-5)
    import tensorflow as tf

    names = [n for n, _ in tf.train.list_variables(os.path.join(ck, "best", "weights"))
             if "/.ATTRIBUTES/VARIABLE_VALUE" in n and "optimizer" not in n]
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(tf.train.load_variable(os.path.join(ck, "best", "weights"), name),
                                   tf.train.load_variable(str(tmp_path / "ck-full" / "best" / "weights"), name),
                                   rtol=1e-4, atol=1e-5)


def test_early_stopping_tensorboard_and_checkpoint_in_process(data_dir, tmp_path):
    from pipeline.training.train import fit_model

    cfg = TrainConfig(epochs=4, early_stopping_patience=1, checkpoint_dir=str(tmp_path / "ck"),
                      tensorboard_dir=str(tmp_path / "tb"), steps_per_execution=3, backup_every_steps=4)
    model, history, info = fit_model(train_worker.esm2, train_worker.train_data(data_dir, 64), cfg, 1e-2, verbose=0)
    assert info["monitor"] == "val_ctr_auc" and "val_ctr_auc" in history
    epochs_run = len(history["loss"])
    assert info["steps_run"] == 10 * epochs_run and int(model.optimizer.iterations.numpy()) == 10 * epochs_run
    best = int(np.argmax(history["val_ctr_auc"]))
    assert epochs_run == 4 or epochs_run == best + 2  # stopped one epoch after the best one
    assert os.listdir(tmp_path / "tb" / "train") and os.listdir(tmp_path / "tb" / "validation")


def test_mirrored_strategy_matches_one_device_and_keeps_stan_beta_state_global(data_dir, tmp_path):
    proc = _spawn("mirrored", data_dir, tmp_path / "m.json")
    code, err = _wait(proc)
    assert code == 0, err
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["replicas"] == 2
    assert r["fit"]["info"]["replicas"] == 2 and "val_ctr_auc" in r["fit"]["history"]
    default, mirrored = r["esm2"]["default"], r["esm2"]["mirrored"]
    assert set(default) == set(mirrored)
    for name in default:  # 3 SGD steps on 2 replicas = 3 steps on one device (loss scaled by 1/replicas)
        np.testing.assert_allclose(mirrored[name], default[name], rtol=1e-4, atol=1e-6, err_msg=name)
    default, mirrored = r["stan"]["default"], r["stan"]["mirrored"]
    stage = [n for n in default if n.split("/")[-1] in ("alpha:0", "beta:0", "count:0")]
    assert len(stage) == 3, list(default)
    users = train_worker.arrays(63 * 3, 5)["user_id_id"][:63]
    for name in stage:  # the Beta state saw the whole global batch, as on one device
        np.testing.assert_allclose(mirrored[name], default[name], rtol=1e-5, atol=1e-6, err_msg=name)
        if name.endswith("count:0"):  # every row of the global batch counted once
            np.testing.assert_array_equal(mirrored[name], np.bincount(users, minlength=6))
    # MUSENET's k-means++ seeding runs under MirroredStrategy (no assign inside control flow), from the global
    # batch: every prototype is one of the 64 projected rows (seeds averaged over replicas would not be)
    muse = r["musenet"]
    projected, prototypes = np.array(muse["projected"]), np.array(muse["prototypes"])
    assert muse["seeded"] and prototypes.shape == (4, 3)
    for row in prototypes:
        assert np.isclose(projected, row, rtol=1e-4, atol=1e-5).all(1).any(), (row, projected)


def test_multiworker_strategy_from_tf_config(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tf_config = {"cluster": {"worker": [f"localhost:{port}"]}, "task": {"type": "worker", "index": 0}}
    proc = _spawn("multiworker", data_dir, tmp_path / "w.json", env={"TF_CONFIG": json.dumps(tf_config)})
    code, err = _wait(proc)
    assert code == 0, err
    r = json.loads((tmp_path / "w.json").read_text())
    assert r["is_multiworker"] and r["workers"] == 1
    assert r["info"]["steps_run"] == 10 and "val_ctr_auc" in r["history"]


def test_in_memory_input_gives_the_streamed_rows_reshuffled_per_epoch(data_dir):
    from pipeline.training.data import make_dataset, make_in_memory_dataset

    d = train_worker.train_data(data_dir, 64)
    args = (d.train_pattern, d.feature_spec, d.feature_keys, d.label_keys, 64)

    def rows(ds, n_batches):
        out = []
        for feats, labels in ds.take(n_batches):
            keys = sorted(feats) + sorted(labels)
            cols = [np.asarray(feats.get(k, labels.get(k))).reshape(-1) for k in keys]
            out.extend(zip(*cols))
        return out

    streamed = rows(make_dataset(*args), 100)
    mem = make_in_memory_dataset(*args, shuffle=True, seed=3, epochs=None)
    two_epochs = rows(mem, 20)  # 10 batches per epoch (600 rows, the last batch 24)
    assert len(streamed) == 600 and len(two_epochs) == 1200
    assert sorted(two_epochs[:600]) == sorted(streamed) == sorted(two_epochs[600:])
    assert two_epochs[:600] != two_epochs[600:]  # reshuffled
    assert rows(make_in_memory_dataset(*args, shuffle=True, seed=3, epochs=None, skip_batches=13), 2) == \
        two_epochs[13 * 64 - 40:15 * 64 - 40]  # epoch 2 batches 4-5 (epoch 1 ended with a 24-row batch)


def test_fit_with_in_memory_input_runs_every_step(data_dir):
    from pipeline.training.train import fit_model

    cfg = TrainConfig(epochs=2, early_stopping_patience=0, in_memory=True)
    model, history, info = fit_model(train_worker.esm2, train_worker.train_data(data_dir, 64), cfg, 1e-2, verbose=0)
    assert info["steps_run"] == 20 and int(model.optimizer.iterations.numpy()) == 20
    assert len(history["val_ctr_auc"]) == 2


def _scripted_fit(tmp_path, values, earlier, patience, initial_epoch):
    """A tiny model fitted from ``initial_epoch`` with the monitored value scripted per epoch ({epoch: value});
    the best checkpoint holds weights of all 7.0. Returns (epochs run, final kernel)."""
    import tensorflow as tf

    from models.keras import keras
    from pipeline.training.train import ResumableEarlyStopping

    class Script(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_m"] = values[epoch]

    model = keras.Sequential([keras.layers.Dense(1, input_shape=(2,))])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    best_path = str(tmp_path / "best" / "weights")
    model.set_weights([np.full((2, 1), 7.0, np.float32), np.full((1,), 7.0, np.float32)])
    model.save_weights(best_path)
    model.set_weights([np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)])
    stop = ResumableEarlyStopping(earlier, best_path, monitor="val_m", patience=patience, restore_best_weights=True)
    x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=max(values) + 1,
                        initial_epoch=initial_epoch, callbacks=[Script(), stop], verbose=0)
    return len(history.epoch), model.get_weights()[0]


def test_early_stopping_continues_from_the_epochs_an_interrupted_run_finished(tmp_path):
    """Monitored values .80 .90 .85 | .86 .95 with patience 2: one uninterrupted run stops after epoch 3 (two
    epochs without beating .90) and restores epoch 1's weights. Resumed at epoch 3 with epochs 0-2 recorded,
    it must do the same: stop after one epoch and restore the best checkpoint (all 7.0), not keep going."""
    values = {0: 0.80, 1: 0.90, 2: 0.85, 3: 0.86, 4: 0.95}
    earlier = {e: values[e] for e in range(3)}
    run, kernel = _scripted_fit(tmp_path, values, earlier, patience=2, initial_epoch=3)
    assert run == 1
    np.testing.assert_array_equal(kernel, np.full((2, 1), 7.0))
    # without the earlier epochs (what a plain EarlyStopping does after a restart) it would train on to .95
    run, kernel = _scripted_fit(tmp_path / "fresh", values, {}, patience=2, initial_epoch=3)
    assert run == 2 and not np.allclose(kernel, 7.0)


def test_monitor_log_keeps_finished_epochs_for_a_resume(tmp_path):
    from pipeline.training.train import MonitorLog

    path = str(tmp_path / "monitor.json")
    log = MonitorLog(path, "val_ctr_auc", {})
    for epoch, value in enumerate([0.7, 0.8, 0.75]):
        log.on_epoch_end(epoch, {"val_ctr_auc": value, "loss": 1.0})
    assert MonitorLog.epochs_before(path, 2) == {0: 0.7, 1: 0.8}  # epoch 2 is redone by a run resuming there
    assert MonitorLog.epochs_before(path, 0) == {}
    assert MonitorLog.epochs_before(str(tmp_path / "none.json"), 5) == {}
