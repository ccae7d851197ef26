"""AutoInt baseline (Song et al., CIKM 2019): the USSR paper's baseline (§4, "a universally trained AutoInt").

    fields:   e_m = P_m^T x_m for categorical / sequence fields (``SharedEmbedding.field_embeddings``) and
              e_m = v_m x_m for numeric inputs (``NumericFieldEmbedding``)                       [B, F, D]
    encoder:  ``AutoIntEncoder``, multi-head self-attention interacting layers (AutoInt Eqs. 5-8)  [B, F*H*d']
    decoder:  one MLP tower -> ctr = sigmoid(logit) (AutoInt+ style: the attention output feeds a DNN).

No clusters, no segments: the same encoder as USSR (``models.ussr``), so the two differ only by USSR's
universal/segment-specific representation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Mapping, Sequence, Tuple

import numpy as np
import tensorflow as tf

from models.base import MultiTaskModel
from models.config import ModelConfig
from models.keras import keras
from models.layers.autoint import AutoIntEncoder, NumericFieldEmbedding
from models.tasks import BinaryTask
from transforms.features import CLICK, CTR


@dataclass(frozen=True)
class AutoIntConfig(ModelConfig):
    """``attention_layers`` interacting layers of ``attention_heads`` heads, ``attention_units`` (d') per head;
    ``hidden_units`` is the decoder MLP."""

    hidden_units: Tuple[int, ...] = (64, 32)
    attention_layers: int = 2
    attention_heads: int = 2
    attention_units: int = 16

    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = ("attention_layers", "attention_heads", "attention_units")


PRESETS: Dict[str, AutoIntConfig] = {
    "default": AutoIntConfig(),
    # AutoInt+ as the authors ran it on Criteo (the paper is not in ../shared/papers; these are the values of
    # github.com/DeepGraphLearning/RecommenderSystems featureRec/run_joint_criteo.sh and autoint/train.py's
    # defaults, quoted in tests/models/test_presets.py): --blocks 3 --heads 2 --block_shape "[64, 64, 64]"
    # (64 units split over 2 heads: d' = 32), --deep_layers "[400, 400]", --dropout_keep_prob "[1, 1, 1]"
    # (no dropout), --batch_size 1024, --embedding_size 16, --learning_rate 0.001 and, in autoint/model.py,
    # AdamOptimizer(..., epsilon=1e-8). Their AutoInt+ adds the DNN's logit (a DNN on the embeddings) to the
    # attention's; ours feeds the attention output to the DNN (module docstring), so only the sizes match.
    "paper": AutoIntConfig(attention_layers=3, attention_heads=2, attention_units=32, hidden_units=(400, 400),
                           dropout=0.0, embedding_dim=16, batch_size=1024, learning_rate=1e-3, adam_epsilon=1e-8),
    # The capacity control for USSR: USSR's cluster posterior, K Gaussian heads and M + 1 decoders hold ~410k
    # parameters outside the embeddings on the built-in data, AutoInt's default decoder ~130k; a 200-100
    # decoder brings AutoInt to USSR's size.
    "wide": AutoIntConfig(hidden_units=(200, 100)),
}


class AutoIntFields:
    """Mixin: the [B, F, D] field stack and the AutoInt encoder, for models with ``embedding``/``numeric``."""

    def build_autoint(self, dense: Sequence[str]) -> None:
        c = self.config
        self.numeric = NumericFieldEmbedding(len(dense), c.embedding_dim, name="numeric") if dense else None
        self.encoder = AutoIntEncoder(c.attention_layers, c.attention_heads, c.attention_units, name="autoint")

    def field_stack(self, features) -> tf.Tensor:
        """[B, F, D]: categorical and sequence fields (sorted names), then the numeric fields."""
        parts = []
        if self.embedding.num_fields:
            parts.append(self.embedding.field_embeddings(features))
        if self.numeric is not None:
            parts.append(self.numeric(self.embedding.dense_values(features)))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def encode(self, features) -> tf.Tensor:
        """h = AutoInt(fields) [B, F * H * d']."""
        return self.encoder(self.field_stack(features))

    def probe_features(self, batch: int = 2) -> Dict[str, tf.Tensor]:
        """A batch of valid all-zero inputs (builds the model's variables without data)."""
        feats = {k: tf.zeros([batch, 1], tf.int64) for k in self.embedding.categorical}
        feats.update({k: tf.zeros([batch, 1], tf.float32) for k in self.embedding.dense})
        feats.update({k: tf.constant(np.ones([batch, 2]), tf.int64) for k in self.embedding.sequences})
        return feats


@keras.utils.register_keras_serializable(package="rankline")
class AutoInt(AutoIntFields, MultiTaskModel):
    """Inputs: dict of transformed features. Outputs: {ctr} [B, 1]."""

    REQUIRED_LABELS = (CLICK,)
    CONFIG = AutoIntConfig

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: AutoIntConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = AutoIntConfig.coerce(config)
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.build_autoint(dense)
        self.decoder = self.tower("decoder")
        self._tasks.append(BinaryTask(CTR, CLICK, self.config.w_ctr))

    @property
    def output_names_(self):
        return (CTR,)

    def call(self, features, training=None):
        return {CTR: tf.sigmoid(self.decoder(self.encode(features), training=training))}
