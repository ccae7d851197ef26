"""Vocabulary refresh: carry a trained model (weights and optimizer slots) across re-analyzed vocabularies.

``pipeline.retrain --refresh-vocabulary`` re-analyzes the vocabularies on recent partitions (numeric statistics
fixed, see ``transforms.preprocessing.read_numeric_statistics``), so token ids move: a token keeps its meaning,
not its id. Every variable keyed by a vocabulary id is rebuilt for the new ids:

* ``new_to_old`` (``vocabulary_mapping``): for each row r of the new table, the old row holding the same token,
  or -1. Categorical ``x_id`` tables [V + B, D]: rows 0..V-1 are the frequency-ranked tokens, rows V..V+B-1 the
  OOV buckets (bucket b = fingerprint(token) mod B, the same function before and after), carried b -> b;
  sequence ``x_seq`` tables [V + B + 1, D]: row 0 is padding (carried), row r the token id r - 1.
* a carried row is copied exactly: table'[r] = table[new_to_old[r]], and so are its Adam slots m and v;
  a new token's row keeps the new layer's own initialisation (``embeddings_initializer``) and zero slots;
  a dropped token's row goes (the token now maps to an OOV bucket).

Keyed variables: every ``SharedEmbedding`` table (all models) and STAN's Beta state (keyed by
``config.user_index``; a new user starts from the prior). Any other variable must keep its shape (it is copied as
is); USSR's segment table is keyed by the segment id, so a refresh that moves segment ids is refused.
"""
from __future__ import annotations

import logging
import os
from typing import Dict

import numpy as np
import tensorflow as tf

from models import registry
from models.keras import keras
from models.optimizers import FusedAdam
from transforms import features as F
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)


def vocabulary_mapping(contract: FeatureContract, old_tft, new_tft) -> Dict[str, np.ndarray]:
    """{transformed field (``x_id`` / ``x_seq``): new_to_old int64 [rows of the new embedding table]}, -1 where the
    new row has no old counterpart (a token new to the vocabulary). ``old_tft``/``new_tft``: ``TFTransformOutput``."""
    out = {}
    for f, field, pad in ([(f, F.categorical_id(f.name), 0) for f in contract.vocab_features]
                          + [(f, F.sequence_ids(f.name), 1) for f in contract.sequences]):
        old = old_tft.vocabulary_by_name(f.vocab_name)
        new = new_tft.vocabulary_by_name(f.vocab_name)
        index = {token: i for i, token in enumerate(old)}
        ids = [index.get(token, -1) for token in new] + [len(old) + b for b in range(f.num_oov_buckets)]
        rows = np.asarray(ids, np.int64)
        if pad:
            rows = np.concatenate([[0], np.where(rows >= 0, rows + 1, -1)])
        out[field] = rows
    return out


def _build(model_name: str, model_config, contract: FeatureContract, tft_output, learning_rate: float,
           adam_epsilon: float):
    """The model ``train_model`` builds for ``tft_output``'s vocabularies, called once on zeros and compiled."""
    from pipeline.training.train import model_inputs

    categorical, dense, sequences = model_inputs(contract, tft_output)
    config = registry.model_class(model_name).bind_to_contract(
        model_config, contract, tuple(categorical) + tuple(sequences) + tuple(dense))
    model = registry.build(model_name, categorical, dense, config, sequences)
    spec = tft_output.transformed_feature_spec()
    model({k: tf.zeros([2] + list(spec[k].shape), spec[k].dtype) for k in contract.model_feature_names()})
    model.compile(optimizer=FusedAdam(learning_rate, epsilon=adam_epsilon))
    model.optimizer.build(model.trainable_variables)
    return model


def keyed_variables(model) -> Dict:
    """{variable ``ref()``: the transformed field whose ids index its first dimension} of a built model."""
    from models.layers.embedding import SharedEmbedding
    from models.layers.stage import BetaStageState

    out = {}
    for layer in model.submodules:
        if isinstance(layer, SharedEmbedding):
            for name, table in list(layer._tables.items()) + list(layer._seq_tables.items()):
                out[table.embeddings.ref()] = name
        elif isinstance(layer, BetaStageState):
            out.update({v.ref(): model.config.user_index for v in layer.weights})
    return out


def _slot_owner(name: str, model_names) -> str | None:
    """The model variable an optimizer variable named ``[<scope>/]<slot>/<variable name>`` belongs to (None: not a
    slot; ``add_variable_from_reference`` names slots so, the scope being the optimizer's when built in ``fit``)."""
    owners = [v for v in model_names if name.endswith("/" + v)]
    return max(owners, key=len) if owners else None


