"""Score raw impressions with an exported model, in-process or through TF Serving.

    python -m serving.score --saved-model EXPORT/esm2/1 --input impressions.parquet [--limit 10]
    python -m serving.score --target 127.0.0.1:8500 --model-name esm2 [--version-label stable] --input rows.jsonl

Backend ``--saved-model`` (the embedded default) loads the SavedModel in-process (no project code needed to
run it). Backend ``--target`` sends the rows to TF Serving over gRPC (``serving.client``), checking them
against the served signature first, in requests of at most ``--max-batch-size`` rows, within one deadline
``--timeout`` (UNAVAILABLE retried for ``--retry-budget`` seconds); ``--tls`` / ``--ca-cert`` speak TLS,
adding ``--client-cert`` and ``--client-key`` mutual TLS. Rows are read from Parquet or JSON lines; only the
serving columns of the feature contract are sent.

    python -m serving.score --target serving.example:8500 --ca-cert ca.crt --client-cert client.crt \
        --client-key client.key [--tls-server-name tf-serving] --input rows.jsonl
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


def score_tf_serving(target: str, model_name: str, serialized: Sequence[bytes], version: int | None = None,
                     version_label: str | None = None, signature: str = "serving_default",
                     timeout_s: float = 30.0, **client_options) -> Dict[str, np.ndarray]:
    """``client_options``: further ``TFServingClient`` keywords (retry_budget_s, max_batch_size, TLS files)."""
    from serving.client import TFServingClient

    with TFServingClient(target, model_name, version=version, version_label=version_label,
                         timeout_s=timeout_s, **client_options) as client:
        return client.score_examples(serialized, signature=signature)


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
    from serving.tf_quiet import quiet_tensorflow

    quiet_tensorflow(sys.argv[1:] if argv is None else argv)
    from serving.client import ServingError, SignatureMismatch
    from serving.examples import serialize_rows
    from transforms.features import BUILTIN

    parser = argparse.ArgumentParser(prog="python -m serving.score", description="Score raw impressions.")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--saved-model", help="in-process: exported version directory, e.g. export/esm2/1")
    backend.add_argument("--target", help="TF Serving gRPC endpoint host:port, e.g. 127.0.0.1:8500")
    parser.add_argument("--input", required=True, help="Parquet file or JSON-lines file of raw impressions")
    parser.add_argument("--limit", type=int, default=10, help="rows to score (0 = all)")
    parser.add_argument("--model-name", default="esm2", help="--target: served model name (default esm2)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--version", type=int, default=None, help="--target: model version (default: latest)")
    pick.add_argument("--version-label", default=None, help="--target: version label, e.g. stable or canary")
    parser.add_argument("--signature", default="serving_default", help="signature taking serialized examples")
    parser.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up log lines (CUDA, CPU features), hidden on machines without a GPU")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="--target: deadline of the whole call in seconds, chunks and retries included")
    parser.add_argument("--attempt-timeout", type=float, default=10.0, help="--target: deadline of one RPC attempt")
    parser.add_argument("--retry-budget", type=float, default=30.0,
                        help="--target: seconds during which UNAVAILABLE (server restarting) is retried")
    parser.add_argument("--max-batch-size", type=int, default=1024,
                        help="--target: rows per request (TF Serving's batching max_batch_size; 0 = no limit)")
    parser.add_argument("--tls", action="store_true", help="--target: TLS with the system's root certificates")
    parser.add_argument("--ca-cert", help="--target: PEM CA certificate that signed the server's (implies TLS)")
    parser.add_argument("--client-cert", help="--target: PEM client certificate chain, for mutual TLS")
    parser.add_argument("--client-key", help="--target: PEM client private key, for mutual TLS")
    parser.add_argument("--tls-server-name", help="--target: name the server's certificate must carry, if not "
                                                  "the target's host (grpc.ssl_target_name_override)")
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together (mutual TLS)")
    try:
        rows = read_rows(args.input, args.limit)
        serialized = serialize_rows(rows, BUILTIN)
        if args.target:
            scores = score_tf_serving(
                args.target, args.model_name, serialized, args.version, args.version_label, args.signature,
                args.timeout, attempt_timeout_s=args.attempt_timeout, retry_budget_s=args.retry_budget,
                max_batch_size=args.max_batch_size or None, tls=args.tls, root_certificates=args.ca_cert,
                private_key=args.client_key, certificate_chain=args.client_cert,
                ssl_target_name_override=args.tls_server_name)
        else:
            scores = score_saved_model(args.saved_model, serialized, args.signature)
    except (OSError, ValueError, KeyError, ServingError, SignatureMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    names = sorted(scores)
    print("\t".join(["row"] + names))
    for i in range(len(rows)):
        print("\t".join([str(i)] + [f"{scores[n][i]:.6f}" for n in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
