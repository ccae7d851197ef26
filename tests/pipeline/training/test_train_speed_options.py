"""Training-speed options keep training equivalent: ``train_metrics="loss"`` (no AUC in the train step) and the
shuffled one-tf.Example-per-row input (blocks of records, windows permuted every epoch)."""
import numpy as np
import pytest

from pipeline.training.train import TrainConfig
from tests.pipeline.training import train_worker


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("speed-data"))
    train_worker.write_data(d)  # 600 train rows in 3 files (row i in file i % 3), 200 eval rows
    return d


def _batches(seed=0, n=6, batch=64):
    cols = train_worker.arrays(n * batch, seed)
    feats = {k: cols[k].reshape(-1, 1) for k in tuple(train_worker.CATEGORICAL) + train_worker.DENSE}
    labels = {k: cols[k].reshape(-1, 1) for k in train_worker.LABELS}
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((feats, labels)).batch(batch)


def _train(train_metrics, steps=6):
    from models.keras import keras

    keras.utils.set_random_seed(7)
    model = train_worker.esm2(dropout=0.3)  # dropout: the step's random draws must not shift either
    ds = _batches()
    model(next(iter(ds))[0])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), train_metrics=train_metrics)
    history = model.fit(ds.take(steps), epochs=1, verbose=0).history
    evaluation = model.evaluate(_batches(seed=9, n=3), verbose=0, return_dict=True)
    return model, history, evaluation


