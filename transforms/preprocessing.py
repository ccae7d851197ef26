"""The tensorflow-transform ``preprocessing_fn`` and the raw feature spec, both driven by the contract.

Raw features arrive as ``tf.SparseTensor`` [B, <=1] (``VarLenFeature``), so a missing value is simply an
absent entry; labels and the timestamp are required ``FixedLenFeature`` [B]. Every analyzer (vocabulary,
quantiles, mean/variance) is a tensorflow-transform analyzer and runs over the training split only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from transforms import features as F
from transforms.features import FeatureContract

_TF_DTYPES = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}


def raw_feature_spec(contract: FeatureContract, include_labels: bool = True, include_oracle: bool = True) -> Dict:
    """``tf.io`` parsing spec of the raw columns. Serving uses ``include_labels=include_oracle=False``.

    Features (and sequences, whose values are their tokens) are ``VarLenFeature``s so that a missing value
    is an absent entry; the timestamp, labels and oracle columns are required ``FixedLenFeature([])``s.
    """
    spec = {}
    for f in contract.categorical:
        spec[f.name] = tf.io.VarLenFeature(_TF_DTYPES[f.dtype])
    for f in contract.numeric:
        spec[f.name] = tf.io.VarLenFeature(_TF_DTYPES[f.dtype])
    for f in contract.sequences:
        spec[f.name] = tf.io.VarLenFeature(tf.string)
    if contract.timestamp:
        spec[contract.timestamp] = tf.io.FixedLenFeature([], tf.int64)
    if include_labels:
        for name in contract.labels.binary_columns:
            spec[name] = tf.io.FixedLenFeature([], tf.int64)
        for name in contract.labels.continuous:
            spec[name] = tf.io.FixedLenFeature([], tf.float32)
    if include_oracle:
        for name in contract.oracle:
            spec[name] = tf.io.FixedLenFeature([], _TF_DTYPES[contract.raw_dtype(name)])
    return spec


def _dense(x: tf.SparseTensor, default) -> tf.Tensor:
    """[B, <=1] sparse -> [B, 1] dense, absent entries set to ``default``."""
    return tft.sparse_tensor_to_dense_with_shape(x, [None, 1], default_value=default)


def _as_sparse(x) -> tf.SparseTensor:
    if isinstance(x, tf.SparseTensor):
        return x
    # A FixedLen/dense input (e.g. from a user schema) behaves like a fully present sparse one.
    x = tf.reshape(x, [-1, 1])
    return tf.SparseTensor(indices=tf.where(tf.ones_like(x, dtype=tf.bool)), values=tf.reshape(x, [-1]),
                           dense_shape=tf.shape(x, out_type=tf.int64))


def bucket_scope(name: str) -> str:
    """Name scope of a numeric feature's ops in the transform graph."""
    return f"rl_numeric_{name}"


@dataclass(frozen=True)
class NumericStatistics:
    """A numeric feature's analyzer results, fixed: quantile ``boundaries`` [n] (of the log1p'd values when the
    feature has log1p) and the ``mean`` and ``var`` of its z-score, all float32 as in the transform graph."""

    boundaries: Tuple[float, ...]
    mean: float
    var: float


# Names of the constants a preprocessing_fn with fixed statistics puts in each numeric feature's scope.
_FIXED = {"boundaries": "fixed_boundaries", "mean": "fixed_mean", "var": "fixed_var"}


