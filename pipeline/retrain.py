"""Continuous training: a new log partition -> data checks -> warm-started model -> validation gate -> published,
promoted TF Serving version.

    python -m pipeline.run --data 'logs/day-01/*.parquet' --work-dir artifacts/loop            # once
    python -m pipeline.retrain --base artifacts/loop --data 'logs/day-02/*.parquet'            # every new day
        [--serving-config docker/config/models.config [--target 127.0.0.1:8500]] [--keep 3] [Beam options]
        [--refresh-vocabulary [--window N]] [--replay]

Each retrain works in ``BASE/retrain/NNN/`` and, in order:

1. **Reads and transforms** the partition with the loop's transform graph (``tft_beam.ReadTransformFn``: no
   re-analysis, so ids and buckets keep their meaning; unseen values land in the OOV buckets and their rate is
   reported). With ``--refresh-vocabulary [--window N]`` the vocabularies are analyzed anew instead, over this
   partition's training rows and the N - 1 accepted partitions before it (each re-read with the per-user state it
   started from), with the numeric statistics (quantile boundaries, means, variances) read from the loop's graph
   and applied as constants, so only ids move; the new graph (``preprocessed/transform_fn_output``) transforms the
   partition, is embedded in the candidate's export and becomes the loop's graph once the candidate is published.
   Per-user features continue from the per-user state the previous partition left
   (``pipeline.beam.user_features``), so they equal one run over the concatenated partitions. Rejected rows go to the
   dead letter as in ``pipeline.run``. The last ``eval_fraction`` of the partition's time range is held out: it
   is the gate's slice (and early stopping's).
2. **Checks the data** (``pipeline.beam.data_checks``) against the base run's training statistics, with the
   thresholds of the schema's ``validation:`` section. A blocking anomaly stops here: ``anomalies.json``, one line
   naming the feature, the figure and the threshold, exit code 3; nothing is trained and the loop's state does
   not move (the next partition continues from the last good one).
3. **Trains** the model warm-started from the last published model's weights and optimizer slots
   (``checkpoint_dir/final``), with ``pipeline.run``'s early stopping, backups and resume. After a vocabulary
   refresh the warm start is that state carried onto the new ids (``pipeline.training.vocab_refresh``: surviving
   tokens keep their rows and Adam slots, new tokens start fresh, dropped ones fall into the OOV buckets).
   ``--replay`` trains on the previous accepted partition too (its TFRecords, or it transformed again when its ids
   are not this retrain's graph's).
4. **Gates** the candidate against the served model on the held-out slice (``pipeline.evaluation.gate``): ``evaluation.json``.
   A refused candidate stays in ``retrain/NNN/candidate`` with the reasons, is never published, exit code 4.
5. **Publishes** a blessed candidate as the next version in the export base (atomic export with warmup records)
   and, with ``--serving-config``, **promotes** it (``serving.promote``: loaded, AVAILABLE, then ``stable``;
   keeps the newest ``--keep`` versions). Exit code 0.

Per-user state holds raw values (item ids, counts), never vocabulary ids, so it stays valid across a refresh.
The loop's state (champion export, warm-start checkpoint, transform graph, per-user state, partitions seen) is
``BASE/retrain/state.json``, written last, so a failed retrain leaves the previous state in force.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

if __name__ == "__main__":  # before the imports below load TensorFlow
    from serving.tf_quiet import quiet_tensorflow

    quiet_tensorflow(sys.argv[1:])
from pipeline.beam.preprocess import STATISTICS_FILE, USER_STATE_DIR  # noqa: E402

logger = logging.getLogger("rankline")

EXIT_PUBLISHED, EXIT_FAILED, EXIT_USAGE, EXIT_DATA, EXIT_REFUSED = 0, 1, 2, 3, 4
STATE_FILE = "state.json"
RAW_EVAL_DIR = "raw_eval"
REPLAY_SPLIT = "replay"       # data/replay: the previous partition transformed again with this retrain's graph
REPLAY_TRAIN_DIR = "train_replay"  # data/train_replay: links to the training files of a --replay run
REFRESH_DIR = "refresh"       # the warm-start checkpoint carried onto the refreshed vocabularies


# ---- the Beam stage: transform a partition with an existing graph ---------------------------------------------
class _WriteParquet:
    """Canonical batch -> one Parquet file in ``out_dir`` (the raw held-out rows the gate scores)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __call__(self, batch):
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq
        import tensorflow as tf

        from pipeline.beam.sources import ORDER_COL, SPLIT_COL

        keep = [n for n in batch.schema.names if n not in (ORDER_COL, SPLIT_COL)]
        tf.io.gfile.makedirs(self.out_dir)
        path = os.path.join(self.out_dir, f"part-{uuid.uuid4().hex}.parquet")
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_batches([batch]).select(keep), buf)
        with tf.io.gfile.GFile(path, "wb") as fh:
            fh.write(buf.getvalue().to_pybytes())
        return path


