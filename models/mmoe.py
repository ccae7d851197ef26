"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) on the ESM² task graph.

    SEM:     shared per-field embeddings x = g (ESM² Eq. 5), [B, N].
    Experts: E expert MLPs f_i(x) shared by all towers, each [B, H].
    Gates:   one softmax gate per tower, g^k(x) = softmax(W_gk x) [B, E]           (MMoE Eq. 8)
             f^k(x) = sum_i g^k(x)_i f_i(x) [B, H]                                  (MMoE Eq. 7)
    Towers:  y_k = sigmoid(h^k(f^k(x))), k = 1..4 = ESM²'s y1..y4                   (MMoE Eq. 6)
    SCM:     ESM² Eqs. 1-4 -> ctr, ctavr, cvr, ctcvr; loss ESM² Eq. 11 (ctr, ctavr, ctcvr over all impressions).

Design choice: the "tasks" that own a gate are ESM²'s four towers (click, DAction | click,
purchase | DAction, purchase | OAction), composed by the existing ``ESM2Composition`` and trained with
exactly ESM²'s three entire-space losses. Outputs, labels and losses are therefore identical to ESM²'s, and
a comparison ESM² vs MMoE vs PLE isolates the sharing mechanism (ESM² shares only the embedding; MMoE
shares gated experts; PLE adds task-owned experts). The alternative, one tower per supervised output
(ctr, ctavr, ctcvr) without the composition, would change the label graph as well and was not taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Mapping, Sequence, Tuple

import tensorflow as tf

from models.base import MultiTaskModel
from models.config import ModelConfig
from models.keras import keras
from models.layers import ESM2Composition, ExpertGate
from transforms.features import CLICK, CTAVR, CTCVR, CTR, CVR, DACTION, PURCHASE

# ESM²'s towers y1..y4 (models.esm2.ESM2.TOWERS): the tasks that get a gate and a tower.
TOWERS = ("click", "daction", "purchase_daction", "purchase_oaction")


@dataclass(frozen=True)
class MMoEConfig(ModelConfig):
    hidden_units: Tuple[int, ...] = (32,)        # each tower h^k, on top of its mixture f^k(x)
    num_experts: int = 6                         # E
    expert_units: Tuple[int, ...] = (128, 64)    # each expert f_i: ReLU MLP, output width H = last entry

    TUPLE_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden_units", "expert_units")
    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = ("num_experts",)


PRESETS: Dict[str, MMoEConfig] = {
    # Fast default for the built-in data on 2 CPU cores: ESM²'s default depth 128-64-32 split into
    # experts (128-64) and towers (32).
    "default": MMoEConfig(),
    # Not the MMoE paper's setting (that paper is not in ../shared/papers): ESM²'s paper setting
    # (models.esm2.PAPER: §4.1.4 / Table 2 towers 512-256-128-32, dropout 0.5, Adam 5e-4, batch 1000; §4.3.1
    # embedding 128) with the MLP split into 8 experts of 512-256 and towers 128-32, so that
    # ``--preset esm2_paper`` compares ESM², MMoE and PLE like with like. 8 experts: said to be the MMoE
    # paper's census-income setting; not checked here.
    "esm2_paper": MMoEConfig(hidden_units=(128, 32), num_experts=8, expert_units=(512, 256), dropout=0.5,
                             embedding_dim=128, learning_rate=5e-4, batch_size=1000),
}


@keras.utils.register_keras_serializable(package="rankline")
class MMoE(MultiTaskModel):
    """Inputs: dict of transformed features ([B, 1]; sequences [B, L]). Outputs: {ctr, ctavr, cvr, ctcvr} [B, 1].

    ``decomposed(features)`` gives the towers' y1..y4, ``gate_weights(features)`` the four gates [B, E].
    """

    TOWERS = TOWERS

    REQUIRED_LABELS = (CLICK, DACTION, PURCHASE)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: MMoEConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = MMoEConfig.coerce(config)
        c = self.config
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.mixture = ExpertGate(c.num_experts, c.expert_units, num_tasks=len(self.TOWERS), dropout=c.dropout,
                                  l2=c.l2, name="mmoe")
        self.towers = [self.tower(f"tower_{t}") for t in self.TOWERS]
        self.composition = ESM2Composition(name="scm")
        self._tasks.extend(self.entire_space_tasks())  # ESM² Eqs. 8-11

    @property
    def output_names_(self):
        return (CTR, CTAVR, CVR, CTCVR)

    def gate_weights(self, features) -> List[tf.Tensor]:
        """g^k(x) of the four towers, each [B, E] (for inspecting expert utilisation)."""
        return self.mixture.gate_weights(self.embedding(features))

    def decomposed(self, features, training=None) -> List[tf.Tensor]:
        """[y1, y2, y3, y4], each [B, 1]: y_k = sigmoid(h^k(f^k(x)))."""
        mixed = self.mixture(self.embedding(features), training=training)
        return [tf.sigmoid(tower(f, training=training)) for tower, f in zip(self.towers, mixed)]

    def call(self, features, training=None):
        return self.composition(self.decomposed(features, training=training))

