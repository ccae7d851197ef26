"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR 2018) and a single-task CTR DNN.

ESMM: pCTR = sigmoid(phi_ctr(g)), pCVR = sigmoid(phi_cvr(g)) over the shared embedding g;
pCTCVR = pCTR * pCVR; loss = L_ctr(click, pCTR) + L_ctcvr(purchase, pCTCVR), both over all impressions.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import tensorflow as tf

from models.base import MultiTaskModel
from models.esm2 import ESM2Config
from models.keras import keras
from models.layers import ESMMComposition
from models.layers.mlp import run_towers
from models.tasks import BinaryTask
from transforms.features import CLICK, CTCVR, CTR, CVR, PURCHASE


@keras.utils.register_keras_serializable(package="rankline")
class ESMM(MultiTaskModel):
    """Inputs: dict of transformed features ([B, 1]; sequences [B, L]). Outputs {ctr, cvr, ctcvr} [B, 1]."""

    REQUIRED_LABELS = (CLICK, PURCHASE)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (), config=None,
                 sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = ESM2Config.coerce(config)
        c = self.config
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.ctr_tower = self.tower("tower_ctr")
        self.cvr_tower = self.tower("tower_cvr")
        self.composition = ESMMComposition(name="esmm")
        self._tasks.extend([BinaryTask(CTR, CLICK, c.w_ctr), BinaryTask(CTCVR, PURCHASE, c.w_ctcvr)])

    @property
    def output_names_(self):
        return (CTR, CVR, CTCVR)

    def call(self, features, training=None) -> Dict[str, tf.Tensor]:
        g = self.embedding(features)
        pctr, pcvr = (tf.sigmoid(y) for y in run_towers([self.ctr_tower, self.cvr_tower], g, training=training))
        return self.composition([pctr, pcvr])



@keras.utils.register_keras_serializable(package="rankline")
class CTRDNN(MultiTaskModel):
    """Single-task CTR model (embedding + MLP), for data whose only label is the click."""

    REQUIRED_LABELS = (CLICK,)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (), config=None,
                 sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = ESM2Config.coerce(config)
        c = self.config
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.ctr_tower = self.tower("tower_ctr")
        self._tasks.append(BinaryTask(CTR, CLICK, c.w_ctr))

    @property
    def output_names_(self):
        return (CTR,)

    def call(self, features, training=None):
        return {CTR: tf.sigmoid(self.ctr_tower(self.embedding(features), training=training))}