def _numeric(f, inputs, outputs, fixed: Optional[NumericStatistics] = None) -> None:
    """log1p (negatives clipped to 0), quantile buckets (0 = missing) and z-score of a numeric feature.

    ``fixed``: the statistics to apply instead of running the quantiles and mean/variance analyzers; the ops are
    those ``tft.bucketize`` / ``tft.scale_to_z_score`` apply, so outputs equal the graph the statistics came from.
    """
    x = _as_sparse(inputs[f.name])
    if f.log1p:
        # In float64, rounded to float32: float32 log1p's vectorized and scalar kernels differ in the last bit for
        # ~40% of inputs, so a value's bucket (boundaries are data values) would depend on its place in the batch:
        # a request scored alone could land in another bucket than the same row did in training. The rounded
        # float64 result is the same on both kernels (and equals numpy's).
        values = tf.cast(tf.math.log1p(tf.maximum(tf.cast(x.values, tf.float64), 0.0)), tf.float32)
    else:
        values = tf.cast(x.values, tf.float32)
    x = tf.SparseTensor(x.indices, values, x.dense_shape)
    if fixed is None:
        # Analyzers see present values only; missing becomes bucket 0 and z-score 0 (the mean).
        buckets = tft.bucketize(x, f.num_buckets, elementwise=False)
        outputs[F.bucket_id(f.name)] = _dense(buckets, tf.constant(-1, tf.int64)) + 1
        outputs[F.zscore(f.name)] = _dense(tft.scale_to_z_score(x), 0.0)
        return
    boundaries = tf.constant([list(fixed.boundaries)], tf.float32, name=_FIXED["boundaries"])
    buckets = tft.apply_buckets(x, boundaries)
    outputs[F.bucket_id(f.name)] = _dense(buckets, tf.constant(-1, tf.int64)) + 1
    # As tft.scale_to_z_score applies its analyzer's outputs, and in the same form, so that grappler optimizes
    # both alike (otherwise 1 ulp apart): a TF1-mode graph holds analyzer results as constants, which grappler may
    # fold (a division by a constant becomes a multiplication by its reciprocal); a TF2-mode graph captures them
    # as inputs, so there the statistics enter through PlaceholderWithDefault, which grappler does not fold.
    if tf.inside_function():  # TF2 mode: TFT traces the preprocessing_fn into a tf.function
        fixed_input = lambda value, key: tf.raw_ops.PlaceholderWithDefault(  # noqa: E731
            input=tf.constant(value, tf.float32, name=_FIXED[key]), shape=[])
    else:
        fixed_input = lambda value, key: tf.constant(value, tf.float32, name=_FIXED[key])  # noqa: E731
    centred = x.values - fixed_input(fixed.mean, "mean")
    std = tf.sqrt(fixed_input(fixed.var, "var"))
    z = tf.where(tf.not_equal(std, 0), tf.divide(centred, std), centred)
    outputs[F.zscore(f.name)] = _dense(tf.SparseTensor(x.indices, z, x.dense_shape), 0.0)


# The signature of a transform graph that tensorflow-transform wrote in TF1 graph mode
# (``tft_beam.Context(force_tf_compat_v1=True)``); a TF2-mode graph has ``transform_fn`` instead.
TF1_TRANSFORM_SIGNATURE = "transform_signature"


def _saved_transform(tft_dir: str):
    """The ``SavedModel`` proto of the transform graph in ``tft_dir`` (a ``transform_fn_output``)."""
    import os

    from tensorflow.core.protobuf import saved_model_pb2

    with tf.io.gfile.GFile(os.path.join(tft_dir, "transform_fn", "saved_model.pb"), "rb") as fh:
        return saved_model_pb2.SavedModel.FromString(fh.read())


def _is_tf1(saved) -> bool:
    """Whether a transform graph's ``SavedModel`` proto was written in TF1 graph mode."""
    return any(TF1_TRANSFORM_SIGNATURE in mg.signature_def for mg in saved.meta_graphs)


def is_tf1_transform_graph(tft_dir: str) -> bool:
    """Whether the transform graph in ``tft_dir`` was written in TF1 graph mode (what ``pipeline.beam`` writes);
    applying it in Beam then needs ``force_tf_compat_v1=True`` too (tensorflow-transform's TF2 ``TransformDataset``
    cannot finalize a TF1 graph). Graphs of earlier rankline versions are TF2 ones."""
    return _is_tf1(_saved_transform(tft_dir))


def _tf1_graph_values(saved) -> Dict[str, object]:
    """A TF1-mode transform graph's constants (``saved``: its ``SavedModel`` proto), keyed ``<consumer op>:<input
    index>`` (analyzer results are constants there, consumed by the ops that apply them) and, for the fixed
    statistics, by their own names; op names without the graph's ``transform/`` scope."""
    graph = saved.meta_graphs[0].graph_def
    strip = lambda name: name[len("transform/"):] if name.startswith("transform/") else name  # noqa: E731
    consts = {n.name: n for n in graph.node if n.op == "Const"}
    values: Dict[str, object] = {}
    for name, node in consts.items():
        if name.rsplit("/", 1)[-1] in _FIXED.values():
            values[strip(name)] = tf.make_ndarray(node.attr["value"].tensor)
    for node in graph.node:
        for i, inp in enumerate(node.input):
            src = inp.split(":")[0]
            if src in consts and "/" not in src:  # TFT's replaced analyzer outputs sit at the top level
                values[f"{strip(node.name)}:{i}"] = tf.make_ndarray(consts[src].attr["value"].tensor)
    return values


