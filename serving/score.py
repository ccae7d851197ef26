"""Score raw impressions with an exported model.

    python -m serving.score --saved-model EXPORT/esm2/1 --input impressions.parquet [--limit 10]

Backend ``--saved-model`` loads the SavedModel in-process (no project code needed to run it). Rows are
read from Parquet or JSON lines; only the serving columns of the feature contract are sent.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Mapping, Sequence

import numpy as np


def score_saved_model(saved_model_dir: str, serialized: Sequence[bytes],
                      signature: str = "serving_default") -> Dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    if signature not in loaded.signatures:
        raise KeyError(f"{saved_model_dir}: no signature {signature!r} (has {sorted(loaded.signatures)})")
    fn = loaded.signatures[signature]
    out = fn(examples=tf.constant(list(serialized), dtype=tf.string))
    return {k: v.numpy() for k, v in out.items()}


def read_rows(path: str, limit: int) -> List[Mapping]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(0) if limit else pq.read_table(path)
        return table.slice(0, limit or table.num_rows).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if limit and len(rows) >= limit:
                break
    return rows


def main(argv=None) -> int:
    from serving.examples import serialize_rows
    from transforms.features import BUILTIN

    parser = argparse.ArgumentParser(prog="python -m serving.score", description="Score raw impressions.")
    parser.add_argument("--saved-model", required=True, help="exported version directory, e.g. export/esm2/1")
    parser.add_argument("--input", required=True, help="Parquet file or JSON-lines file of raw impressions")
    parser.add_argument("--limit", type=int, default=10, help="rows to score (0 = all)")
    args = parser.parse_args(argv)
    try:
        rows = read_rows(args.input, args.limit)
        scores = score_saved_model(args.saved_model, serialize_rows(rows, BUILTIN))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    names = sorted(scores)
    print("\t".join(["row"] + names))
    for i in range(len(rows)):
        print("\t".join([str(i)] + [f"{scores[n][i]:.6f}" for n in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
