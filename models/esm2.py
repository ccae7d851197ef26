"""ESM²: Elaborated Entire Space Supervised Multi-task Model (Wen et al., SIGIR 2020).

Paper: ../shared/papers/esm2-entire-space-post-click-decomposition.txt
    SEM  (Eq. 5):     shared per-field embeddings g_i.
    DPM  (Eq. 6):     four MLP towers y_k = sigmoid(phi_k(g_i)), k = 1..4.
    SCM  (Eqs. 1-4):  parameter-free composition -> ctr, ctavr, cvr, ctcvr.
    Loss (Eqs. 8-11): w_ctr * L_ctr + w_ctavr * L_ctavr + w_ctcvr * L_ctcvr, all over the entire space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Sequence

import tensorflow as tf

from models.base import MultiTaskModel
from models.config import ModelConfig
from models.keras import keras
from models.layers import ESM2Composition
from models.layers.mlp import run_towers
from transforms.features import CLICK, CTAVR, CTCVR, CTR, CVR, DACTION, PURCHASE


@dataclass(frozen=True)
class ESM2Config(ModelConfig):
    """ESM²: towers ``hidden_units`` (one MLP per y_k) over the shared embedding; nothing else to add."""


# The paper's setting (§4.1.4 and Table 2, §4.3.1, Eq. 11): Adam, learning rate 0.0005, batch 1000, towers
# 512-256-128-32 and an output layer ("[512,256,128,32,2]": the paper's 2-way softmax = our one sigmoid logit),
# dropout 0.5, embedding dimension 128 (the paper says "item feature embeddings"; here every field's), loss
# weights 1 (Eq. 11), dense features as tanh of their z-score (§4.3.2, Eq. 17 = dense_activation 'tanh').
# Not stated in the paper, left at the defaults: L2 (0) and Adam's epsilon. tests/models/test_presets.py
# checks every number against the quoted sentence. The same table is the paper's setting for its DNN and ESMM
# baselines (Table 2's caption), hence ``dnn:paper`` and ``esmm:paper`` (models.registry).
PAPER = ESM2Config(hidden_units=(512, 256, 128, 32), dropout=0.5, embedding_dim=128, learning_rate=5e-4,
                   batch_size=1000, w_ctr=1.0, w_ctavr=1.0, w_ctcvr=1.0, dense_activation="tanh")

PRESETS: Dict[str, ESM2Config] = {
    # Fast default for the built-in data on 2 CPU cores.
    "default": ESM2Config(),
    "paper": PAPER,
    # The same, under the name MMoE and PLE give their ESM²-borrowed presets, so that one
    # ``--preset esm2_paper`` runs esm2, esmm, dnn, mmoe and ple at the ESM² paper's setting.
    "esm2_paper": PAPER,
    # Wide towers: ``dnn:wide`` (1.03M parameters outside the embeddings on the built-in data) is the capacity
    # control for models that add many towers to an MLP of the default width (GPRec: 1.31M, README).
    "wide": ESM2Config(hidden_units=(1024, 512, 256)),
}


@keras.utils.register_keras_serializable(package="rankline")
class ESM2(MultiTaskModel):
    """Inputs: dict of transformed features ([B, 1] each). Outputs: {ctr, ctavr, cvr, ctcvr} [B, 1].

    ``towers`` outputs y1..y4 are exposed by ``decomposed(features)`` for inspection and tests.
    """

    TOWERS = ("click", "daction", "purchase_daction", "purchase_oaction")

    REQUIRED_LABELS = (CLICK, DACTION, PURCHASE)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: ESM2Config | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = ESM2Config.coerce(config)
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.towers = [self.tower(f"tower_{t}") for t in self.TOWERS]
        self.composition = ESM2Composition(name="scm")
        self._tasks.extend(self.entire_space_tasks())  # ESM² Eqs. 8-11

    @property
    def output_names_(self):
        return (CTR, CTAVR, CVR, CTCVR)

    def decomposed(self, features, training=None):
        """[y1, y2, y3, y4], each [B, 1] (Eq. 6)."""
        g = self.embedding(features)
        return [tf.sigmoid(y) for y in run_towers(self.towers, g, training=training)]  # one fused network

    def call(self, features, training=None):
        return self.composition(self.decomposed(features, training=training))

