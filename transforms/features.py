"""The feature contract: the one module that transforms, models and serving all import.

It names the raw columns of a dataset, the roles they play (ids, time, labels, oracle columns that must
never become features), how each raw feature is transformed, and the names of the transformed tensors the
models consume. Nothing here depends on TensorFlow, so every layer of the house can import it cheaply.

Transformed names follow one rule so that models and serving can derive them without guessing:

* categorical ``x``      -> ``x_id``     int64 [B, 1], vocabulary index (frequency ranked) or OOV bucket;
* numeric ``x``          -> ``x_bucket`` int64 [B, 1], 0 = missing, 1..n = quantile bucket;
                            ``x_z``      float32 [B, 1], z-score of (log1p) x, 0 for missing;
* sequence ``x``         -> ``x_seq``    int64 [B, L], 0 = padding, 1.. = vocabulary index + 1;
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


# Leakage-safe per-user features (computed in Beam, see pipeline/beam/user_features.py).
UF_COUNT = "uf_count"
UF_IN_HISTORY = "uf_item_in_history"
UF_REPEAT_RATIO = "uf_repeat_ratio"
UF_HISTORY = "uf_history"
# The raw prior-event count, passed through for evaluation slices (users with few events); never a model input.
UF_COUNT_RAW = "uf_count_raw"
# MUSENET's auxiliary label r_i (Eq. 10): the raw ``uf_repeat_ratio`` (not its z-score), float32 [B, 1].
REPEAT_RATIO_LABEL = "pl_repeat_ratio"


def uf_rate(label: str) -> str:
    """Running mean of a transformed binary label over the user's earlier events (STAN Eq. 10)."""
    return f"uf_rate_{label}"


def pseudo_label(label: str) -> str:
    """Transformed name of the raw running label mean (STAN's pseudo-label l^k, Eq. 10): float [B, 1]."""
    return f"pl_{label}"


def categorical_id(name: str) -> str:
    return f"{name}_id"


def bucket_id(name: str) -> str:
    return f"{name}_bucket"


def zscore(name: str) -> str:
    return f"{name}_z"


def sequence_ids(name: str) -> str:
    return f"{name}_seq"


