"""Export: a SavedModel that TF Serving loads, taking RAW features with the transform graph inside.

Layout: ``<export_base>/<model_name>/<version>/`` with integer versions. A version is written into a hidden
temporary directory beside it (TF Serving ignores non-numeric names), fsynced, then renamed into place,
so a half-written version is never visible; an existing version is never overwritten.

Signature ``serving_default``: ``examples`` (tf.string [B], serialized raw ``tf.Example``s, label-free) ->
one float32 [B] output per task name (``ctr``, ``cvr``, ...).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Dict, Sequence

import tensorflow as tf

from transforms.features import FeatureContract

_VERSION_RE = re.compile(r"^\d+$")


class ServingModule(tf.Module):
    """Wires parse -> transform graph -> model for serving; tracks the transform layer and the model."""

    def __init__(self, model, tft_output, raw_spec: Dict, feature_keys: Sequence[str], output_names: Sequence[str]):
        super().__init__(name="rankline_serving")
        self.model = model
        self.tft_layer = tft_output.transform_features_layer()
        self._raw_spec = dict(raw_spec)
        self._feature_keys = list(feature_keys)
        self._output_names = list(output_names)
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])

    def _serve_examples(self, examples):
        raw = tf.io.parse_example(examples, self._raw_spec)
        transformed = self.tft_layer(raw)
        missing = [k for k in self._feature_keys if k not in transformed]
        if missing:  # resolved at trace time: a contract/model mismatch can never be exported
            raise ValueError(f"transform graph does not produce model input(s) {missing}")
        outputs = self.model({k: transformed[k] for k in self._feature_keys}, training=False)
        return {name: tf.reshape(outputs[name], [-1]) for name in self._output_names}


def next_version(model_dir: str) -> int:
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if _VERSION_RE.match(n)]
    return max(versions, default=0) + 1


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_saved_model(model, tft_output_dir: str, contract: FeatureContract, export_base: str, model_name: str,
                       version: int | None = None) -> str:
    """Writes a new version of ``model_name`` and returns its directory."""
    import tensorflow_transform as tft

    from transforms.preprocessing import raw_feature_spec

    model_dir = os.path.join(export_base, model_name)
    os.makedirs(model_dir, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version already exists (never overwritten): {final}")
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    module = ServingModule(
        model, tft.TFTransformOutput(tft_output_dir),
        raw_feature_spec(contract, include_labels=False, include_oracle=False),
        contract.model_feature_names(), model.output_names_)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve_examples.get_concrete_function()})
        _fsync_tree(tmp)
        os.rename(tmp, final)  # atomic within one filesystem; fails rather than overwrite a non-empty dir
        fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
