"""Training wiring: transform output -> model inputs -> Keras fit."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

from models import registry
from models.keras import keras
from pipeline.data import make_dataset
from transforms import features as F
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def model_inputs(contract: FeatureContract, tft_output) -> Tuple[Dict[str, int], Tuple[str, ...], Dict[str, int]]:
    """(categorical name -> cardinality, dense names, sequence name -> cardinality) of the model inputs."""
    categorical = dict(contract.model_categorical)
    for f in contract.vocab_features:
        size = tft_output.vocabulary_size_by_name(f.vocab_name)
        categorical[F.categorical_id(f.name)] = int(size) + f.num_oov_buckets
    sequences = {F.sequence_ids(f.name): int(tft_output.vocabulary_size_by_name(f.vocab_name)) + f.num_oov_buckets
                 for f in contract.sequences}
    return categorical, contract.model_dense, sequences


class ModelDataMismatch(ValueError):
    """The model needs a feature or label the transformed data does not have."""


def check_transform_output(contract: FeatureContract, tft_output, label_keys, model_name: str = "model") -> None:
    """Fails before training, naming the feature, when the model needs what the transform does not make."""
    spec = tft_output.transformed_feature_spec()
    missing_labels = [k for k in label_keys if k not in spec]
    if missing_labels:
        raise ModelDataMismatch(f"model {model_name!r} needs label(s) {', '.join(missing_labels)} which dataset "
                                f"{contract.name!r} does not provide (it has: {', '.join(contract.labels.transformed)})")
    missing = [k for k in contract.model_feature_names() if k not in spec]
    if missing:
        raise ModelDataMismatch(f"transform output lacks feature(s) the model needs: {', '.join(missing)}")


def train_model(model_name: str, model_config, contract: FeatureContract, tft_output, train_pattern: str,
                eval_pattern: str, cfg: TrainConfig):
    keras.utils.set_random_seed(cfg.seed)
    label_keys = tuple(registry.required_labels(model_name))
    check_transform_output(contract, tft_output, label_keys, model_name)
    categorical, dense, sequences = model_inputs(contract, tft_output)
    try:
        model_config = registry.model_class(model_name).bind_to_contract(
            model_config, contract, tuple(categorical) + tuple(sequences) + tuple(dense))
    except ValueError as exc:
        raise ModelDataMismatch(f"model {model_name!r}: {exc}") from exc
    model = registry.build(model_name, categorical, dense, model_config, sequences)
    spec = tft_output.transformed_feature_spec()
    feature_keys = contract.model_feature_names()
    train_ds = make_dataset(train_pattern, spec, feature_keys, label_keys, model_config.batch_size,
                            shuffle=cfg.shuffle, seed=cfg.seed)
    eval_ds = make_dataset(eval_pattern, spec, feature_keys, label_keys, model_config.batch_size)
    model.compile(optimizer=keras.optimizers.Adam(model_config.learning_rate))
    verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train_ds, validation_data=eval_ds, epochs=cfg.epochs, verbose=verbose)
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}
