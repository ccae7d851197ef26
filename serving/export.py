"""Export: a SavedModel that TF Serving loads, taking RAW features with the transform graph inside.

Layout: ``<export_base>/<model_name>/<version>/`` with integer versions. A version is written into a hidden
temporary directory beside it (TF Serving ignores non-numeric names), checked, fsynced, then renamed into
place, so a half-written or unservable version is never visible; an existing version is never overwritten.
A publish killed mid-way leaves at most a ``.tmp-*`` directory, which TF Serving and ``next_version`` ignore.

Signatures (B = batch of impressions, e.g. one user's N candidates):

* ``serving_default``: ``examples`` tf.string [B], serialized raw ``tf.Example``s (label-free; a missing
  value is an absent feature) -> one float32 [B] output per task (``ctr``, ``ctavr``, ``cvr``, ``ctcvr``).
* ``predict_raw``: one 1-D [B] tensor per raw serving column, named after the column, dtype from the
  contract (string / int64 / float32), e.g. REST ``{"signature_name": "predict_raw", "instances":
  [{"user_id": 7, "device": "ios", ...}]}`` -> the same task outputs. Every value must be present: a dense
  tensor cannot express a missing value, so rows with missing values go through ``serving_default``.
  A sequence column is one string with the contract's separator between tokens (as in the raw data).
* ``transform_features``: ``examples`` as above -> the transformed model inputs (int64 / float32 [B, 1],
  named as in ``transforms.features``), for debugging training/serving skew.

``assets.extra/tf_serving_warmup_requests`` (see ``serving.warmup``) is written when the caller passes
real serialized raw examples (``warmup_examples``); TF Serving replays it before marking the version
AVAILABLE.

Speed: for a plain ESM² the signatures run ``serving.scoring_graph.ESM2ScoringGraph`` (request-level work
once per request), verified against the Keras model before publishing; other models serve the Keras model.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from typing import Dict, Sequence

import tensorflow as tf

from transforms import features as F
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^\d+$")
_DTYPES = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}


def request_level_fields(contract: FeatureContract) -> Sequence[str]:
    """Transformed categorical inputs that describe the request (user, context, hour), not the candidate.

    Candidate-level: the item id column and every raw column whose name contains ``item`` (``item_price``,
    ``uf_item_in_history``); everything else (user profile and history, device, page, hour) is
    request-level. A wrong guess costs speed, never correctness (see ``serving.scoring_graph``).
    """
    item = getattr(contract, "item_id", None) or "item"

    def is_candidate(raw: str) -> bool:
        return raw == item or "item" in raw

    out = [F.categorical_id(f.name) for f in contract.categorical if not is_candidate(f.name)]
    out += [F.bucket_id(f.name) for f in contract.numeric if not is_candidate(f.name)]
    out += [F.sequence_ids(f.name) for f in getattr(contract, "sequences", ()) if not is_candidate(f.name)]
    if getattr(contract, "timestamp", None):
        out.append(F.HOUR_ID)
    return out


class ServingModule(tf.Module):
    """Wires parse -> transform graph -> scorer for serving; tracks the transform layer and the scorer.

    ``scorer``: a callable on the transformed features (dict of [B, 1]) returning {task: [B, 1]}; default the
    Keras ``model`` (called with ``training=False``). Only the scorer's variables are saved.
    """

    def __init__(self, model, tft_output, raw_spec: Dict, feature_keys: Sequence[str], output_names: Sequence[str],
                 scorer=None, sequences: Sequence = ()):
        super().__init__(name="rankline_serving")
        if scorer is None:
            self.model = model
            self._score = lambda feats: self.model(feats, training=False)
        else:
            self.scorer = scorer
            self._score = lambda feats: self.scorer(feats)
        self.tft_layer = tft_output.transform_features_layer()
        self._raw_spec = dict(raw_spec)
        self._feature_keys = list(feature_keys)
        self._output_names = list(output_names)
        self._sequences = {s.name: s for s in sequences}
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        self.transform_examples = tf.function(
            self._transform_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        raw_signature = {name: tf.TensorSpec([None], self._column_dtype(name, spec), name=name)
                         for name, spec in self._raw_spec.items()}
        self.serve_raw = tf.function(self._serve_raw, input_signature=[raw_signature])

    def _column_dtype(self, name: str, spec) -> tf.DType:
        return tf.string if name in self._sequences else spec.dtype

    def _transform(self, raw) -> Dict[str, tf.Tensor]:
        transformed = self.tft_layer(raw)
        missing = [k for k in self._feature_keys if k not in transformed]
        if missing:  # resolved at trace time: a contract/model mismatch can never be exported
            raise ValueError(f"transform graph does not produce model input(s) {missing}")
        return {k: transformed[k] for k in self._feature_keys}

    def _predict(self, raw) -> Dict[str, tf.Tensor]:
        outputs = self._score(self._transform(raw))
        # [B, 1] probabilities are served as [B]; wider outputs (e.g. a scenario distribution) stay [B, K].
        return {name: tf.reshape(outputs[name], [-1]) if outputs[name].shape[-1] == 1 else outputs[name]
                for name in self._output_names}

    def _serve_examples(self, examples):
        return self._predict(tf.io.parse_example(examples, self._raw_spec))

    def _transform_examples(self, examples):
        return self._transform(tf.io.parse_example(examples, self._raw_spec))

    def _serve_raw(self, columns):
        """Dense 1-D columns -> the structure ``parse_example`` gives (every value present)."""
        raw = {}
        for name, spec in self._raw_spec.items():
            x = columns[name]
            if isinstance(spec, tf.io.VarLenFeature):
                if name in self._sequences:
                    seq = self._sequences[name]
                    tokens = tf.strings.split(x, sep=seq.separator)
                    tokens = tf.ragged.boolean_mask(tokens, tf.strings.length(tokens) > 0)
                    raw[name] = tokens[:, -seq.max_length:].to_sparse()
                else:
                    n = tf.shape(x, out_type=tf.int64)[0]
                    indices = tf.stack([tf.range(n), tf.zeros([n], tf.int64)], axis=1)
                    raw[name] = tf.SparseTensor(indices, x, tf.stack([n, tf.constant(1, tf.int64)]))
            else:
                raw[name] = x
        return self._predict(raw)

    def signature_functions(self) -> Dict:
        return {"serving_default": self.serve_examples.get_concrete_function(),
                "predict_raw": self.serve_raw.get_concrete_function(),
                "transform_features": self.transform_examples.get_concrete_function()}


def next_version(model_dir: str) -> int:
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if _VERSION_RE.match(n)]
    return max(versions, default=0) + 1


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def build_scorer(model, contract: FeatureContract, optimize: bool = True, preproject_max_bytes: int = 0):
    """The optimised ESM² scoring graph, verified against ``model``; None (serve the Keras model) when the
    model is not a plain ESM² or ``optimize`` is off. ``preproject_max_bytes``: total size cap of the
    pre-projected embedding tables (``serving.scoring_graph``; 0 = off, the default: slower on CPU)."""
    if not optimize:
        return None
    from serving.scoring_graph import ESM2ScoringGraph, UnsupportedModel, probe_features, verify

    try:
        graph = ESM2ScoringGraph(model, request_level_fields(contract), preproject_max_bytes=preproject_max_bytes)
        worst = verify(graph, model, probe_features(model))
    except UnsupportedModel as exc:
        logger.info("export: serving the Keras model as is (%s)", exc)
        return None
    logger.info("export: optimised ESM² scoring graph (max |diff| vs Keras %.2g)", worst)
    return graph


def export_saved_model(model, tft_output_dir: str, contract: FeatureContract, export_base: str, model_name: str,
                       version: int | None = None, *, warmup_examples: Sequence[bytes] | None = None,
                       optimize: bool = True, check: bool = True, preproject_max_bytes: int = 0) -> str:
    """Writes a new version of ``model_name`` and returns its directory.

    ``warmup_examples``: serialized raw ``tf.Example``s (e.g. eval rows) for the TF Serving warmup file;
    they are scored once in-process first, so a bad example fails the export, not the server.
    ``optimize``: serve the verified ESM² scoring graph where possible (``preproject_max_bytes``: its
    pre-projected embeddings' size cap, 0 = off; see ``build_scorer``). ``check``: reject the version
    (nothing published) if stock TF Serving could not run it (``serving.graph_check``).
    """
    import tensorflow_transform as tft

    from serving import warmup
    from serving.graph_check import check_servable
    from transforms.preprocessing import raw_feature_spec

    model_dir = os.path.join(export_base, model_name)
    os.makedirs(model_dir, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version already exists (never overwritten): {final}")
    module = ServingModule(
        model, tft.TFTransformOutput(tft_output_dir),
        raw_feature_spec(contract, include_labels=False, include_oracle=False),
        contract.model_feature_names(), model.output_names_,
        scorer=build_scorer(model, contract, optimize, preproject_max_bytes),
        sequences=getattr(contract, "sequences", ()))
    records = None
    if warmup_examples is not None:
        records = warmup.build_records(model_name, warmup_examples)
        try:  # replay in-process: a warmup request the server would reject must fail here
            module.serve_examples(tf.constant(list(warmup_examples), dtype=tf.string))
        except tf.errors.OpError as exc:
            raise ValueError(f"warmup examples do not score through the export: {exc.message}") from None
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        tf.saved_model.save(module, tmp, signatures=module.signature_functions())
        if records:
            warmup.write_warmup_file(tmp, records)
        if check:
            check_servable(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)  # atomic within one filesystem; fails rather than overwrite a non-empty dir
        _fsync_path(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
