"""The feature contract: the one module that transforms, models and serving all import.

It names the raw columns of a dataset, the roles they play (ids, time, labels, oracle columns that must
never become features), how each raw feature is transformed, and the names of the transformed tensors the
models consume. Nothing here depends on TensorFlow, so every layer of the house can import it cheaply.

Transformed names follow one rule so that models and serving can derive them without guessing:

* categorical ``x``      -> ``x_id``     int64 [B, 1], vocabulary index (frequency ranked) or OOV bucket;
* numeric ``x``          -> ``x_bucket`` int64 [B, 1], 0 = missing, 1..n = quantile bucket;
                            ``x_z``      float32 [B, 1], z-score of (log1p) x, 0 for missing;
* the hour of ``timestamp`` -> ``hour_id`` int64 [B, 1] in [0, 24);
* labels keep their names (int64 [B, 1] / float32 [B, 1]); ``daction`` = OR of the post-click actions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# Task output names: the keys of model outputs, losses, metrics and serving outputs alike.
CTR = "ctr"
CTAVR = "ctavr"
CVR = "cvr"
CTCVR = "ctcvr"

# Transformed label names.
CLICK = "click"
DACTION = "daction"
PURCHASE = "purchase"

HOUR_ID = "hour_id"
HOUR_CARDINALITY = 24
MISSING_TOKEN = "__missing__"


def categorical_id(name: str) -> str:
    return f"{name}_id"


def bucket_id(name: str) -> str:
    return f"{name}_bucket"


def zscore(name: str) -> str:
    return f"{name}_z"


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical column mapped through a frequency-ranked vocabulary with OOV buckets."""

    name: str
    dtype: str = "string"  # "string" or "int64"
    top_k: Optional[int] = None
    frequency_threshold: int = 1
    num_oov_buckets: int = 1

    def __post_init__(self):
        if self.dtype not in ("string", "int64"):
            raise ValueError(f"categorical feature {self.name!r}: dtype must be 'string' or 'int64', got {self.dtype!r}")
        if self.num_oov_buckets < 1:
            raise ValueError(f"categorical feature {self.name!r}: num_oov_buckets must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"categorical feature {self.name!r}: top_k must be >= 1")

    @property
    def vocab_name(self) -> str:
        return f"vocab_{self.name}"


@dataclass(frozen=True)
class NumericFeature:
    """A numeric column: optional log1p (negatives clipped to 0), quantile buckets and a z-score."""

    name: str
    dtype: str = "float32"  # "float32" or "int64" as stored
    log1p: bool = True
    num_buckets: int = 20

    def __post_init__(self):
        if self.dtype not in ("float32", "int64"):
            raise ValueError(f"numeric feature {self.name!r}: dtype must be 'float32' or 'int64', got {self.dtype!r}")
        if self.num_buckets < 2:
            raise ValueError(f"numeric feature {self.name!r}: num_buckets must be >= 2")

    @property
    def bucket_cardinality(self) -> int:
        """Bucket ids live in [0, num_buckets]: 0 is 'missing'."""
        return self.num_buckets + 1


@dataclass(frozen=True)
class LabelSpec:
    """How label columns map onto the ESM² behaviour graph impression -> click -> D(O)Action -> purchase."""

    click: str = "click"
    daction: Tuple[str, ...] = ("cart", "wish")  # DAction = OR of these post-click actions
    purchase: str = "purchase"
    continuous: Tuple[str, ...] = ("staytime",)

    @property
    def binary_columns(self) -> Tuple[str, ...]:
        return (self.click,) + tuple(self.daction) + (self.purchase,)


@dataclass(frozen=True)
class FeatureContract:
    """Everything downstream code needs to know about a dataset's columns."""

    name: str
    user_id: str
    item_id: str
    timestamp: str
    categorical: Tuple[CategoricalFeature, ...]
    numeric: Tuple[NumericFeature, ...]
    labels: LabelSpec = field(default_factory=LabelSpec)
    # Columns carrying the generator's true probabilities / latent truth: evaluation only, never features.
    oracle: Tuple[str, ...] = ()

    def __post_init__(self):
        names = [f.name for f in self.categorical] + [f.name for f in self.numeric]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"contract {self.name!r}: feature(s) declared twice: {dupes}")
        leaked = sorted(set(names) & (set(self.labels.binary_columns) | set(self.labels.continuous) | set(self.oracle)))
        if leaked:
            raise ValueError(f"contract {self.name!r}: label/oracle column(s) declared as features: {leaked}")

    # ---- raw side -------------------------------------------------------------------------------
    @property
    def serving_columns(self) -> Tuple[str, ...]:
        """Raw columns a serving request carries: features and the timestamp, never labels or oracle."""
        return tuple(dict.fromkeys([f.name for f in self.categorical] + [f.name for f in self.numeric] + [self.timestamp]))

    @property
    def label_columns(self) -> Tuple[str, ...]:
        return tuple(self.labels.binary_columns) + tuple(self.labels.continuous)

    # ---- transformed side -----------------------------------------------------------------------
    @property
    def model_categorical(self) -> Dict[str, int]:
        """Transformed categorical inputs whose cardinality is fixed by the contract (buckets, hour)."""
        out = {bucket_id(f.name): f.bucket_cardinality for f in self.numeric}
        out[HOUR_ID] = HOUR_CARDINALITY
        return out

    @property
    def vocab_features(self) -> Tuple[CategoricalFeature, ...]:
        return self.categorical

    @property
    def model_dense(self) -> Tuple[str, ...]:
        return tuple(zscore(f.name) for f in self.numeric)

    @property
    def transformed_labels(self) -> Tuple[str, ...]:
        return (CLICK, DACTION, PURCHASE) + tuple(self.labels.continuous)

    def model_feature_names(self) -> Tuple[str, ...]:
        return tuple(categorical_id(f.name) for f in self.categorical) + tuple(self.model_categorical) + self.model_dense


# The built-in planted-truth dataset (see pipeline/datagen.py for how it is generated).
BUILTIN = FeatureContract(
    name="builtin",
    user_id="user_id",
    item_id="item_id",
    timestamp="timestamp",
    categorical=(
        CategoricalFeature("user_id", dtype="int64", top_k=200_000, frequency_threshold=2, num_oov_buckets=10),
        CategoricalFeature("item_id", dtype="int64", top_k=100_000, frequency_threshold=2, num_oov_buckets=10),
        CategoricalFeature("user_gender"),
        CategoricalFeature("user_age"),
        CategoricalFeature("user_city", top_k=500, num_oov_buckets=5),
        CategoricalFeature("user_power"),
        CategoricalFeature("item_category"),
        CategoricalFeature("item_brand", top_k=2_000, num_oov_buckets=5),
        CategoricalFeature("device"),
        CategoricalFeature("page"),
        CategoricalFeature("segment"),
    ),
    numeric=(
        NumericFeature("item_price", dtype="float32", log1p=True, num_buckets=20),
        NumericFeature("item_sales_30d", dtype="int64", log1p=True, num_buckets=20),
        NumericFeature("user_orders_90d", dtype="int64", log1p=True, num_buckets=10),
    ),
    labels=LabelSpec(click="click", daction=("cart", "wish"), purchase="purchase", continuous=("staytime",)),
    oracle=("true_ctr", "true_ctavr", "true_cvr", "true_ctcvr", "true_scenario", "true_group", "true_stage"),
)
