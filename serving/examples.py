"""Raw ``tf.Example`` construction from plain Python rows, typed by the feature contract."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping

import tensorflow as tf

from transforms.features import FeatureContract


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def raw_example(row: Mapping, contract: FeatureContract) -> tf.train.Example:
    """One raw impression -> ``tf.train.Example`` with only the serving columns (labels never sent).

    Missing values (None / NaN) are left out of the example, exactly as the transform graph expects.
    """
    feats: Dict[str, tf.train.Feature] = {}
    sequences = {f.name: f for f in contract.sequences}
    for name in contract.serving_columns:
        value = row.get(name)
        if name in sequences:
            f = sequences[name]
            if _is_missing(value):
                tokens = []
            elif isinstance(value, (list, tuple)):
                tokens = [str(t) for t in value]
            else:
                tokens = [t for t in str(value).split(f.separator) if t]
            tokens = tokens[-f.max_length:]
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode("utf-8") for t in tokens]))
            continue
        if _is_missing(value):
            if name == contract.timestamp:
                raise ValueError(f"raw row lacks the required field {name!r}")
            continue
        kind = contract.raw_dtype(name)
        if kind == "string":
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
        elif kind == "int64":
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        else:
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    return tf.train.Example(features=tf.train.Features(feature=feats))


def serialize_rows(rows: Iterable[Mapping], contract: FeatureContract) -> List[bytes]:
    return [raw_example(r, contract).SerializeToString() for r in rows]