@dataclasses.dataclass(frozen=True)
class EarlierPartition:
    """A partition the loop accepted before: its raw files (``data``, a glob) and the per-user state before it
    (``states_before``, a glob of JSONL; None for the first partition). ``analyze``: its rows join the vocabulary
    analysis; ``replay``: it is transformed again with this retrain's graph (``data/replay``)."""

    name: str
    data: str
    states_before: Optional[str]
    analyze: bool = False
    replay: bool = False


def transform_partition(schema, base_tft_dir: str, out_dir: str, reference_stats, states_in: Optional[str],
                        beam_args: Optional[List[str]] = None, compression_level: int = 1,
                        numeric_statistics=None, earlier: Sequence[EarlierPartition] = ()) -> Dict:
    """Runs the partition through the base transform graph; writes ``out_dir/{data,rejected,raw_eval,user_state}``,
    ``statistics.pb`` and the read counts. Returns the counts (rows in, rejected, per split).

    ``numeric_statistics`` given (``transforms.preprocessing.read_numeric_statistics`` of the base graph), the
    graph is analyzed anew instead (``--refresh-vocabulary``): vocabularies over this partition's training split
    plus every row of the ``earlier`` partitions marked ``analyze``, numeric statistics fixed; it is written to
    ``out_dir/transform_fn_output`` and transforms the partition. ``earlier`` partitions marked ``replay`` are
    transformed with the graph in use into ``out_dir/data/replay`` (rows counted as ``rows_replay``)."""
    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam

    from pipeline.beam import data_checks as dc
    from pipeline.beam import preprocess as pp
    from pipeline.beam import sources
    from pipeline.beam.runner import make_pipeline

    files = sources.plan_files(schema)
    if not files:
        raise FileNotFoundError(f"no input files match {schema.input.path}")
    contract = schema.contract
    columns = sources.canonical_columns(contract)
    tac = pp.tensor_adapter_config(contract)
    tf.io.gfile.makedirs(out_dir)
    p = make_pipeline(beam_args)

    def with_user_features(rows, states_glob: Optional[str], label: str = ""):
        """Rows -> (rows with the per-user features continuing from ``states_glob``, the states after them)."""
        from pipeline.beam import user_features as U

        states = (U.read_states(p, states_glob, label=f"{label}ReadUserState") if states_glob
                  else p | f"{label}NoStates" >> beam.Create([]))
        return U.add_user_features_with_state(rows, states, contract, label=f"{label}UserFeatures")

    # A graph analyzed here is written in the preprocessing's mode; one read is applied in the mode it was made in.
    tf1 = pp.tf1_mode_for(None if numeric_statistics is not None else base_tft_dir)
    pp.quiet_expected_tf1_warnings()
    with tft_beam.Context(temp_dir=os.path.join(out_dir, "tmp"), force_tf_compat_v1=tf1):
        rows = pp.read_reporting(p, schema, files, out_dir, 10_000)
        if contract.user_features:
            from pipeline.beam import user_features as U

            rows, after = with_user_features(rows, states_in)
            U.write_states(after, os.path.join(out_dir, USER_STATE_DIR, "part"))
            rows = rows | "Materialise" >> beam.Reshuffle()
        earlier_rows = {}
        for e in earlier:  # each from its own files and the per-user state before it, all rows (no held-out slice)
            e_schema = dataclasses.replace(schema, input=dataclasses.replace(schema.input, path=e.data))
            e_files = sources.plan_files(e_schema)
            if not e_files:
                raise FileNotFoundError(f"partition {e.name}: no input files match {e.data}")
            e_rows = pp.read_files(p, e_schema, e_files, 10_000, f"Earlier[{e.name}]/Read", report=False).rows
            if contract.user_features:
                e_rows, _ = with_user_features(e_rows, e.states_before, f"Earlier[{e.name}]/")
            earlier_rows[e.name] = e_rows | f"Earlier[{e.name}]/ToTFT" >> beam.Map(pp.to_tft_batch, columns)
        _ = (rows | "Statistics" >> beam.CombineGlobally(
                dc.StatisticsFn(contract, "partition", dc.boundaries(reference_stats)))
             | "WriteStatistics" >> beam.Map(dc.write_statistics, os.path.join(out_dir, STATISTICS_FILE)))
        split = schema.split
        cutoffs = pp._time_cutoffs(rows, contract, split) if split.kind == "time" else None
        side = beam.pvalue.AsSingleton(cutoffs) if cutoffs is not None else None
        keyed = rows | "Split" >> beam.ParDo(pp._SplitBatches(contract.timestamp), cutoffs=side)
        parts = keyed | "Partition" >> beam.Partition(lambda kv, n: pp.SPLITS.index(kv[0]), len(pp.SPLITS))
        _ = (parts[pp.SPLITS.index(pp.EVAL)] | "RawEval" >> beam.Map(lambda kv: kv[1])
             | "WriteRawEval" >> beam.Map(_WriteParquet(os.path.join(out_dir, RAW_EVAL_DIR))))
        tft_in = {s: parts[i] | f"ToTFT[{s}]" >> beam.Map(lambda kv: pp.to_tft_batch(kv[1], columns))
                  for i, s in enumerate(pp.SPLITS)}
        if numeric_statistics is None:
            transform_fn = p | "ReadTransformFn" >> tft_beam.ReadTransformFn(base_tft_dir)
        else:
            from transforms.preprocessing import build_preprocessing_fn

            analysis = [tft_in[pp.TRAIN]] + [earlier_rows[e.name] for e in earlier if e.analyze]
            analysis_in = tuple(analysis) | "AnalysisRows" >> beam.Flatten()
            transform_fn = ((analysis_in, tac) | "Analyze" >> tft_beam.AnalyzeDataset(
                build_preprocessing_fn(contract, numeric_statistics)))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(os.path.join(out_dir, pp.TRANSFORM_DIR))
        outputs = dict(tft_in)
        if any(e.replay for e in earlier):
            outputs[REPLAY_SPLIT] = (tuple(earlier_rows[e.name] for e in earlier if e.replay)
                                     | "ReplayRows" >> beam.Flatten())
        for s, tft_rows in outputs.items():
            out, _ = (((tft_rows, tac), transform_fn)
                      | f"Transform[{s}]" >> tft_beam.TransformDataset(output_record_batches=True))
            _ = out | f"Write[{s}]" >> pp.WriteExampleShards(os.path.join(out_dir, pp.DATA_DIR, s),
                                                              compression_level)
    p.run().wait_until_finish()
    counts = pp._pipeline_counts(out_dir)
    if any(e.replay for e in earlier):
        from pipeline.files import read_json

        counts[f"rows_{REPLAY_SPLIT}"] = int(read_json(os.path.join(out_dir, pp.DATA_DIR, REPLAY_SPLIT,
                                                                    pp.SHARDS_FILE))["rows"])
    if not tf.io.gfile.exists(os.path.join(out_dir, STATISTICS_FILE)):
        raise FileNotFoundError(f"the pipeline wrote no {STATISTICS_FILE} in {out_dir}")
    counts["rows_in"] = counts.get("rows_in", 0)
    counts["reject_rate"] = counts.get("rows_rejected", 0) / max(1, counts["rows_in"])
    return counts