def flag(name: str) -> str:
    """Transformed name of a raw 0/1 column passed through as float32 [B, 1] (0 when missing)."""
    return f"{name}_flag"


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical column mapped through a frequency-ranked vocabulary with OOV buckets."""

    name: str
    dtype: str = "string"  # "string" or "int64"
    top_k: Optional[int] = None
    frequency_threshold: int = 1
    num_oov_buckets: int = 1
    hash_buckets: Optional[int] = None  # set: hash into this many buckets instead of a vocabulary
    # Misra-Gries top_k vocabulary (tft.experimental.approximate_vocabulary): exact while the number of
    # distinct values is <= top_k, much cheaper in Beam; needs top_k.
    approximate: bool = False

    def __post_init__(self):
        if self.approximate and (not self.top_k or self.frequency_threshold > 1):
            raise ValueError(f"categorical feature {self.name!r}: an approximate vocabulary needs top_k "
                             "and no min_frequency")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"categorical feature {self.name!r}: hash_buckets must be >= 1")
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
class SequenceFeature:
    """A multi-valued column (e.g. a behaviour history) -> [B, max_length] vocabulary ids, 0 = padding.

    Raw form: one string with ``separator`` between tokens. Longer sequences keep their *last*
    ``max_length`` tokens (the most recent, for histories) and are counted as truncated.
    """

    name: str
    separator: str = "^"
    max_length: int = 20
    top_k: Optional[int] = None
    frequency_threshold: int = 1
    num_oov_buckets: int = 1
    dtype: str = "string"
    columns_prefix: Optional[str] = None  # tokens spread over columns PREFIX0, PREFIX1, ... instead of one
    pad_token: Optional[str] = None  # a token that means "no item" and is dropped

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"sequence feature {self.name!r}: max_length must be >= 1")
        if not self.separator:
            raise ValueError(f"sequence feature {self.name!r}: separator must be non-empty")
        if self.num_oov_buckets < 1:
            raise ValueError(f"sequence feature {self.name!r}: num_oov_buckets must be >= 1")

    @property
    def vocab_name(self) -> str:
        return f"vocab_{self.name}"


@dataclass(frozen=True)
class UserFeatureSpec:
    """Enables the derived ``uf_*`` features; ``history_length`` = items kept in ``uf_history``."""

    history_length: int = 20

    def __post_init__(self):
        if self.history_length < 1:
            raise ValueError(f"user_features.history_length must be >= 1, got {self.history_length}")


@dataclass(frozen=True)
class LabelSpec:
    """How label columns map onto the ESM² behaviour graph impression -> click -> D(O)Action -> purchase."""

    click: str = "click"
    daction: Tuple[str, ...] = ("cart", "wish")  # DAction = OR of these post-click actions; () if none
    purchase: Optional[str] = "purchase"         # None when the data has no conversion label
    continuous: Tuple[str, ...] = ("staytime",)

    @property
    def binary_columns(self) -> Tuple[str, ...]:
        return (self.click,) + tuple(self.daction) + ((self.purchase,) if self.purchase else ())

    @property
    def transformed(self) -> Tuple[str, ...]:
        """Transformed binary label names present for this dataset."""
        return (CLICK,) + ((DACTION,) if self.daction else ()) + ((PURCHASE,) if self.purchase else ())


@dataclass(frozen=True)
class FeatureContract:
    """Everything downstream code needs to know about a dataset's columns."""

    name: str
    user_id: Optional[str]
    item_id: Optional[str]
    timestamp: Optional[str]
    categorical: Tuple[CategoricalFeature, ...]
    numeric: Tuple[NumericFeature, ...]
    labels: LabelSpec = field(default_factory=LabelSpec)
    # Columns carrying the generator's true probabilities / latent truth: evaluation only, never features.
    oracle: Tuple[str, ...] = ()
    sequences: Tuple[SequenceFeature, ...] = ()
    # Explicit business segment / scenario columns (they are also ordinary categorical features).
    segment: Optional[str] = None
    scenario: Optional[str] = None
    user_features: Optional[UserFeatureSpec] = None
    # Raw columns that describe the user (not the item or the context): STAN's U, user-side models.
    user_columns: Tuple[str, ...] = ()
    # Raw 0/1 feature columns also passed through unchanged as ``flag(x)`` float32 [B, 1] model inputs
    # (e.g. MUSENET's exact indicator I[t in B_u], Eq. 9, beside its embedded vocabulary id).
    flags: Tuple[str, ...] = ()

    def __post_init__(self):
        names = ([f.name for f in self.categorical] + [f.name for f in self.numeric]
                 + [f.name for f in self.sequences])
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"contract {self.name!r}: feature(s) declared twice: {dupes}")
        leaked = sorted(set(names) & (set(self.labels.binary_columns) | set(self.labels.continuous) | set(self.oracle)))
        if leaked:
            raise ValueError(f"contract {self.name!r}: label/oracle column(s) declared as features: {leaked}")
        numeric_cols = {f.name for f in self.categorical + self.numeric if f.dtype != "string"}
        bad_flags = [n for n in self.flags if n not in numeric_cols]
        if bad_flags:
            raise ValueError(f"contract {self.name!r}: flag column(s) {bad_flags} must be declared int64/float32 "
                             "features")

    # ---- raw side -------------------------------------------------------------------------------
    @property
    def serving_columns(self) -> Tuple[str, ...]:
        """Raw columns a serving request carries: features and the timestamp, never labels or oracle."""
        cols = [f.name for f in self.categorical] + [f.name for f in self.numeric] + [f.name for f in self.sequences]
        if self.timestamp:
            cols.append(self.timestamp)
        return tuple(dict.fromkeys(cols))

    def raw_dtype(self, column: str) -> str:
        """'string' | 'int64' | 'float32' of a raw column (features, timestamp, labels, oracle)."""
        for f in self.categorical + self.sequences:
            if f.name == column:
                return f.dtype
        for f in self.numeric:
            if f.name == column:
                return f.dtype
        if column == self.timestamp or column in self.labels.binary_columns:
            return "int64"
        if column in self.labels.continuous:
            return "float32"
        if column in self.oracle:
            return "int64" if column.startswith("true_") and column[5:] in ("scenario", "group", "stage") else "float32"
        raise KeyError(f"contract {self.name!r} has no column {column!r}")

    @property
    def label_columns(self) -> Tuple[str, ...]:
        return tuple(self.labels.binary_columns) + tuple(self.labels.continuous)

    # ---- transformed side -----------------------------------------------------------------------
    @property
    def model_categorical(self) -> Dict[str, int]:
        """Transformed categorical inputs whose cardinality is fixed by the contract (buckets, hour, hashes)."""
        out = {bucket_id(f.name): f.bucket_cardinality for f in self.numeric}
        out.update({categorical_id(f.name): f.hash_buckets for f in self.categorical if f.hash_buckets})
        if self.timestamp:
            out[HOUR_ID] = HOUR_CARDINALITY
        return out

    @property
    def vocab_features(self) -> Tuple[CategoricalFeature, ...]:
        """Categorical features mapped through a vocabulary (cardinality known after analysis)."""
        return tuple(f for f in self.categorical if not f.hash_buckets)

    @property
    def model_dense(self) -> Tuple[str, ...]:
        return tuple(zscore(f.name) for f in self.numeric)

    def embedded_fields(self, columns) -> Tuple[str, ...]:
        """Transformed embedding-field names (ids, buckets, sequences) of the given raw columns."""
        out = []
        for f in self.categorical:
            if f.name in columns:
                out.append(categorical_id(f.name))
        for f in self.numeric:
            if f.name in columns:
                out.append(bucket_id(f.name))
        for f in self.sequences:
            if f.name in columns:
                out.append(sequence_ids(f.name))
        return tuple(out)

    @property
    def pseudo_labels(self) -> Tuple[str, ...]:
        """Label-like outputs of the per-user stage: STAN's running label means and MUSENET's repeat ratio."""
        if not self.user_features:
            return ()
        return tuple(pseudo_label(l) for l in self.labels.transformed) + (REPEAT_RATIO_LABEL,)

    @property
    def transformed_labels(self) -> Tuple[str, ...]:
        return self.labels.transformed + tuple(self.labels.continuous)

    def model_feature_names(self) -> Tuple[str, ...]:
        names = [categorical_id(f.name) for f in self.vocab_features] + list(self.model_categorical)
        names += list(self.model_dense) + [sequence_ids(f.name) for f in self.sequences]
        names += [flag(name) for name in self.flags]
        return tuple(dict.fromkeys(names))