def test_train_metrics_loss_gives_the_weights_and_evaluation_of_auc():
    """Same seed, same batches: 6 steps with and without training AUCs end with the same weights; evaluation
    reports every AUC either way, equal, and equal to sklearn's on the same predictions within Keras' 1000
    thresholds; the training history without AUCs keeps the losses."""
    from sklearn.metrics import roc_auc_score

    with_auc, h_auc, e_auc = _train("auc")
    without, h_loss, e_loss = _train("loss")
    for a, b in zip(with_auc.weights, without.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert {"ctr_auc", "ctavr_auc", "ctcvr_auc"} <= set(h_auc)
    assert not any(k.endswith("_auc") for k in h_loss)
    assert {k for k in h_auc if not k.endswith("_auc")} == set(h_loss)
    np.testing.assert_allclose(h_loss["loss"], h_auc["loss"], rtol=1e-6)
    assert set(e_loss) == set(e_auc) and "ctr_auc" in e_loss
    for k in e_auc:
        np.testing.assert_allclose(e_loss[k], e_auc[k], rtol=1e-6, err_msg=k)
    feats, labels = next(iter(_batches(seed=9, n=3).unbatch().batch(192)))
    probs = without.predict_dict(feats)
    for out, label in (("ctr", "click"), ("ctavr", "daction"), ("ctcvr", "purchase")):
        ref = roc_auc_score(labels[label].numpy().ravel(), probs[out].numpy().ravel())
        assert abs(e_loss[f"{out}_auc"] - ref) < 2e-2, (out, e_loss[f"{out}_auc"], ref)


def test_train_metrics_is_validated():
    from models.keras import keras

    with pytest.raises(ValueError, match="train_metrics"):
        TrainConfig(train_metrics="none")
    with pytest.raises(ValueError, match="train_metrics"):
        train_worker.esm2().compile(optimizer=keras.optimizers.Adam(), train_metrics="none")


def test_fit_model_without_training_aucs_still_monitors_eval_auc(data_dir):
    from pipeline.training.train import fit_model

    cfg = TrainConfig(epochs=2, early_stopping_patience=0, train_metrics="loss", steps_per_execution=4)
    model, history, info = fit_model(train_worker.esm2, train_worker.train_data(data_dir, 64), cfg, 1e-2, verbose=0)
    assert info["steps_run"] == 20 and int(model.optimizer.iterations.numpy()) == 20
    assert len(history["val_ctr_auc"]) == 2 and 0.0 < min(history["val_ctr_auc"])
    assert "ctr_auc" not in history and len(history["ctr_loss"]) == 2


def test_steps_per_execution_defaults_to_several_on_one_device_and_the_model_returns_with_one(data_dir):
    """Not given: ``AUTO_STEPS_PER_EXECUTION`` steps per call without a strategy (10 steps an epoch: one call per
    epoch, so a per-call callback sees steps 9 and 19 end), the same steps run (iterations 20); the returned
    model runs one step per call again, so it evaluates a dataset of unknown size (Keras refuses that with
    several). A given value is kept."""
    from models.keras import keras
    from pipeline.training.data import make_dataset
    from pipeline.training.train import AUTO_STEPS_PER_EXECUTION, fit_model

    ends = []

    class Ends(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(int(batch))

    assert TrainConfig().steps_per_execution is None and AUTO_STEPS_PER_EXECUTION == 10
    data = train_worker.train_data(data_dir, 64)
    cfg = TrainConfig(epochs=2, early_stopping_patience=0)
    model, history, info = fit_model(train_worker.esm2, data, cfg, 1e-2, verbose=0, callbacks=[Ends()])
    assert info["steps_per_execution"] == 10 and info["steps_run"] == 20 and ends == [9, 9]
    assert len(history["val_ctr_auc"]) == 2 and min(history["val_ctr_auc"]) > 0  # eval: 4 batches, one call
    assert int(model.optimizer.iterations.numpy()) == 20
    ds = make_dataset(data.eval_pattern, data.feature_spec, data.feature_keys, data.label_keys, 64)
    assert "ctr_auc" in model.evaluate(ds, verbose=0, return_dict=True)
    _, _, info = fit_model(train_worker.esm2, data, TrainConfig(epochs=1, early_stopping_patience=0,
                                                                steps_per_execution=3), 1e-2, verbose=0)
    assert info["steps_per_execution"] == 3 and info["steps_run"] == 10


def _rows(ds, n_batches):
    """Rows as tuples (all keys, sorted) and the batch sizes."""
    rows, sizes = [], []
    for feats, labels in ds.take(n_batches):
        keys = sorted(feats) + sorted(labels)
        cols = [np.asarray(feats.get(k, labels.get(k))).reshape(-1) for k in keys]
        rows.extend(zip(*cols))
        sizes.append(len(cols[0]))
    return rows, sizes


def test_shuffled_example_stream_is_a_reproducible_permutation_per_epoch(data_dir):
    """One tf.Example per row, shuffled: every epoch holds each of the 600 rows once (the unshuffled read's rows),
    in an order that changes every epoch, mixes the 3 files from the first batch on, repeats for a seed with
    ``deterministic``, and ``skip_batches`` starts the same stream later. Batches never straddle epochs."""
    from pipeline.training.data import make_dataset

    d = train_worker.train_data(data_dir, 64)
    args = (d.train_pattern, d.feature_spec, d.feature_keys, d.label_keys, 64)
    plain, _ = _rows(make_dataset(*args), 100)
    stream, sizes = _rows(make_dataset(*args, shuffle=True, seed=3, epochs=None, deterministic=True), 30)
    assert sizes == ([64] * 9 + [24]) * 3
    epochs = [stream[i * 600:(i + 1) * 600] for i in range(3)]
    assert len(plain) == 600 and len(set(plain)) == 600
    for epoch in epochs:
        assert sorted(epoch) == sorted(plain)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    # Literal check of the mixing: the file of each row (row i of the data went to file i % 3).
    files_of_first_batch = {_file_of(row, data_dir) for row in epochs[0][:64]}
    assert files_of_first_batch == {0, 1, 2}, files_of_first_batch
    again, _ = _rows(make_dataset(*args, shuffle=True, seed=3, epochs=None, deterministic=True), 30)
    assert again == stream
    other, _ = _rows(make_dataset(*args, shuffle=True, seed=4, epochs=None, deterministic=True), 10)
    assert other != epochs[0]
    skipped, _ = _rows(make_dataset(*args, shuffle=True, seed=3, epochs=None, deterministic=True,
                                    skip_batches=13), 2)
    assert skipped == stream[600 + 3 * 64:600 + 5 * 64]  # epoch 2, batches 4-5


_FILE_OF = {}


def _file_of(row, data_dir):
    """The shard (0-2) that holds ``row``, read file by file without the code under test."""
    if not _FILE_OF:
        import glob

        import tensorflow as tf

        spec = train_worker.feature_spec()
        keys = sorted(tuple(train_worker.CATEGORICAL) + train_worker.DENSE) + sorted(train_worker.LABELS)
        for f, path in enumerate(sorted(glob.glob(f"{data_dir}/train/*.gz"))):
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                ex = tf.io.parse_single_example(record, spec)
                _FILE_OF[tuple(np.asarray(ex[k]).reshape(-1)[0] for k in keys)] = f
    return _FILE_OF[row]


def test_step_backup_counts_steps_when_a_call_runs_several(tmp_path):
    """``backup_every_steps`` counts steps, not train-function calls: with 3 steps per call, 10 steps an epoch
    (calls end at steps 2, 5, 8, 9) and a backup every 4 steps, backups cover steps 5 and 9 of each epoch and
    record them as the last step done; Keras' count of calls would back up once an epoch, after 4 calls."""
    from models.keras import keras
    from pipeline.training.train import StepBackup

    done = []

    class Spy(StepBackup):
        def _backup(self, epoch, batch=0):
            done.append((epoch, int(batch), int(self._training_state._ckpt_saved_batch.numpy())))
            super()._backup(epoch, batch)

    keras.utils.set_random_seed(0)
    model = train_worker.esm2()
    ds = _batches(n=10)
    model(next(iter(ds))[0])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=3)
    model.fit(ds.repeat(), epochs=2, steps_per_epoch=10, verbose=0,
              callbacks=[Spy(str(tmp_path / "backup"), save_freq=4, delete_checkpoint=False)])
    assert done == [(0, 5, 5), (0, 9, 9), (1, 5, 5), (1, 9, 9)]
    assert int(model.optimizer.iterations.numpy()) == 20
