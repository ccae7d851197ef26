"""Warm start: training on a new partition starts from the previous run's weights and optimizer slots."""
import os

import numpy as np
import pytest

from models.keras import keras
from pipeline.training.data import make_dataset
from pipeline.training.train import TrainConfig, final_checkpoint, fit_model
from tests.pipeline.training import train_worker


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("warm-data"))
    train_worker.write_data(d)
    return d


def _eval_loss(model, data):
    ds = make_dataset(data.eval_pattern, data.feature_spec, data.feature_keys, data.label_keys, 200)
    return float(model.evaluate(ds, verbose=0, return_dict=True)["loss"])


def _layer_weights(model):
    """The variables of the model's layers (trainable and not; not the compiled metrics' accumulators)."""
    return [w for layer in model.layers for w in layer.weights]


class _BeforeFirstStep(keras.callbacks.Callback):
    """Records the model's weights, optimizer variables and eval loss before the first step, then stops."""

    def __init__(self, data):
        super().__init__()
        self.data, self.seen = data, {}

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen:
            return
        self.model.stop_training = True
        self.seen = {"weights": {w.name: w.numpy() for w in _layer_weights(self.model)},
                     "optimizer": {v.name: v.numpy() for v in self.model.optimizer.variables()},
                     "loss": _eval_loss(self.model, self.data)}


def test_warm_start_restores_weights_and_optimizer_slots(data_dir, tmp_path):
    data = train_worker.train_data(data_dir, 64)
    first_cfg = TrainConfig(epochs=2, early_stopping_patience=0, checkpoint_dir=str(tmp_path / "first"))
    first, _, info = fit_model(train_worker.esm2, data, first_cfg, 1e-2, verbose=0)
    prefix = final_checkpoint(str(tmp_path / "first"))
    assert info["final_checkpoint"] == prefix and os.path.exists(prefix + ".index")
    optimizer = {v.name: v.numpy() for v in first.optimizer.variables()}
    assert int(first.optimizer.iterations.numpy()) == 20 and len(optimizer) > 10  # step + Adam's m and v

    warm = _BeforeFirstStep(data)
    # One step per call: _BeforeFirstStep evaluates inside fit, which Keras' multi-step loop does not allow.
    fit_model(train_worker.esm2, data, TrainConfig(epochs=1, early_stopping_patience=0, warm_start=prefix,
                                                   steps_per_execution=1), 1e-2, verbose=0, callbacks=[warm])
    first_weights = {w.name: w.numpy() for w in _layer_weights(first)}
    assert set(warm.seen["weights"]) == set(first_weights) and len(first_weights) > 10
    for name, value in first_weights.items():
        np.testing.assert_array_equal(warm.seen["weights"][name], value, err_msg=name)
    assert set(warm.seen["optimizer"]) == set(optimizer)
    for name, value in optimizer.items():  # iterations and every slot as the first run left them
        np.testing.assert_array_equal(warm.seen["optimizer"][name], value, err_msg=name)
    assert warm.seen["loss"] == pytest.approx(_eval_loss(first, data), rel=1e-6)

    cold = _BeforeFirstStep(data)  # the same build without warm start: fresh weights, zero slots
    fit_model(train_worker.esm2, data, TrainConfig(epochs=1, early_stopping_patience=0, steps_per_execution=1), 1e-2,
              verbose=0, callbacks=[cold])
    assert abs(cold.seen["loss"] - warm.seen["loss"]) > 1e-3
    assert all(not np.any(v) for v in cold.seen["optimizer"].values())


def test_warm_start_from_a_missing_checkpoint_is_an_error_naming_it(data_dir, tmp_path):
    data = train_worker.train_data(data_dir, 64)
    missing = str(tmp_path / "none" / "ckpt")
    with pytest.raises(FileNotFoundError, match=f"warm start: no checkpoint at {missing}"):
        fit_model(train_worker.esm2, data, TrainConfig(epochs=1, warm_start=missing), 1e-2, verbose=0)
