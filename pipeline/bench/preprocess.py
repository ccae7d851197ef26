"""Preprocessing speed and memory benchmark (prints figures; not a test).

    python -m pipeline.bench.preprocess --rows 1000000 [--memory-rows 1000000,4000000] [--batch-rows 50000]
        [--compression-level 1] [beam options]

1. Generates a Criteo-like Parquet file: 13 heavy-tailed dense columns (5% missing) + 26 Zipf categoricals.
2. Runs rankline's Beam + tensorflow-transform stage on it (log1p + quantile buckets + z-score on dense,
   frequency-ranked vocabularies on categoricals, hash split, gzip TFRecords out: one columnar record per
   transformed batch).
3. Runs a pyarrow/numpy-only implementation of the same transforms on the same file, in the same process.
4. Prints rows/s for both and their ratio; with ``--memory-rows`` also the peak RSS of the Beam stage at
   each size (each in a fresh subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

DENSE = [f"I{i}" for i in range(1, 14)]
CATS = [f"C{i}" for i in range(1, 27)]


def generate(path: str, rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    card = [int(c) for c in np.geomspace(10, 200_000, len(CATS))]
    writer = None
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        cols = {"label": pa.array((rng.random(n) < 0.25).astype(np.int64))}
        for name in DENSE:
            v = np.floor(rng.pareto(1.5, n) * 10).astype(np.float64)
            cols[name] = pa.array(v, mask=rng.random(n) < 0.05)
        for name, k in zip(CATS, card):
            ids = np.minimum(rng.zipf(1.3, n), k)
            cols[name] = pa.array(np.char.add(f"{name}_", ids.astype(str)))
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=50_000)
        done += n
    writer.close()


def schema_for(path: str):
    from transforms.schema import parse_schema

    doc = {
        "name": "criteo-like",
        "input": {"path": path, "format": "parquet"},
        "labels": {"click": "label"},
        "features": [{"names": DENSE, "type": "float", "transform": "numeric", "log1p": True, "buckets": 10},
                     {"names": CATS, "type": "string", "transform": "vocabulary", "top_k": 100_000,
                      "approximate": True}],
        "split": {"kind": "hash", "eval_fraction": 0.1},
    }
    return parse_schema(doc, "bench.yaml")


def run_ours(path: str, out: str, beam_args, batch_rows: int = 50_000, compression_level: int = 1) -> float:
    from pipeline.beam.preprocess import PreprocessConfig, run_preprocess
    from transforms.preprocessing import build_preprocessing_fn

    schema = schema_for(path)
    start = time.time()
    summary = run_preprocess(schema, PreprocessConfig(output_dir=out, batch_rows=batch_rows,
                                                      compression_level=compression_level),
                             build_preprocessing_fn(schema.contract), beam_args)
    elapsed = time.time() - start
    assert summary["rows_in"] == summary["rows_train"] + summary["rows_eval"] + summary["rows_rejected"]
    return elapsed


def run_reference(path: str, out: str) -> float:
    """The same transforms with pyarrow + numpy only: log1p, quantile buckets, z-score, vocabularies."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    start = time.time()
    table = pq.read_table(path)
    n = table.num_rows
    is_eval = np.random.default_rng(0).random(n) < 0.1
    train = ~is_eval
    cols = {"label": table.column("label")}
    for name in DENSE:
        arr = table.column(name).combine_chunks()
        valid = np.asarray(arr.is_valid())
        x = np.log1p(np.maximum(np.nan_to_num(arr.to_numpy(zero_copy_only=False)), 0.0))
        present = x[valid & train]
        bounds = np.unique(np.quantile(present, np.linspace(0, 1, 11)[1:-1]))
        cols[name + "_bucket"] = np.where(valid, np.searchsorted(bounds, x, side="right") + 1, 0)
        cols[name + "_z"] = np.where(valid, (x - present.mean()) / (present.std() or 1.0), 0.0).astype(np.float32)
    for name in CATS:
        arr = table.column(name).combine_chunks()
        counts = pc.value_counts(arr.filter(pa.array(train)))
        order = np.argsort(-np.asarray(counts.field("counts")), kind="stable")[:100_000]
        vocab = counts.field("values").take(pa.array(order))
        idx = pc.index_in(arr, value_set=vocab)
        cols[name + "_id"] = pc.fill_null(idx, len(vocab))
    pq.write_table(pa.table({k: v for k, v in cols.items()}), os.path.join(out, "reference.parquet"))
    return time.time() - start


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished and waited-for child processes."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_subprocess(rows: int, beam_args, batch_rows: int, compression_level: int) -> tuple:
    """(peak RSS in MiB, seconds of the Beam stage) of a fresh process running generate + our Beam stage on
    ``rows`` rows."""
    code = ("import sys, json, resource, tempfile, os;"
            "from pipeline.bench import preprocess as b;"
            "d = tempfile.mkdtemp(); p = os.path.join(d, 'x.parquet');"
            f"b.generate(p, {rows});"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"t = b.run_ours(p, os.path.join(d, 'out'), {beam_args!r}, {batch_rows}, {compression_level});"
            "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
            "print(json.dumps({'seconds': t, 'self_kib': me, 'children_kib': kids}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return max(info["self_kib"], info["children_kib"]) / 1024.0, float(info["seconds"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-rows", default="", help="comma-separated sizes for the peak RSS figures")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per batch read and transformed")
    parser.add_argument("--compression-level", type=int, default=1, help="gzip level of the transformed TFRecords")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args, beam_args = parser.parse_known_args(argv)
    beam_args = beam_args or ["--runner=DirectRunner"]
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = tempfile.mkdtemp(prefix="rankline-bench-")
    try:
        path = os.path.join(work, "criteo_like.parquet")
        t0 = time.time()
        generate(path, args.rows)
        print(f"generated {args.rows} rows in {time.time() - t0:.1f}s ({os.path.getsize(path) / 2**20:.0f} MiB)",
              flush=True)
        ref_out = os.path.join(work, "ref")
        os.makedirs(ref_out)
        cpu0 = time.process_time()
        t_ref = run_reference(path, ref_out)
        cpu1, kids1 = time.process_time(), _children_cpu()
        t_ours = run_ours(path, os.path.join(work, "ours"), beam_args, args.batch_rows, args.compression_level)
        # With --direct_running_mode=multi_processing the SDK workers are child processes: their CPU counts too.
        cpu_ref, cpu_ours = cpu1 - cpu0, time.process_time() - cpu1 + _children_cpu() - kids1
        result = {"rows": args.rows, "beam_args": beam_args, "batch_rows": args.batch_rows,
                  "compression_level": args.compression_level,
                  "reference_rows_per_s": round(args.rows / t_ref), "ours_rows_per_s": round(args.rows / t_ours),
                  "ratio": round(t_ref / t_ours, 3), "reference_s": round(t_ref, 1), "ours_s": round(t_ours, 1),
                  "cpu_ratio": round(cpu_ref / cpu_ours, 3), "reference_cpu_s": round(cpu_ref, 1),
                  "ours_cpu_s": round(cpu_ours, 1)}
        print(f"reference (pyarrow/numpy): {result['reference_rows_per_s']:>9,} rows/s ({t_ref:.1f}s)")
        print(f"rankline Beam + TFT:       {result['ours_rows_per_s']:>9,} rows/s ({t_ours:.1f}s)")
        print(f"ratio ours/reference:      {result['ratio']:.3f}  (goal >= 0.25)")
        print(f"CPU seconds (this process and its workers, all threads): reference {cpu_ref:.1f}, ours {cpu_ours:.1f}, ratio "
              f"{result['cpu_ratio']:.3f} (less sensitive than wall time to other work on the machine)")
        if args.memory_rows:
            peaks = {}
            for n in [int(x) for x in args.memory_rows.split(",") if x]:
                peaks[n], seconds = _peak_rss_subprocess(n, beam_args, args.batch_rows, args.compression_level)
                print(f"peak RSS at {n:>9,} rows: {peaks[n]:,.0f} MiB (stage {seconds:.1f}s, {n / seconds:,.0f} rows/s)",
                      flush=True)
            result["peak_rss_mib"] = peaks
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