# Where each analyzer result of a numeric feature is consumed: TF2 mode (the captured input's name in the
# function that uses it), TF1 mode (the consuming op and input index), relative to the feature's bucket_scope.
_CONSUMERS = {
    "boundaries": (r"_bucketize_apply_buckets_\d+", r"/bucketize/apply_buckets/assign_buckets/Reshape_1:0"),
    "mean": ("_scale_to_z_score_sub_y", "/scale_to_z_score/sub:1"),
    "var": ("_scale_to_z_score_sqrt_x", "/scale_to_z_score/Sqrt:0"),
}


def read_numeric_statistics(tft_dir: str, contract: FeatureContract) -> Dict[str, NumericStatistics]:
    """{numeric feature: its ``NumericStatistics``} as applied by the transform graph in ``tft_dir`` (the
    ``transform_fn_output`` of tft_beam.WriteTransformFn), made by either ``preprocessing_fn`` path, in TF1 or
    TF2 mode.

    Analyzer results are found by the ops that consume them in the feature's ``bucket_scope``: in a TF2-mode graph
    the transform function's captured inputs, named after those ops (``..._bucketize_apply_buckets_N``,
    ``..._scale_to_z_score_sub_y`` (mean), ``..._scale_to_z_score_sqrt_x`` (variance)); in a TF1-mode graph
    constants feeding ``.../apply_buckets/...``, ``.../scale_to_z_score/sub`` and ``.../Sqrt``. Fixed statistics
    are named constants in both. Raises ``ValueError`` naming the feature and the directory when one is not found.
    """
    import re

    saved = _saved_transform(tft_dir)
    tf1 = _is_tf1(saved)
    values = _tf1_graph_values(saved) if tf1 else _tf2_graph_values(tft_dir)
    out = {}
    for f in contract.numeric:
        scope = bucket_scope(f.name)

        def find(key: str):
            if f"{scope}/{_FIXED[key]}" in values:
                return values[f"{scope}/{_FIXED[key]}"]
            pattern = re.escape(scope) + _CONSUMERS[key][1 if tf1 else 0]
            hits = [v for k, v in values.items() if re.fullmatch(pattern, k)]
            if len(hits) != 1:
                raise ValueError(f"numeric feature {f.name!r}: {len(hits)} {key} values in the transform "
                                 f"graph of {tft_dir} (expected 1)")
            return hits[0]

        out[f.name] = NumericStatistics(tuple(float(b) for b in find("boundaries").reshape(-1)),
                                        float(find("mean")), float(find("var")))
    return out


def _tf2_graph_values(tft_dir: str) -> Dict[str, object]:
    """A TF2-mode transform graph's captured analyzer results, keyed by the argument name of the function that
    consumes them, and its fixed-statistics constants, keyed by their names inside their function."""
    import os

    loaded = tf.saved_model.load(os.path.join(tft_dir, "transform_fn"))
    fn = loaded.signatures["serving_default"]
    graph = fn.graph
    captured = {inner.ref(): ext for ext, inner in zip(fn.captured_inputs, graph.internal_captures)}
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    values: Dict[str, object] = {}
    for op in graph.get_operations():
        if op.type not in ("PartitionedCall", "StatefulPartitionedCall"):
            continue
        fdef = library.get(op.get_attr("f").name)
        if fdef is None:
            continue
        for arg, tensor in zip(fdef.signature.input_arg, op.inputs):
            if tensor.ref() in captured and captured[tensor.ref()].dtype != tf.resource:
                values[arg.name] = captured[tensor.ref()].numpy()
    for fdef in library.values():
        for node in fdef.node_def:
            if node.op == "Const" and node.name.rsplit("/", 1)[-1] in _FIXED.values():
                values[node.name] = tf.make_ndarray(node.attr["value"].tensor)
    return values


