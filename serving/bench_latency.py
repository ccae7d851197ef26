"""Scoring latency of ESM² at paper size: one user against N candidates, p50 / p99 in milliseconds.

    python -m serving.bench_latency                          # in-process: naive export vs rankline's graph
    python -m serving.bench_latency --target 127.0.0.1:8500 --input rows.parquet   # + TF Serving over gRPC
    python -m serving.bench_latency --target 127.0.0.1:8500 --input rows.parquet \
        --export-dir artifacts/run/export/esm2/1      # + the served version in-process: what gRPC adds

Model: ESM² with the paper's towers 512-256-128-32 (``--preset paper``, with embedding 16 unless
``--embedding-dim`` says otherwise: the figures in the docs were measured at 16) on the built-in features, random
weights (latency does not depend on their values), cardinalities from the contract (top_k + OOV buckets;
``--tft-dir`` reads the real vocabulary sizes instead).

In-process columns, same transformed inputs and outputs, each a SavedModel loaded with
``tf.saved_model.load`` and called through its ``serving_default`` signature:

* ``naive``: ``tf.saved_model.save(keras_model)``, the plain Keras export;
* ``rankline``: the graph ``serving.export`` serves for ESM² (``serving.scoring_graph``), checked equal to
  the Keras model before timing.

``--engine`` picks how each SavedModel is run: ``function`` (the above: ``tf.saved_model.load`` and an eager
signature call, ~1 ms of Python per call whatever the graph), ``session`` (columns ``*/sess``: the v1 loader
restores the SavedModel into a Session and each call is one ``Session::Run`` of the signature's tensors,
which is how TF Serving executes a request), or ``both`` (default; the ratios are given per engine).

Calls of the variants are interleaved (rotating order), so background load hits them alike; they share one
process and so the same inter-/intra-op thread pools. Besides wall-clock p50/p99 the table gives each
variant's median CPU time per call (all threads of the process, ``time.process_time``): on a loaded machine
wall-clock percentiles mostly measure the scheduler, CPU time still measures the work.
``--preproject-mb`` adds a column for the graph with pre-projected embeddings under that cap (off in
exports by default: slower on CPU, where gathering [N, 4 * H1] rows costs more memory traffic than the
small matmul it replaces). ``--target`` adds the column ``grpc`` (TF Serving, or whatever answers its
API there): raw rows from ``--input`` (Parquet) sent as tf.Examples to ``--model-name`` over gRPC,
client and protocol included; it is skipped, saying why, when nothing answers at the target. With
``--export-dir`` (the version the server serves) the same examples also go through that SavedModel
in-process (column ``export/sess``, Session::Run as TF Serving runs it, calls interleaved with the gRPC ones)
and a second table gives what the gRPC hop adds.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

SIZES = (1, 50, 200, 1000)
ENGINES = ("function", "session", "both")
ENGINE_TEXT = {"function": "SavedModel signature calls",
               "session": "*/sess: Session::Run of the signature's tensors, as TF Serving runs it",
               "both": "SavedModel signature calls; */sess: Session::Run of the signature's tensors, as TF "
                       "Serving runs it"}
SEQ_LEN = 20  # history length of the built-in contract's uf_history


def _percentiles(samples_s: Sequence[float]) -> tuple:
    ms = np.asarray(samples_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def build_model(preset: str, tft_dir: str | None, seed: int = 0, embedding_dim: int | None = 16):
    """(ESM² model, contract): paper-size towers on the built-in features (sequences included), built."""
    from models import registry
    from models.keras import keras
    from serving.scoring_graph import probe_features
    from transforms import features as F
    from transforms.features import BUILTIN

    categorical = dict(BUILTIN.model_categorical)
    if tft_dir:
        import tensorflow_transform as tft

        out = tft.TFTransformOutput(tft_dir)
        for f in BUILTIN.vocab_features:
            categorical[F.categorical_id(f.name)] = int(out.vocabulary_size_by_name(f.vocab_name)) + f.num_oov_buckets
    else:
        for f in BUILTIN.vocab_features:
            categorical[F.categorical_id(f.name)] = (f.top_k or 64) + f.num_oov_buckets
    sequences = {}
    for f in getattr(BUILTIN, "sequences", ()):
        size = int(out.vocabulary_size_by_name(f.vocab_name)) if tft_dir else (f.top_k or 1000)
        sequences[F.sequence_ids(f.name)] = size + f.num_oov_buckets
    keras.utils.set_random_seed(seed)
    extra = {"sequences": sequences} if sequences else {}
    config = registry.resolve_config("esm2", preset)
    if embedding_dim:
        import dataclasses

        config = dataclasses.replace(config, embedding_dim=embedding_dim)
    model = registry.build("esm2", categorical, BUILTIN.model_dense, config, **extra)
    model(probe_features(model, batch=4, seq_len=SEQ_LEN), training=False)  # fixes the naive export's specs
    return model, BUILTIN


def request_features(model, n: int, request_fields: Sequence[str], seed: int,
                     seq_len: int = SEQ_LEN) -> Dict[str, np.ndarray]:
    """Transformed inputs of one request: request-level fields equal in all n rows, candidate fields vary.
    Categorical and dense [n, 1], sequences [n, seq_len] (0 = padding)."""
    rng = np.random.default_rng(seed)
    emb = model.embedding
    out = {}
    for name, card in emb.categorical.items():
        rows = 1 if name in request_fields else n
        out[name] = np.broadcast_to(rng.integers(0, card, size=(rows, 1)), (n, 1)).astype(np.int64)
    for name, card in getattr(emb, "sequences", {}).items():
        rows = 1 if name in request_fields else n
        ids = rng.integers(1, card + 1, size=(rows, seq_len)) * (rng.random((rows, seq_len)) < 0.8)
        out[name] = np.broadcast_to(ids, (n, seq_len)).astype(np.int64)
    for name in emb.dense:
        out[name] = rng.normal(size=(n, 1)).astype(np.float32)
    return out


class _GraphExport:
    """A tf.Module serving ``ESM2ScoringGraph`` on the transformed inputs, for the in-process comparison."""

    def __new__(cls, graph, specs):
        import tensorflow as tf

        module = tf.Module()
        module.graph = graph
        module.serve = tf.function(lambda feats: {k: tf.reshape(v, [-1]) for k, v in graph(feats).items()},
                                   input_signature=[specs])
        return module


def export_variants(model, contract, out_dir: str, preproject_mb: float | None = None,
                    dirs: Dict[str, str] | None = None) -> Dict[str, Callable]:
    """{'naive': fn, 'rankline': fn[, 'preproj': fn]}: loaded ``serving_default`` signatures taking the
    transformed inputs (``preproj``: the graph with pre-projected embeddings within ``preproject_mb``).
    ``dirs``: filled with {variant: SavedModel directory} when given."""
    import tensorflow as tf

    from serving.export import request_level_fields
    from serving.scoring_graph import ESM2ScoringGraph, probe_features, verify

    naive_dir = os.path.join(out_dir, "naive")
    tf.saved_model.save(model, naive_dir)
    fns = {"naive": tf.saved_model.load(naive_dir).signatures["serving_default"]}
    paths = {"naive": naive_dir}
    emb = model.embedding
    specs = {n: tf.TensorSpec([None, 1], tf.int64, name=n) for n in emb.categorical}
    specs.update({n: tf.TensorSpec([None, None], tf.int64, name=n) for n in getattr(emb, "sequences", {})})
    specs.update({n: tf.TensorSpec([None, 1], tf.float32, name=n) for n in emb.dense})
    caps = {"rankline": 0}
    if preproject_mb is not None:
        caps["preproj"] = int(preproject_mb * 2 ** 20)
    for name, cap in caps.items():
        graph = ESM2ScoringGraph(model, request_level_fields(contract), preproject_max_bytes=cap)
        verify(graph, model, probe_features(model))
        module = _GraphExport(graph, specs)
        path = os.path.join(out_dir, name)
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve.get_concrete_function()})
        fns[name] = tf.saved_model.load(path).signatures["serving_default"]
        paths[name] = path
    if dirs is not None:
        dirs.update(paths)
    return fns


def bench_in_process(fns: Dict[str, Callable], model, contract, sizes: Sequence[int], reps: int,
                     warmup: int = 20, cpu: Dict[str, Dict[int, float]] | None = None) -> Dict[str, Dict[int, tuple]]:
    """{variant: {n: (p50 ms, p99 ms)}}; each rep calls every variant once, in rotating order. Variants are
    signature functions (fed eager tensors) or ``SessionRunner``s (fed numpy); all must return the first
    variant's outputs before anything is timed. ``cpu``: filled with {variant: {n: median CPU ms per call}} when given."""
    import tensorflow as tf

    from serving.export import request_level_fields

    fields = request_level_fields(contract)
    results: Dict[str, Dict[int, tuple]] = {name: {} for name in fns}
    for n in sizes:
        raw = {k: np.ascontiguousarray(v) for k, v in request_features(model, n, fields, seed=n).items()}
        eager = {k: tf.constant(v) for k, v in raw.items()}
        # Session runners are fed numpy (as TF Serving feeds tensors decoded from the request); signatures
        # eager tensors.
        args = {name: raw if isinstance(fn, SessionRunner) else eager for name, fn in fns.items()}
        outs = {name: {k: np.asarray(v) for k, v in fn(**args[name]).items()} for name, fn in fns.items()}
        ref = next(iter(outs.values()))  # every variant must give the first one's outputs
        for name, out in outs.items():
            for task in ref:
                np.testing.assert_allclose(np.ravel(out[task]), np.ravel(ref[task]), rtol=1e-4, atol=1e-5)
        for _ in range(warmup):
            for name, fn in fns.items():
                fn(**args[name])
        samples: Dict[str, List[float]] = {name: [] for name in fns}
        cpu_s: Dict[str, List[float]] = {name: [] for name in fns}
        names = list(fns)
        count = reps if n < 1000 else max(50, reps // 3)
        for i in range(count):
            for name in names[i % len(names):] + names[:i % len(names)]:
                cpu_start, start = time.process_time(), time.perf_counter()
                out = fns[name](**args[name])
                for v in out.values():
                    np.asarray(v)  # eager tensors: wait for the value; session outputs are numpy already
                samples[name].append(time.perf_counter() - start)
                cpu_s[name].append(time.process_time() - cpu_start)
        for name in fns:
            results[name][n] = _percentiles(samples[name])
            if cpu is not None:
                cpu.setdefault(name, {})[n] = float(np.median(cpu_s[name]) * 1e3)
    return results


class SessionRunner:
    """A SavedModel signature run the way TF Serving runs it: the v1 loader restores the graph into a
    ``tf.compat.v1.Session`` and each call is one ``Session::Run`` feeding the signature's input tensors and
    fetching its output tensors (``make_callable``: no per-call graph building, little Python).

    TF Serving's servable is exactly this (a SavedModelBundle's session, run on the signature's tensor names),
    so this path measures what TF Serving executes per request, minus its gRPC and proto handling; the
    eager ``signatures[...]`` call adds ~1 ms of Python per call on top, the same for every export.
    ``__call__(**features)`` -> {output: numpy array}.
    """

    def __init__(self, export_dir: str, signature: str = "serving_default", config=None):
        import tensorflow as tf

        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        with self._graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self._session, ["serve"], export_dir)
        sig = meta.signature_def[signature]
        self.inputs = sorted(sig.inputs)
        self.outputs = sorted(sig.outputs)
        self._feeds = [self._graph.get_tensor_by_name(sig.inputs[k].name) for k in self.inputs]
        self._fetches = [self._graph.get_tensor_by_name(sig.outputs[k].name) for k in self.outputs]
        self._run = self._session.make_callable(self._fetches, feed_list=self._feeds)

    def _args(self, features) -> list:
        missing = sorted(set(self.inputs) - set(features))
        if missing:
            raise KeyError(f"signature inputs missing from the request: {missing}")
        return [np.asarray(features[k]) for k in self.inputs]

    def __call__(self, **features):
        return dict(zip(self.outputs, self._run(*self._args(features))))

    def placements(self, **features) -> List[tuple]:
        """[(device, op type)] of every node one traced run executed (functions' bodies included)."""
        import tensorflow as tf

        meta = tf.compat.v1.RunMetadata()
        self._session.run(self._fetches, feed_dict=dict(zip(self._feeds, self._args(features))),
                          options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                          run_metadata=meta)
        out = []
        for dev in meta.step_stats.dev_stats:
            for node in dev.node_stats:
                label = node.timeline_label  # "name = Op(inputs)"
                op = label.split(" = ", 1)[1].split("(", 1)[0] if " = " in label else node.node_name
                out.append((dev.device, op))
        return out

    def close(self):
        self._session.close()