def with_user_features(contract: FeatureContract, spec: UserFeatureSpec) -> FeatureContract:
    """``contract`` plus the derived per-user features, declared like any other feature."""
    from dataclasses import replace

    missing = [r for r in ("user_id", "item_id", "timestamp") if not getattr(contract, r)]
    if missing:
        raise ValueError(f"user_features need the role(s) {', '.join(missing)}")
    numeric = [NumericFeature(UF_COUNT, dtype="float32", log1p=True, num_buckets=10)]
    numeric += [NumericFeature(uf_rate(l), dtype="float32", log1p=False, num_buckets=5)
                for l in contract.labels.transformed]
    numeric.append(NumericFeature(UF_REPEAT_RATIO, dtype="float32", log1p=False, num_buckets=5))
    derived_user = (UF_COUNT,) + tuple(uf_rate(l) for l in contract.labels.transformed) + (
        UF_REPEAT_RATIO, UF_HISTORY)
    return replace(
        contract, user_features=spec, user_columns=contract.user_columns + derived_user,
        numeric=contract.numeric + tuple(numeric),
        categorical=contract.categorical + (CategoricalFeature(UF_IN_HISTORY, dtype="int64"),),
        flags=contract.flags + (UF_IN_HISTORY,),
        sequences=contract.sequences + (SequenceFeature(UF_HISTORY, max_length=spec.history_length,
                                                        top_k=100_000, num_oov_buckets=10),))


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
    segment="segment",
    user_columns=("user_id", "user_gender", "user_age", "user_city", "user_power", "user_orders_90d", "segment"),
)
BUILTIN = with_user_features(BUILTIN, UserFeatureSpec(history_length=20))