def build_preprocessing_fn(contract: FeatureContract,
                           numeric_statistics: Optional[Mapping[str, NumericStatistics]] = None):
    """Returns a ``preprocessing_fn(inputs) -> outputs`` for ``contract`` (names in transforms.features).

    ``numeric_statistics`` ({numeric feature: ``NumericStatistics``}, e.g. ``read_numeric_statistics`` of an
    earlier transform graph): numeric features apply these instead of analyzing the data, so only the
    vocabularies are re-analyzed (``pipeline.retrain --refresh-vocabulary``); every numeric feature needs one.
    """
    if numeric_statistics is not None:
        missing = [f.name for f in contract.numeric if f.name not in numeric_statistics]
        if missing:
            raise ValueError(f"numeric_statistics lacks the numeric feature(s) {', '.join(missing)}")

    def preprocessing_fn(inputs):
        outputs = {}
        for f in contract.categorical:
            missing = F.MISSING_TOKEN if f.dtype == "string" else -1
            x = _dense(_as_sparse(inputs[f.name]), missing)
            if f.hash_buckets:
                as_str = x if f.dtype == "string" else tf.strings.as_string(x)
                outputs[F.categorical_id(f.name)] = tf.strings.to_hash_bucket_fast(as_str, f.hash_buckets)
                continue
            if f.approximate:
                vocab = tft.experimental.approximate_vocabulary(x, f.top_k, vocab_filename=f.vocab_name)
                outputs[F.categorical_id(f.name)] = tft.apply_vocabulary(x, vocab, num_oov_buckets=f.num_oov_buckets)
                continue
            outputs[F.categorical_id(f.name)] = tft.compute_and_apply_vocabulary(
                x, top_k=f.top_k,
                frequency_threshold=f.frequency_threshold if f.frequency_threshold > 1 else None,
                num_oov_buckets=f.num_oov_buckets, vocab_filename=f.vocab_name)
        for f in contract.sequences:
            x = inputs[f.name]
            batch = x.dense_shape[0]
            x = tf.sparse.slice(x, [0, 0], tf.stack([batch, tf.constant(f.max_length, tf.int64)]))
            ids = tft.compute_and_apply_vocabulary(
                x, top_k=f.top_k, frequency_threshold=f.frequency_threshold if f.frequency_threshold > 1 else None,
                num_oov_buckets=f.num_oov_buckets, vocab_filename=f.vocab_name)
            ids = tf.SparseTensor(ids.indices, ids.values + 1, ids.dense_shape)  # 0 is padding
            outputs[F.sequence_ids(f.name)] = tft.sparse_tensor_to_dense_with_shape(
                ids, [None, f.max_length], default_value=0)
        for f in contract.numeric:
            with tf.name_scope(bucket_scope(f.name)):
                _numeric(f, inputs, outputs, numeric_statistics[f.name] if numeric_statistics else None)
        if contract.timestamp:
            ts = tf.reshape(tf.cast(inputs[contract.timestamp], tf.int64), [-1, 1])
            outputs[F.HOUR_ID] = tf.math.floormod(tf.math.floordiv(ts, 3600), F.HOUR_CARDINALITY)
        # Labels on the behaviour graph (absent at serving time: these outputs are pruned there).
        labels = contract.labels
        if labels.click in inputs:
            as_col = lambda name: tf.reshape(tf.cast(inputs[name], tf.int64), [-1, 1])  # noqa: E731
            outputs[F.CLICK] = as_col(labels.click)
            if labels.daction:
                daction = tf.zeros_like(outputs[F.CLICK])
                for name in labels.daction:
                    daction = tf.maximum(daction, as_col(name))
                outputs[F.DACTION] = daction
            if labels.purchase:
                outputs[F.PURCHASE] = as_col(labels.purchase)
            for name in labels.continuous:
                outputs[name] = tf.reshape(tf.cast(inputs[name], tf.float32), [-1, 1])
        # Raw 0/1 columns passed through as float32 [B, 1] (any non-zero value is 1, missing is 0).
        for name in contract.flags:
            x = _as_sparse(inputs[name])
            on = tf.cast(tf.not_equal(x.values, tf.zeros_like(x.values)), tf.float32)
            outputs[F.flag(name)] = _dense(tf.SparseTensor(x.indices, on, x.dense_shape), 0.0)
        # STAN's pseudo-labels: the raw running label means (not their z-scores), for its squared-error loss;
        # MUSENET's auxiliary label r_i (Eq. 10): the raw running repeat ratio.
        for label in contract.labels.transformed if contract.user_features else ():
            outputs[F.pseudo_label(label)] = _dense(_as_sparse(inputs[F.uf_rate(label)]), 0.0)
        if contract.user_features:
            outputs[F.REPEAT_RATIO_LABEL] = _dense(_as_sparse(inputs[F.UF_REPEAT_RATIO]), 0.0)
        for name in contract.oracle:
            if name in inputs:
                outputs[name] = tf.reshape(inputs[name], [-1, 1])
        if contract.user_features:   # evaluation slices by the user's prior event count
            outputs[F.UF_COUNT_RAW] = _dense(_as_sparse(inputs[F.UF_COUNT]), 0.0)
        return outputs

    return preprocessing_fn


def preprocessing_fn(inputs):
    """Module-level ``preprocessing_fn`` for the built-in dataset (tensorflow-transform convention)."""
    return build_preprocessing_fn(F.BUILTIN)(inputs)
