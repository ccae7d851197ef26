"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020) on the ESM² task graph.

    SEM:     shared per-field embeddings x = g (ESM² Eq. 5), [B, N].
    Levels:  ``num_levels`` CGC extraction networks (``models.layers.CGC``). Level j, task k:
                 g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x),  w^{k,j} = softmax(W_g^{k,j} .)   (PLE §4.2-4.3)
             over task k's m_t own experts and the m_s shared experts; at every level but the last a shared
             gate mixes all 4 * m_t + m_s experts into the next level's shared input. g^{k,0} = x for every
             k and for the shared part. ``num_levels=1`` is the single-level CGC model (§4.2).
    Towers:  y_k = sigmoid(t^k(g^{k,L}(x))), k = 1..4 = ESM²'s y1..y4.
    SCM:     ESM² Eqs. 1-4 -> ctr, ctavr, cvr, ctcvr; loss ESM² Eq. 11 (ctr, ctavr, ctcvr over all impressions).

Design choice (as for ``models.mmoe``): PLE's "tasks" are ESM²'s four towers, each owning experts and a
gate, composed by ``ESM2Composition`` and trained on ESM²'s three entire-space losses, so that outputs,
labels and losses equal ESM²'s and a comparison isolates the sharing mechanism. y3 and y4 (purchase given
DAction / OAction) are supervised only through ctcvr, exactly as in ESM².
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Mapping, Sequence, Tuple

import tensorflow as tf

from models.base import MultiTaskModel
from models.config import ModelConfig
from models.keras import keras
from models.layers import CGC, ESM2Composition
from models.mmoe import TOWERS
from transforms.features import CLICK, CTAVR, CTCVR, CTR, CVR, DACTION, PURCHASE


@dataclass(frozen=True)
class PLEConfig(ModelConfig):
    hidden_units: Tuple[int, ...] = (32,)        # each tower t^k, on top of its last-level output
    num_levels: int = 2                          # extraction levels; 1 = CGC
    experts_per_task: int = 1                    # m_t, per tower and level
    num_shared_experts: int = 2                  # m_s, per level
    expert_units: Tuple[int, ...] = (64,)        # every expert of every level: ReLU MLP, output width H

    TUPLE_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden_units", "expert_units")
    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = ("num_levels", "experts_per_task", "num_shared_experts")


PRESETS: Dict[str, PLEConfig] = {
    # Fast default for the built-in data on 2 CPU cores: two levels of 4 * 1 + 2 = 6 experts of 64 units
    # (as many experts per level as MMoE's default), towers of 32: ESM²'s default depth of three layers.
    "default": PLEConfig(),
    # Not the PLE paper's setting (that paper is not in ../shared/papers): ESM²'s paper training setting
    # (models.esm2.PAPER: §4.1.4 / Table 2 dropout 0.5, Adam 5e-4, batch 1000; §4.3.1 embedding 128) with two
    # levels of 256-unit experts under towers 128-32, so that ``--preset esm2_paper`` compares ESM², MMoE and
    # PLE like with like.
    "esm2_paper": PLEConfig(hidden_units=(128, 32), num_levels=2, experts_per_task=1, num_shared_experts=2,
                            expert_units=(256,), dropout=0.5, embedding_dim=128, learning_rate=5e-4,
                            batch_size=1000),
}


@keras.utils.register_keras_serializable(package="rankline")
class PLE(MultiTaskModel):
    """Inputs: dict of transformed features ([B, 1]; sequences [B, L]). Outputs: {ctr, ctavr, cvr, ctcvr} [B, 1].

    ``decomposed(features)`` gives the towers' y1..y4, ``gate_weights(features)`` every level's gates.
    """

    TOWERS = TOWERS
    CONFIG = PLEConfig

    REQUIRED_LABELS = (CLICK, DACTION, PURCHASE)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: PLEConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = type(self).CONFIG.coerce(config)
        c = self.config
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.levels = [CGC(len(self.TOWERS), c.experts_per_task, c.num_shared_experts, c.expert_units,
                           shared_output=j < c.num_levels - 1, dropout=c.dropout, l2=c.l2, name=f"cgc_{j}")
                       for j in range(c.num_levels)]
        self.towers = [self.tower(f"tower_{t}") for t in self.TOWERS]
        self.composition = ESM2Composition(name="scm")
        self._tasks.extend(self.entire_space_tasks())  # ESM² Eqs. 8-11

    @property
    def output_names_(self):
        return (CTR, CTAVR, CVR, CTCVR)

    def extract(self, features, training=None) -> List[tf.Tensor]:
        """g^{k,L}(x) of the last level for the four towers, each [B, H]."""
        h = self.embedding(features)
        for level in self.levels:
            h = level(h, training=training)  # [x_1..x_4, x_s] for the next level; the last gives 4 tensors
        return h

    def gate_weights(self, features) -> List[List[tf.Tensor]]:
        """Per level: the four task gates [B, m_t + m_s], then (all but the last level) the shared gate."""
        h, out = self.embedding(features), []
        for level in self.levels:
            out.append(level.gate_weights(h))
            h = level(h, training=False)
        return out

    def decomposed(self, features, training=None) -> List[tf.Tensor]:
        """[y1, y2, y3, y4], each [B, 1]."""
        return [tf.sigmoid(tower(g, training=training))
                for tower, g in zip(self.towers, self.extract(features, training=training))]

    def call(self, features, training=None):
        return self.composition(self.decomposed(features, training=training))