# ---- the loop state -------------------------------------------------------------------------------------------
def load_state(base: str) -> Dict:
    """The loop's state: from ``retrain/state.json`` when a retrain has run, else from the base run."""
    from pipeline.files import read_json
    from pipeline.beam.preprocess import TRANSFORM_DIR

    state = read_json(os.path.join(base, "retrain", STATE_FILE))
    if state is not None:
        return state
    config = read_json(os.path.join(base, "config.json"))
    summary = read_json(os.path.join(base, "summary.json"))
    if config is None or summary is None:
        raise FileNotFoundError(f"{base} holds no finished pipeline.run (config.json and summary.json): run "
                                f"python -m pipeline.run --work-dir {base} first")
    pp_dir = os.path.join(base, "preprocessed")
    stats = os.path.join(pp_dir, STATISTICS_FILE)
    if not os.path.exists(stats):
        raise FileNotFoundError(f"{stats} is missing: the base run predates the data checks; run pipeline.run again")
    return {
        "partitions": [{"name": "base", "data": config["input"].get("source"), "raw": _base_raw_glob(config),
                        "preprocessed": pp_dir, "tft_dir": os.path.join(pp_dir, TRANSFORM_DIR),
                        "published": summary["export"]}],
        "champion": summary["export"],
        "warm_start": os.path.join(config["train"]["checkpoint_dir"], "final", "ckpt"),
        "user_state": os.path.join(pp_dir, USER_STATE_DIR, "part-*.jsonl"),
        "reference_statistics": stats,
        "reference_reject_rate": summary["preprocess"]["rows_rejected"] / max(1, summary["preprocess"]["rows_in"]),
        "reference_oov": summary["preprocess"].get("oov_rate", {}).get("eval", {}),
        "reference_columns": config["input"].get("columns"),
        "tft_dir": os.path.join(pp_dir, TRANSFORM_DIR),
        "export_base": os.path.dirname(os.path.dirname(summary["export"])),  # BASE/<model>/<version>
        "model": config["model"], "model_config": config["model_config"],
        "schema": config["dataset"]["schema"], "eval_fraction": config["split"]["eval_fraction"],
    }