def session_variants(export_dirs: Dict[str, str]) -> Dict[str, SessionRunner]:
    """{variant + '/sess': SessionRunner} for the exports ``export_variants`` wrote."""
    return {f"{name}/sess": SessionRunner(path) for name, path in export_dirs.items()}


def bench_grpc(target: str, model_name: str, input_path: str, sizes: Sequence[int], reps: int,
               timeout_s: float, export_dir: str | None = None,
               local: Dict[int, tuple] | None = None) -> Dict[int, tuple] | str:
    """{n: (p50, p99)} through TF Serving, or a string saying why it was skipped.

    ``export_dir``: the SavedModel version the server serves. Its ``serving_default`` is then also run
    in-process, the way TF Serving runs it (``SessionRunner``: one Session::Run), on the same serialized
    examples, each gRPC call followed by an in-process one (so load hits both alike); ``local`` is filled
    with {n: (p50, p99)} of those, and the difference is what the gRPC hop adds (client, protocol, server).
    Raises ValueError when the two give different scores (``export_dir`` is not what the server serves)."""
    from serving.client import ServingError, TFServingClient
    from serving.examples import serialize_rows
    from serving.score import read_rows
    from transforms.features import BUILTIN

    if not input_path:
        return "skipped: --target needs --input (a Parquet file of raw rows to send)"
    client = TFServingClient(target, model_name, timeout_s=timeout_s, max_attempts=1)
    runner = None
    try:
        try:
            client.wait_until_available(timeout_s=3.0)
        except (ServingError, TimeoutError) as exc:
            return f"skipped: no TF Serving answering at {target} ({exc})"
        try:
            rows = read_rows(input_path, 0)
        except (OSError, ValueError) as exc:
            return f"skipped: cannot read --input {input_path} ({type(exc).__name__}: {exc})"
        if not rows:
            return f"skipped: no rows in {input_path}"
        runner = SessionRunner(export_dir) if export_dir else None
        results = {}
        for n in sizes:
            batch = [rows[i % len(rows)] for i in range(n)]
            user = {k: batch[0][k] for k in batch[0] if not k.startswith("item")}
            examples = serialize_rows([{**r, **user} for r in batch], BUILTIN)
            feed = np.array(examples, dtype=object)
            for i in range(10):  # warmup; the first call's scores are compared
                remote = client.score_examples(examples)
                if runner is None:
                    continue
                here = runner(examples=feed)
                if i > 0:
                    continue
                differ = [t for t, want in here.items()
                          if t in remote and not np.allclose(remote[t], np.ravel(want), rtol=1e-5, atol=1e-6)]
                if differ:
                    raise ValueError(f"--export-dir {export_dir} scores {differ[0]!r} differently from the model "
                                     f"served at {target}: is it the version the server serves?")
            samples, here_s = [], []
            for _ in range(reps if n < 1000 else max(50, reps // 3)):
                start = time.perf_counter()
                client.score_examples(examples)
                samples.append(time.perf_counter() - start)
                if runner is not None:
                    start = time.perf_counter()
                    runner(examples=feed)
                    here_s.append(time.perf_counter() - start)
            results[n] = _percentiles(samples)
            if runner is not None and local is not None:
                local[n] = _percentiles(here_s)
        return results
    finally:
        if runner is not None:
            runner.close()
        client.close()


def format_grpc_overhead(remote: Dict[int, tuple], local: Dict[int, tuple], sizes: Sequence[int]) -> str:
    """One line per size: what the gRPC hop adds over the in-process Session::Run of the same export."""
    lines = [f"{'candidates':>10} {'gRPC adds p50':>14} {'gRPC adds p99':>14}"]
    for n in sizes:
        if n in remote and n in local:
            lines.append(f"{n:>10} {remote[n][0] - local[n][0]:>14.3f} {remote[n][1] - local[n][1]:>14.3f}")
    return "\n".join(lines)


def _pairs(names: Sequence[str]) -> List[tuple]:
    """(label, naive variant, rankline variant) for every engine where both were measured."""
    out = []
    for suffix, label in (("", ""), ("/sess", "sess ")):
        if f"naive{suffix}" in names and f"rankline{suffix}" in names:
            out.append((label, f"naive{suffix}", f"rankline{suffix}"))
    return out


def format_table(results: Dict[str, Dict[int, tuple]], sizes: Sequence[int],
                 cpu: Dict[str, Dict[int, float]] | None = None) -> str:
    """p50 / p99 per variant; for each engine (signature call, ``/sess`` Session run) with both naive and
    rankline their ratios (rankline / naive); with ``cpu`` the median CPU ms per call of each in-process
    variant and rankline's CPU ratio per engine."""
    names = list(results)
    cpu = cpu or {}
    pairs = _pairs(names)
    cpu_pairs = _pairs(list(cpu))
    head = f"{'candidates':>10} " + " ".join(f"{n + ' p50':>14} {n + ' p99':>14}" for n in names)
    head += "".join(f" {label + 'p50 ratio':>15} {label + 'p99 ratio':>15}" for label, _, _ in pairs)
    head += "".join(f" {n + ' cpu':>13}" for n in cpu)
    head += "".join(f" {label + 'cpu ratio':>15}" for label, _, _ in cpu_pairs)
    lines = [head]
    nan = (float("nan"), float("nan"))
    for n in sizes:
        cells = []
        for name in names:
            p50, p99 = results[name].get(n, nan)
            cells.append(f"{p50:>14.3f} {p99:>14.3f}")
        line = f"{n:>10} " + " ".join(cells)
        for _, naive, ours in pairs:
            a, b = results[ours].get(n, nan), results[naive].get(n, nan)
            line += f" {a[0] / b[0]:>15.2f} {a[1] / b[1]:>15.2f}"
        line += "".join(f" {cpu[name].get(n, float('nan')):>13.3f}" for name in cpu)
        for _, naive, ours in cpu_pairs:
            line += f" {cpu[ours].get(n, float('nan')) / cpu[naive].get(n, float('nan')):>15.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.bench_latency", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", help="ESM² preset (paper = towers 512-256-128-32)")
    p.add_argument("--embedding-dim", type=int, default=16,
                   help="embedding size over the preset's (default 16, as measured in the docs; 0 = the preset's)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="candidates per request")
    p.add_argument("--reps", type=int, default=300, help="timed calls per size and variant (1000: a third)")
    p.add_argument("--preproject-mb", type=float, default=None,
                   help="add the graph with pre-projected embeddings within this many MiB (column preproj)")
    p.add_argument("--tft-dir", default=None, help="transform output for real vocabulary sizes (optional)")
    p.add_argument("--target", default=None, help="TF Serving gRPC host:port to add (optional)")
    p.add_argument("--model-name", default="esm2", help="--target: served model name")
    p.add_argument("--input", default=None, help="--target: Parquet file of raw rows to send")
    p.add_argument("--timeout", type=float, default=10.0, help="--target: per-call deadline in seconds")
    p.add_argument("--export-dir", default=None,
                   help="--target: the SavedModel version the server serves; also run in-process (Session::Run) "
                        "on the same examples, giving what gRPC adds (column export/sess)")
    p.add_argument("--engine", choices=ENGINES, default="both",
                   help="in-process engine: 'function' (tf.saved_model.load + signature call), 'session' "
                        "(v1 loader + Session::Run, as TF Serving runs a SavedModel; columns */sess) or both")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.reps < 10:
        print("error: --sizes must be >= 1 and --reps >= 10", file=sys.stderr)
        return 2
    import tensorflow as tf

    model, contract = build_model(args.preset, args.tft_dir, embedding_dim=args.embedding_dim or None)
    units = "-".join(str(u) for u in model.config.hidden_units)
    with tempfile.TemporaryDirectory(prefix="rankline-bench-") as tmp:
        dirs: Dict[str, str] = {}
        fns = export_variants(model, contract, tmp, args.preproject_mb, dirs=dirs)
        sessions = session_variants(dirs) if args.engine != "function" else {}
        if args.engine == "session":
            fns = {}
        cpu: Dict[str, Dict[int, float]] = {}
        try:
            results = bench_in_process({**fns, **sessions}, model, contract, args.sizes, args.reps, cpu=cpu)
        finally:
            for runner in sessions.values():
                runner.close()
    print(f"ESM² towers {units}, {len(model.embedding.categorical)} categorical + "
          f"{len(getattr(model.embedding, 'sequences', {}))} sequence + {len(model.embedding.dense)} dense inputs; TensorFlow {tf.__version__}, {os.cpu_count()} CPU(s); latency in ms, one user x N "
          f"candidates, in-process ({ENGINE_TEXT[args.engine]})")
    if args.target:
        local: Dict[int, tuple] = {}
        grpc_results = bench_grpc(args.target, args.model_name, args.input, args.sizes, args.reps, args.timeout,
                                  export_dir=args.export_dir, local=local)
        if isinstance(grpc_results, str):
            print(f"gRPC ({args.target}): {grpc_results}")
        else:
            results["grpc"] = grpc_results
            if local:
                results["export/sess"] = local
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy = " -- loaded machine: wall-clock percentiles are noisy, see the cpu columns" if load > os.cpu_count() else ""
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPU(s){busy}")
    print(format_table(results, args.sizes, cpu))
    if "export/sess" in results:
        print(f"raw tf.Examples into {args.export_dir}: through {args.target} (grpc) vs in-process "
              "(export/sess), calls interleaved")
        print(format_grpc_overhead(results["grpc"], results["export/sess"], args.sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
