"""ESM²: Elaborated Entire Space Supervised Multi-task Model (Wen et al., SIGIR 2020).

Paper: ../shared/papers/esm2-entire-space-post-click-decomposition.txt
    SEM  (Eq. 5):     shared per-field embeddings g_i.
    DPM  (Eq. 6):     four MLP towers y_k = sigmoid(phi_k(g_i)), k = 1..4.
    SCM  (Eqs. 1-4):  parameter-free composition -> ctr, ctavr, cvr, ctcvr.
    Loss (Eqs. 8-11): w_ctr * L_ctr + w_ctavr * L_ctavr + w_ctcvr * L_ctcvr, all over the entire space.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Mapping, Sequence, Tuple

import tensorflow as tf

from models.base import MultiTaskModel
from models.keras import keras
from models.layers import MLP, ESM2Composition, SharedEmbedding
from models.tasks import BinaryTask
from transforms.features import CLICK, CTAVR, CTCVR, CTR, CVR, DACTION, PURCHASE


@dataclass(frozen=True)
class ESM2Config:
    hidden_units: Tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.1
    embedding_dim: int = 16
    dense_activation: str = "tanh"
    l2: float = 0.0
    w_ctr: float = 1.0
    w_ctavr: float = 1.0
    w_ctcvr: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 1000

    def __post_init__(self):
        if not self.hidden_units or any(int(u) < 1 for u in self.hidden_units):
            raise ValueError(f"hidden_units must be positive integers, got {self.hidden_units}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if min(self.w_ctr, self.w_ctavr, self.w_ctcvr) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.learning_rate <= 0 or self.batch_size < 1:
            raise ValueError("learning_rate must be > 0 and batch_size >= 1")

    def to_dict(self) -> Dict:
        return asdict(self)


PRESETS: Dict[str, ESM2Config] = {
    # Fast default for the built-in data on 2 CPU cores.
    "default": ESM2Config(),
    # The paper's setting (§4.1.3): MLP 512-256-128-32, dropout 0.5, Adam 5e-4, batch 1000.
    "paper": ESM2Config(hidden_units=(512, 256, 128, 32), dropout=0.5, learning_rate=5e-4, batch_size=1000),
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
        if isinstance(config, dict):
            config = ESM2Config(**{k: tuple(v) if k == "hidden_units" else v for k, v in config.items()})
        self.config = config or ESM2Config()
        c = self.config
        self.embedding = SharedEmbedding(categorical, dense, embedding_dim=c.embedding_dim,
                                         dense_activation=c.dense_activation, sequences=sequences or {}, name="sem")
        self.towers = [MLP(c.hidden_units, dropout=c.dropout, output_units=1, l2=c.l2, name=f"tower_{t}")
                       for t in self.TOWERS]
        self.composition = ESM2Composition(name="scm")
        self._tasks.extend([
            BinaryTask(CTR, CLICK, c.w_ctr),          # Eq. 8
            BinaryTask(CTAVR, DACTION, c.w_ctavr),    # Eq. 9
            BinaryTask(CTCVR, PURCHASE, c.w_ctcvr),   # Eq. 10
        ])

    @property
    def output_names_(self):
        return (CTR, CTAVR, CVR, CTCVR)

    def decomposed(self, features, training=None):
        """[y1, y2, y3, y4], each [B, 1] (Eq. 6)."""
        g = self.embedding(features)
        return [tf.sigmoid(tower(g, training=training)) for tower in self.towers]

    def call(self, features, training=None):
        return self.composition(self.decomposed(features, training=training))

    def get_config(self):
        return {"categorical": self.embedding.categorical, "dense": self.embedding.dense,
                "sequences": self.embedding.sequences, "config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