def _base_raw_glob(config: Dict) -> str:
    """The raw files of the base run: its ``--data`` glob, or the files it generated (built-in data)."""
    source = config["input"].get("source")
    return os.path.join(config["input"]["dir"], "part-*.parquet") if source == "builtin" else source


def accepted_partitions(base: str, state: Dict) -> List[Dict]:
    """The partitions the loop accepted, oldest first, each with ``name``, ``data`` (raw glob), ``preprocessed``
    (its transformed output), ``states_before`` (the per-user state it started from; None for the first) and
    ``tft_dir`` (the graph its data was transformed with). States written before these fields existed get them
    from the loop's layout (there was no vocabulary refresh then: every partition used the base graph)."""
    from pipeline.beam.preprocess import TRANSFORM_DIR
    from pipeline.files import read_json

    base_graph = os.path.join(base, "preprocessed", TRANSFORM_DIR)
    out, before = [], None
    for e in state["partitions"]:
        first = e["name"] == "base"
        pp_dir = e.get("preprocessed") or (os.path.join(base, "preprocessed") if first
                                           else os.path.join(base, "retrain", e["name"], "preprocessed"))
        data = e.get("raw") or (_base_raw_glob(read_json(os.path.join(base, "config.json"))) if first else e["data"])
        out.append({"name": e["name"], "data": data, "preprocessed": pp_dir, "states_before": before,
                    "tft_dir": e.get("tft_dir") or base_graph})
        before = os.path.join(pp_dir, USER_STATE_DIR, "part-*.jsonl")
    return out


def _link_training_files(out_dir: str, groups: Dict[str, str]) -> str:
    """``out_dir/part-<group>-<file>`` for every file of each ``{group: glob}`` (symbolic links; copies on remote
    file systems); returns the glob of them all (one training pattern over several partitions)."""
    import tensorflow as tf

    tf.io.gfile.makedirs(out_dir)
    for group, pattern in groups.items():
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise FileNotFoundError(f"replay: no transformed TFRecords match {pattern}")
        for path in files:
            target = os.path.join(out_dir, f"part-{group}-{os.path.basename(path)}")
            if "://" in out_dir:
                tf.io.gfile.copy(path, target, overwrite=True)
            else:
                if os.path.lexists(target):
                    os.remove(target)
                os.symlink(os.path.abspath(path), target)
    return os.path.join(out_dir, "part-*")


