"""TF Serving warmup records: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays the file once per record when it loads a version (``--enable_model_warmup``, on by
default), before the version becomes AVAILABLE, so the first real requests do not pay for graph
optimisation and lazy initialisation. The file is an uncompressed TFRecord file of
``tensorflow_serving.apis.PredictionLog`` protos; TF Serving fails the load of a version whose file has more than
1000 records (saved_model_warmup_util.cc), and replays them through the batching session, so no record may
hold more rows than the server's ``max_batch_size``.

Here every record is a ``PredictLog`` whose ``PredictRequest`` calls ``serving_default`` with ``examples``
(tf.string [B], serialized raw ``tf.Example``s). Records come in a few batch sizes so the shapes seen in
production (one candidate, a page of candidates) are warmed up.
"""
from __future__ import annotations

import os
from typing import List, Sequence

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's limit


def warmup_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, WARMUP_DIR, WARMUP_FILE)


def build_records(model_name: str, serialized: Sequence[bytes], signature: str = "serving_default",
                  input_name: str = "examples", batch_sizes: Sequence[int] = (1, 16, 128)) -> List:
    """PredictionLog records: for each batch size b (capped at the number of examples), one request with the
    first b examples. Raises ValueError when there are no examples or an example is not bytes."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    examples = list(serialized)
    if not examples:
        raise ValueError("warmup: no examples given (pass real serialized raw tf.Examples, e.g. eval rows)")
    bad = [i for i, e in enumerate(examples) if not isinstance(e, (bytes, bytearray))]
    if bad:
        raise ValueError(f"warmup: example(s) at index {bad[:5]} are not serialized bytes")
    sizes = sorted({min(int(b), len(examples)) for b in batch_sizes if int(b) > 0}) or [len(examples)]
    records = []
    for size in sizes[:MAX_RECORDS]:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(examples[:size], dtype=tf.string, shape=[size]))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return records


def write_warmup_file(saved_model_dir: str, records: Sequence) -> str:
    """Writes ``records`` (PredictionLog) into ``saved_model_dir``'s warmup file; returns its path."""
    import tensorflow as tf

    if len(records) > MAX_RECORDS:
        raise ValueError(f"warmup: {len(records)} records, TF Serving reads at most {MAX_RECORDS}")
    path = warmup_path(saved_model_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return path


def read_warmup_file(path: str) -> List:
    """The PredictionLog records of a warmup file (raises on a record that does not parse)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    out = []
    for i, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(raw)
        except Exception as exc:  # noqa: BLE001  (protobuf raises DecodeError)
            raise ValueError(f"{path}: record {i} is not a PredictionLog ({exc})") from None
        out.append(log)
    return out
