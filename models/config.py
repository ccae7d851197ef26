"""Typed, validated model configurations shared by every multi-task model (presets live beside each model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Dict, Tuple


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model has: its MLP towers, the shared embedding, loss weights and training settings.

    Validation runs on construction; errors name the class and the field. List values (e.g. read back from
    ``config.json``) are turned into tuples.
    """

    hidden_units: Tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.1
    embedding_dim: int = 16
    dense_activation: str = "tanh"
    l2: float = 0.0
    w_ctr: float = 1.0
    w_ctavr: float = 1.0
    w_ctcvr: float = 1.0
    learning_rate: float = 1e-3
    adam_epsilon: float = 1e-7  # Adam's epsilon (tf_keras' default; STAN's paper uses 1e-6)
    batch_size: int = 1000

    TUPLE_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden_units",)
    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = ()

    def __post_init__(self):
        name = type(self).__name__
        for f in self.TUPLE_FIELDS:
            value = getattr(self, f)
            try:
                units = tuple(int(u) for u in value if int(u) == u)
            except (TypeError, ValueError):
                units = ()
            if isinstance(value, str) or not units or len(units) != len(value) or min(units) < 1:
                raise ValueError(f"{name}.{f} must be a non-empty sequence of positive integers, got {value!r}")
            object.__setattr__(self, f, units)
        for f in self.POSITIVE_INT_FIELDS:
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_dim < 1:
            raise ValueError(f"{name}.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.dense_activation not in ("tanh", "linear"):
            raise ValueError(f"{name}.dense_activation must be 'tanh' or 'linear', got {self.dense_activation!r}")
        if self.l2 < 0:
            raise ValueError(f"{name}.l2 must be >= 0, got {self.l2}")
        for f in ("w_ctr", "w_ctavr", "w_ctcvr"):
            if getattr(self, f) < 0:
                raise ValueError(f"{name}.{f} (loss weight) must be >= 0, got {getattr(self, f)}")
        if self.learning_rate <= 0:
            raise ValueError(f"{name}.learning_rate must be > 0, got {self.learning_rate}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"{name}.adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.batch_size < 1:
            raise ValueError(f"{name}.batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def coerce(cls, config) -> "ModelConfig":
        """A config of this class from an instance, a dict (e.g. ``get_config`` output) or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, dict):
            return cls(**config)
        if not isinstance(config, cls):
            raise TypeError(f"expected {cls.__name__}, got {type(config).__name__}")
        return config