def save_state(base: str, state: Dict) -> None:
    from pipeline.files import write_json_atomically

    os.makedirs(os.path.join(base, "retrain"), exist_ok=True)
    write_json_atomically(os.path.join(base, "retrain", STATE_FILE), state, indent=2)


# ---- the command ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.retrain", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--base", required=True, help="work dir of a finished pipeline.run (the loop lives there)")
    p.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up log lines (CUDA, CPU features), hidden on machines without a GPU")
    p.add_argument("--data", required=True, help="glob of the new partition's raw files (same schema)")
    p.add_argument("--name", default=None, help="name of this retrain's directory (default NNN, counting up)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--early-stopping-patience", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auc-tolerance", type=float, default=0.005, help="gate: AUC the candidate may lose")
    p.add_argument("--logloss-tolerance", type=float, default=0.02, help="gate: relative LogLoss increase allowed")
    p.add_argument("--max-ece", type=float, default=0.05, help="gate: calibration error bound")
    p.add_argument("--min-auc", type=float, default=0.55, help="gate: absolute AUC floor")
    p.add_argument("--min-positives", type=int, default=30,
                   help="gate: tasks with fewer positives in the held-out slice are not judged")
    p.add_argument("--serving-config", default=None,
                   help="TF Serving models.config to promote the published version in (default: publish only)")
    p.add_argument("--target", default=None, help="running TF Serving's gRPC address for the two-phase promotion")
    p.add_argument("--keep", type=int, default=3, help="versions kept in the serving config (retention)")
    p.add_argument("--refresh-vocabulary", action="store_true",
                   help="re-analyze the vocabularies (numeric statistics kept) and carry the model's rows to the new "
                        "ids; the refreshed graph becomes the loop's once the candidate is published")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="with --refresh-vocabulary: analyze the last N partitions, this one included (default 1)")
    p.add_argument("--replay", action="store_true",
                   help="train on the previous accepted partition too (transformed again if its graph differs)")
    return p