def remap_warm_start(model_name: str, model_config, contract: FeatureContract, old_tft, new_tft, old_prefix: str,
                     out_dir: str, learning_rate: float, adam_epsilon: float = 1e-7, seed: int = 0) -> Dict:
    """Writes ``out_dir/final/ckpt`` (``save_final``'s layout): the training state of ``old_prefix`` (a model
    trained on ``old_tft``'s vocabularies) carried onto ``new_tft``'s. Returns ``{"checkpoint": prefix, "fields":
    {field: {"carried", "new", "dropped"}}}`` (rows of vocabulary tokens; OOV buckets and padding not counted).

    Model variables and optimizer variables (Adam's step, m and v) are matched by position between the two builds
    (same architecture; names checked equal, Keras' name counters reset before each: names alone are not unique,
    e.g. a metric's and STAN's Beta state's ``count``); keyed ones are remapped row by row (module docstring), the
    rest must keep their shape. Fresh rows come from the new model's own initialisers, seeded by ``seed``.
    """
    from pipeline.training.train import restore_warm_start, save_final

    mapping = vocabulary_mapping(contract, old_tft, new_tft)
    keras.backend.clear_session()
    old = _build(model_name, model_config, contract, old_tft, learning_rate, adam_epsilon)
    restore_warm_start(old, old_prefix)
    old_keyed = keyed_variables(old)
    old_model = [(v.name, v.numpy(), old_keyed.get(v.ref())) for v in old.weights]
    old_opt = [(v.name, v.numpy()) for v in old.optimizer.variables()]
    del old
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    new = _build(model_name, model_config, contract, new_tft, learning_rate, adam_epsilon)
    keyed = keyed_variables(new)
    if len(old_model) != len(new.weights) or len(old_opt) != len(new.optimizer.variables()):
        raise ValueError(f"vocabulary refresh of {model_name!r}: the two builds have different variables")
    segment = getattr(new.config, "segment_feature", None)
    if segment in mapping and not np.array_equal(mapping[segment], np.arange(len(mapping[segment]))):
        raise ValueError(f"vocabulary refresh: model {model_name!r} keys its segment table by {segment!r}, whose "
                         f"ids the refresh would move; refresh without that vocabulary changing")

    def carry(name: str, saved_name: str, value: np.ndarray, field, fresh: np.ndarray) -> np.ndarray:
        if name != saved_name:
            raise ValueError(f"vocabulary refresh: variable {name} of the new model is {saved_name} in {old_prefix}")
        if field is None or field not in mapping:
            if value.shape != fresh.shape:
                raise ValueError(f"vocabulary refresh: variable {name} changes shape {value.shape} -> {fresh.shape} "
                                 f"and is not keyed by a vocabulary")
            return value
        rows = mapping[field]
        if len(rows) != fresh.shape[0] or rows.max() >= value.shape[0]:
            raise ValueError(f"vocabulary refresh: variable {name} [{value.shape[0]} rows -> {fresh.shape[0]}] does "
                             f"not match the vocabularies of {field!r}")
        out = fresh.copy()
        out[rows >= 0] = value[rows[rows >= 0]]
        return out

    for v, (saved_name, value, old_field) in zip(new.weights, old_model):
        if keyed.get(v.ref()) != old_field:
            raise ValueError(f"vocabulary refresh of {model_name!r}: {v.name} is keyed differently in the two builds")
        v.assign(carry(v.name, saved_name, value, keyed.get(v.ref()), v.numpy()))
    trainable = {v.name: keyed.get(v.ref()) for v in new.trainable_variables}  # slots exist for these only
    if len(trainable) != len(new.trainable_variables):
        raise ValueError(f"vocabulary refresh of {model_name!r}: trainable variable names are not unique")
    for v, (saved_name, value) in zip(new.optimizer.variables(), old_opt):
        owner = _slot_owner(v.name, trainable)
        v.assign(carry(v.name, saved_name, value, trainable[owner] if owner else None, v.numpy()))
    prefix = save_final(new, out_dir)
    fields = {}
    for field, rows in mapping.items():
        pad = 1 if field.endswith("_seq") else 0
        f = next(x for x in list(contract.vocab_features) + list(contract.sequences)
                 if field in (F.categorical_id(x.name), F.sequence_ids(x.name)))
        tokens = rows[pad:len(rows) - f.num_oov_buckets]
        old_size = int(old_tft.vocabulary_size_by_name(f.vocab_name))
        fields[field] = {"carried": int(np.sum(tokens >= 0)), "new": int(np.sum(tokens < 0)),
                         "dropped": old_size - int(np.sum(tokens >= 0))}
    logger.info("vocabulary refresh: %s", ", ".join(f"{k} +{v['new']} -{v['dropped']}" for k, v in fields.items()))
    return {"checkpoint": prefix, "fields": fields}
