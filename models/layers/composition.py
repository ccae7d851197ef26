"""Parameter-free probability compositions on the behaviour graph impression -> click -> D(O)Action -> purchase."""
from __future__ import annotations

from typing import Dict, Sequence

import tensorflow as tf

from models.keras import keras
from transforms.features import CTAVR, CTCVR, CTR, CVR


@keras.utils.register_keras_serializable(package="rankline")
class ESM2Composition(keras.layers.Layer):
    """ESM² sequential composition module (SCM), Eqs. 1-4.

    Inputs y1..y4, each [B, 1] probabilities:
        y1 = P(click | impression), y2 = P(DAction | click),
        y3 = P(purchase | DAction), y4 = P(purchase | OAction).
    Outputs (each [B, 1]):
        ctr   = y1                                   (Eq. 1)
        ctavr = y1 * y2                              (Eq. 2)
        cvr   = (1 - y2) * y4 + y2 * y3              (Eq. 3)
        ctcvr = y1 * ((1 - y2) * y4 + y2 * y3)       (Eq. 4)
    """

    def call(self, inputs: Sequence[tf.Tensor]) -> Dict[str, tf.Tensor]:
        y1, y2, y3, y4 = inputs
        cvr = (1.0 - y2) * y4 + y2 * y3
        return {CTR: y1, CTAVR: y1 * y2, CVR: cvr, CTCVR: y1 * cvr}


@keras.utils.register_keras_serializable(package="rankline")
class ESMMComposition(keras.layers.Layer):
    """ESMM (Ma et al. 2018): pCTCVR = pCTR * pCVR. Inputs [pctr, pcvr], each [B, 1]."""

    def call(self, inputs: Sequence[tf.Tensor]) -> Dict[str, tf.Tensor]:
        pctr, pcvr = inputs
        return {CTR: pctr, CVR: pcvr, CTCVR: pctr * pcvr}