def retrain(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs one retrain; returns its summary (``outcome``: published / refused_data / refused_gate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import registry
    from pipeline.beam import data_checks as dc
    from pipeline.evaluation import gate as G
    from pipeline.beam.preprocess import TRANSFORM_DIR, oov_rates, transformed_pattern
    from pipeline.run import split_beam_args
    from pipeline.training.train import TrainConfig, final_checkpoint, train_model
    from pipeline.training.vocab_refresh import remap_warm_start
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from transforms.preprocessing import read_numeric_statistics
    from transforms.schema import load_schema

    args, rest = build_parser().parse_known_args(argv)
    if args.window is not None and not args.refresh_vocabulary:
        raise ValueError("--window needs --refresh-vocabulary")
    window = 1 if args.window is None else args.window
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    beam_args = split_beam_args(rest)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=DirectRunner"] + beam_args
    base = os.path.abspath(args.base)
    state = load_state(base)
    seen = state["partitions"]
    earlier = [int(d) for d in (os.listdir(os.path.join(base, "retrain")) if os.path.isdir(os.path.join(base, "retrain"))
                                else []) if d.isdigit()]
    name = args.name or f"{max(earlier, default=0) + 1:03d}"
    work = os.path.join(base, "retrain", name)
    os.makedirs(work, exist_ok=True)
    schema = load_schema(state["schema"], input_path=args.data)
    schema = dataclasses.replace(schema, split=dataclasses.replace(schema.split, eval_fraction=state["eval_fraction"],
                                                                   test_fraction=0.0))
    contract = schema.contract
    timings: Dict[str, float] = {}
    summary: Dict = {"partition": name, "data": args.data, "work_dir": work, "timings_s": timings}

    def done(outcome: str, **extra) -> Dict:
        summary.update(outcome=outcome, **extra)
        with open(os.path.join(work, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
        return summary

    # 1. transform with the base graph, or a refreshed one (+ statistics, user state, raw held-out rows)
    t0 = time.time()
    reference = dc.read_statistics(state["reference_statistics"])
    pp_dir = os.path.join(work, "preprocessed")
    before = accepted_partitions(base, state)
    reread: Dict[str, EarlierPartition] = {}
    for e in (before[-(window - 1):] if args.refresh_vocabulary and window > 1 else []):
        reread[e["name"]] = EarlierPartition(e["name"], e["data"], e["states_before"], analyze=True)
    previous = before[-1] if args.replay and before else None
    # The previous partition's TFRecords are reused unless their ids are not this retrain's.
    retransform = previous is not None and (args.refresh_vocabulary or previous["tft_dir"] != state["tft_dir"])
    if retransform:
        e = previous
        reread[e["name"]] = dataclasses.replace(
            reread.get(e["name"], EarlierPartition(e["name"], e["data"], e["states_before"])), replay=True)
    numeric = read_numeric_statistics(state["tft_dir"], contract) if args.refresh_vocabulary else None
    counts = transform_partition(schema, state["tft_dir"], pp_dir, reference, state.get("user_state"), beam_args,
                                 numeric_statistics=numeric, earlier=list(reread.values()))
    timings["transform"] = round(time.time() - t0, 2)
    tft_dir = os.path.join(pp_dir, TRANSFORM_DIR) if args.refresh_vocabulary else state["tft_dir"]
    tft_output = tft.TFTransformOutput(tft_dir)
    oov = oov_rates(contract, tft_output, transformed_pattern(pp_dir, "train"))
    summary.update(rows={k: counts.get(k, 0) for k in ("rows_in", "rows_rejected", "rows_train", "rows_eval",
                                                       f"rows_{REPLAY_SPLIT}")}, oov_rate=oov)
    if args.refresh_vocabulary:
        summary["vocabulary_refresh"] = {"window": [e.name for e in reread.values() if e.analyze] + [name],
                                         "tft_dir": tft_dir}
    logger.info("partition %s: %d rows in, %d rejected, train %d, held out %d", name, counts["rows_in"],
                counts.get("rows_rejected", 0), counts.get("rows_train", 0), counts.get("rows_eval", 0))

    # 2. data checks
    current = dc.read_statistics(os.path.join(pp_dir, STATISTICS_FILE))
    anomalies = dc.compare(reference, current, schema.validation, contract,
                           reference_columns=state.get("reference_columns") or (),
                           current_columns=(dc.raw_columns(schema.input.files(), schema.input.format)
                                            if state.get("reference_columns") else None),
                           reference_reject_rate=state["reference_reject_rate"],
                           current_reject_rate=counts["reject_rate"],
                           reference_oov=state.get("reference_oov"), current_oov=oov)
    with open(os.path.join(work, "anomalies.json"), "w") as fh:
        fh.write(dc.dumps(anomalies, schema.validation))
    print(dc.format_anomalies(anomalies))
    summary["anomalies"] = [a.line() for a in anomalies]
    if any(a.blocking for a in anomalies):
        print(str(dc.DataCheckFailed(anomalies)))
        return done("refused_data", reason=str(dc.DataCheckFailed(anomalies)))
    # Accepted data: the next partition is checked against this one (the "previous span"), and its per-user
    # features continue from this one's, whatever the gate decides about the model.
    accepted = dict(reference_statistics=os.path.join(pp_dir, STATISTICS_FILE),
                    reference_reject_rate=counts["reject_rate"], reference_oov=oov,
                    user_state=os.path.join(pp_dir, USER_STATE_DIR, "part-*.jsonl"))
    if state.get("reference_columns"):
        accepted["reference_columns"] = dc.raw_columns(schema.input.files(), schema.input.format)

    if args.refresh_vocabulary:
        accepted.pop("reference_oov")  # the refreshed graph's OOV rates count only once it is the loop's (published)

    # 3. warm-started training on the partition (and, with --replay, the previous one)
    t0 = time.time()
    model_name = state["model"]
    model_config = registry.resolve_config(model_name, "default", {})
    model_config = type(model_config)(**state["model_config"])
    warm_start = state["warm_start"]
    if args.refresh_vocabulary:
        carried = remap_warm_start(model_name, model_config, contract, tft.TFTransformOutput(state["tft_dir"]),
                                   tft_output, warm_start, os.path.join(work, REFRESH_DIR),
                                   model_config.learning_rate, model_config.adam_epsilon, seed=args.seed)
        warm_start = carried["checkpoint"]
        summary["vocabulary_refresh"]["fields"] = carried["fields"]
        timings["refresh"] = round(time.time() - t0, 2)
    train_pattern = transformed_pattern(pp_dir, "train")
    if previous is not None:
        groups = {"new": train_pattern}
        if retransform:
            groups["previous"] = transformed_pattern(pp_dir, REPLAY_SPLIT)
        else:
            groups.update({f"previous-{s}": transformed_pattern(previous["preprocessed"], s)  # all its rows
                           for s in ("train", "eval", "test")
                           if tf.io.gfile.glob(transformed_pattern(previous["preprocessed"], s))})
        train_pattern = _link_training_files(os.path.join(pp_dir, "data", REPLAY_TRAIN_DIR), groups)
        summary["replay"] = {"previous": previous["name"], "retransformed": retransform}
    train_cfg = TrainConfig(epochs=args.epochs, seed=args.seed, early_stopping_patience=args.early_stopping_patience,
                            checkpoint_dir=os.path.join(work, "checkpoints"), warm_start=warm_start)
    train_info: Dict = {}
    model, history = train_model(model_name, model_config, contract, tft_output, train_pattern,
                                 transformed_pattern(pp_dir, "eval"), train_cfg, info=train_info)
    timings["train"] = round(time.time() - t0, 2)
    summary.update(training=train_info, history=history)

    # 4. the gate, on the raw held-out rows, candidate exported beside the work
    t0 = time.time()
    rows = []
    for path in sorted(tf.io.gfile.glob(os.path.join(pp_dir, RAW_EVAL_DIR, "*.parquet"))):
        with tf.io.gfile.GFile(path, "rb") as fh:
            rows.extend(pq.read_table(pa.BufferReader(fh.read())).to_pylist())
    warmup = serialize_rows(rows[-128:], contract)
    candidate = export_saved_model(model, tft_dir, contract, os.path.join(work, "candidate"), model_name,
                                   warmup_examples=warmup)
    cfg = G.GateConfig(args.auc_tolerance, args.logloss_tolerance, args.max_ece, args.min_auc, args.min_positives)
    verdict = G.gate(candidate, state.get("champion"), rows, contract, cfg)
    timings["gate"] = round(time.time() - t0, 2)
    with open(os.path.join(work, "evaluation.json"), "w") as fh:
        json.dump(verdict, fh, indent=2, default=float)
    print(G.format_verdict(verdict))
    state.update(accepted)
    entry = {"name": name, "data": args.data, "raw": args.data, "preprocessed": pp_dir, "tft_dir": tft_dir,
             "published": None, "blessed": verdict["blessed"]}
    if not verdict["blessed"]:
        state["partitions"] = seen + [entry]
        save_state(base, state)
        return done("refused_gate", reasons=verdict["reasons"], candidate=candidate)

    # 5. publish (atomic export as the next version) and promote
    t0 = time.time()
    published = export_saved_model(model, tft_dir, contract, state["export_base"], model_name,
                                   warmup_examples=warmup)
    promotion = None
    if args.serving_config:
        from serving.promote import Promoter

        promotion = Promoter(args.serving_config, model_name, target=args.target,
                             export_base=os.path.join(state["export_base"], model_name)).promote(int(os.path.basename(published)),
                                                                       keep=args.keep)
    timings["publish"] = round(time.time() - t0, 2)
    entry["published"] = published
    # The candidate's graph (refreshed or not) and training state are the loop's from now on.
    state.update(champion=published, warm_start=final_checkpoint(train_cfg.checkpoint_dir), tft_dir=tft_dir,
                 reference_oov=oov, partitions=seen + [entry])
    save_state(base, state)
    return done("published", published=published, promotion=promotion)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        summary = retrain(argv)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    outcome = summary["outcome"]
    print(f"retrain {summary['partition']}: {outcome}" + (f" -> {summary.get('published')}" if outcome == "published"
                                                           else ""))
    return {"published": EXIT_PUBLISHED, "refused_data": EXIT_DATA, "refused_gate": EXIT_REFUSED}[outcome]


if __name__ == "__main__":
    sys.exit(main())
