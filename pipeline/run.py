"""The whole job: data -> Beam/tensorflow-transform -> train -> evaluate -> export -> score.

    python -m pipeline.run --runner=DirectRunner                 # built-in planted-truth data
    python -m pipeline.run --schema my_logs.yaml                  # your own logs, described by a schema file

Every option this entry point does not define is a Beam pipeline option and reaches Beam untouched
(``--runner=FlinkRunner --flink_master=...``, ``--runner=DataflowRunner --project=... --region=...``).
An option neither this job nor Beam knows is an error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Dict, List, Sequence

from pipeline.datagen import add_builtin_data_args, builtin_generator_config
from pipeline.files import write_json_atomically

logger = logging.getLogger("rankline")


class UsageError(Exception):
    """A problem with the command line or its inputs: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from models import registry

    p = _Parser(prog="python -m pipeline.run", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--schema", default=None,
                   help="dataset schema YAML (default: the built-in dataset, generated on first use)")
    p.add_argument("--data", default=None, help="input glob overriding the schema's input.path")
    add_builtin_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed for data generation and training")
    p.add_argument("--work-dir", default="artifacts/run", help="where data, transform graph, TFRecords go")
    p.add_argument("--export-dir", default=None, help="SavedModel base directory (default WORK_DIR/export)")
    p.add_argument("--model", default="auto",
                   help=f"model to train: auto (the richest the labels allow), {', '.join(registry.available())}")
    p.add_argument("--preset", default="default", help="model config preset (e.g. default, paper)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--strategy", choices=("default", "mirrored", "multiworker", "parameter_server"), default="default",
                   help="tf.distribute strategy: default (one device), mirrored (all GPUs, else all logical CPUs), "
                        "multiworker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG), parameter_server "
                        "(this process is the chief of a TF_CONFIG cluster; python -m pipeline.cluster starts one)")
    p.add_argument("--ps-min-shard-bytes", type=int, default=256 << 10,
                   help="parameter_server: embedding tables of at least twice this size are split across the PS tasks")
    p.add_argument("--early-stopping-patience", type=int, default=2,
                   help="stop after this many epochs without a better main-task eval AUC (0 = never)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="best weights + mid-epoch backups (default WORK_DIR/checkpoints); a killed run started "
                        "again with the same arguments resumes from the last backup")
    p.add_argument("--backup-every-steps", type=int, default=200, help="steps between training-state backups")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from a backup in the checkpoint dir when there is one (--no-resume: start over)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard logs in WORK_DIR/tensorboard")
    p.add_argument("--deterministic", action="store_true",
                   help="ordered input pipeline and deterministic ops: the same seed gives the same model")
    p.add_argument("--steps-per-execution", type=int, default=None,
                   help="training steps per Keras call (default: 10 on one device, 1 under --strategy; per-step "
                        "callbacks see every k-th step)")
    p.add_argument("--in-memory", action="store_true",
                   help="parse the training TFRecords once into memory instead of streaming them every epoch")
    p.add_argument("--train-metrics", choices=("auc", "loss"), default="loss",
                   help="metrics computed in the training step: loss only (default, as TFRS tasks skip metrics in "
                        "training) or also each task's AUC on the training batches (slower); the evaluation "
                        "figures are the same either way")
    p.add_argument("--user-chunk-rows", type=int, default=None,
                   help="rows of whole users given per-user features at a time (default 1,000,000): peak "
                        "preprocessing memory follows it")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--eval-fraction", type=float, default=None, help="override the schema's split.eval_fraction")
    p.add_argument("--max-reject-fraction", type=float, default=None,
                   help="fail when more than this fraction of input rows is rejected (default: never)")
    p.add_argument("--compression-level", type=int, default=1, choices=range(10), metavar="0..9",
                   help="gzip level of the preprocessed TFRecords (default 1: fastest; 6 = zlib's default)")
    p.add_argument("--reuse-preprocessed", action=argparse.BooleanOptionalAction, default=True,
                   help="skip preprocessing when WORK_DIR/preprocessed holds a completed run of the same input "
                        "files (path, size, mtime), schema, options and preprocessing code, e.g. when a killed "
                        "job is started again (--no-reuse-preprocessed: always preprocess)")
    p.add_argument("--score-rows", type=int, default=5, help="raw rows scored through the export at the end")
    p.add_argument("--verbose", action="store_true",
                   help="keep TensorFlow's start-up log lines (CUDA, CPU features), hidden on machines without a GPU")
    return p


def split_beam_args(rest: Sequence[str]) -> List[str]:
    """Validates leftover args as Beam pipeline options; returns them unchanged or raises UsageError."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # noqa: SLF001  (same discovery Beam itself uses)
    _, unknown = parser.parse_known_args(list(rest))
    if unknown:
        raise UsageError(f"unrecognized option(s): {' '.join(unknown)} (neither a pipeline.run nor a Beam option)")
    return list(rest)


@contextmanager
def stage(name: str, timings: Dict[str, float]):
    logger.info("==> %s", name)
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 2)
    logger.info("<== %s done in %.1fs", name, timings[name])


def resolve_schema(args, work_dir: str, timings: Dict[str, float]):
    """The dataset schema, with built-in data generated (or reused) when no schema is given."""
    from dataclasses import replace

    from pipeline import datagen
    from transforms.schema import SchemaError, builtin_schema_path, load_schema

    info: Dict = {}
    input_path = args.data
    if args.schema is None and input_path is None:
        try:
            cfg = builtin_generator_config(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = os.path.join(work_dir, "builtin-data", f"rows{args.rows}-seed{args.seed}-{cfg.fingerprint()}")
        with stage("generate built-in data", timings):
            manifest = _ensure_builtin(datagen, cfg, out)
        logger.info("built-in data: %d rows in %s (%s)", manifest["rows"], out,
                    "reused" if manifest.get("reused") else "generated")
        input_path = os.path.join(out, "part-*.parquet")
        info = {"source": "builtin", "dir": out, "rows": manifest["rows"], "label_counts": manifest["label_counts"]}
    try:
        schema = load_schema(args.schema or builtin_schema_path("builtin"), input_path=input_path)
    except SchemaError as exc:
        raise UsageError(str(exc)) from None
    if args.eval_fraction is not None:
        if not 0.0 < args.eval_fraction < 1.0 - schema.split.test_fraction:
            raise UsageError(f"--eval-fraction must be in (0, {1.0 - schema.split.test_fraction:g}), "
                             f"got {args.eval_fraction}")
        schema = replace(schema, split=replace(schema.split, eval_fraction=args.eval_fraction))
    files = schema.input.files()
    if not files:
        where = "--data" if args.data else f"schema {os.path.basename(schema.source)} input.path"
        raise UsageError(f"{where}: no files match {schema.input.path!r}")
    info.setdefault("source", schema.input.path)
    info["files"] = len(files)
    from pipeline.beam.data_checks import raw_columns

    info["columns"] = raw_columns(files, schema.input.format)  # what pipeline.retrain's column check compares
    info["schema"] = schema.source
    return schema, info


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    """A local path made absolute; a URL (gs://, hdfs://, s3://...) as it is."""
    return path if _is_url(path) else os.path.abspath(path)


def _ensure_builtin(datagen, cfg, out: str) -> Dict:
    """``datagen.ensure_builtin`` into ``out``; for a remote ``out`` (the workers' shared storage) the data is
    generated in a local cache and its files copied to ``out`` through ``tf.io.gfile`` (those already there with
    the same size are kept)."""
    if not _is_url(out):
        return datagen.ensure_builtin(cfg, out)
    import tempfile

    import tensorflow as tf

    local = os.path.join(tempfile.gettempdir(), "rankline-builtin-data", os.path.basename(out.rstrip("/")))
    manifest = datagen.ensure_builtin(cfg, local)
    tf.io.gfile.makedirs(out)
    for name in list(manifest["files"]) + ["_MANIFEST.json"]:
        src, dst = os.path.join(local, name), os.path.join(out, name)
        if not tf.io.gfile.exists(dst) or tf.io.gfile.stat(dst).length != os.path.getsize(src):
            tf.io.gfile.copy(src, dst, overwrite=True)
    return manifest


def run(argv: Sequence[str] | None = None) -> Dict:
    from models import registry

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    beam_args = split_beam_args(rest)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=DirectRunner"] + beam_args
    if args.model != "auto" and args.model not in registry.available():
        raise UsageError(f"unknown model {args.model!r}; available: auto, {', '.join(registry.available())}")
    if args.rows < 10:
        raise UsageError(f"--rows must be >= 10, got {args.rows}")
    if args.eval_fraction is not None and not 0.0 < args.eval_fraction < 1.0:
        raise UsageError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")

    from pipeline.beam.preprocess import PreprocessConfig
    from pipeline.training.train import TrainConfig, make_strategy
    work_dir = _absolute(args.work_dir)  # gs://... stays remote: the workers read and write it
    export_dir = args.export_dir or os.path.join(work_dir, "export")
    export_base = _absolute(export_dir)
    pp_dir = os.path.join(work_dir, "preprocessed")
    try:
        train_cfg = TrainConfig(
            epochs=args.epochs, seed=args.seed, strategy=args.strategy,
            early_stopping_patience=args.early_stopping_patience,
            checkpoint_dir=_absolute(args.checkpoint_dir or os.path.join(work_dir, "checkpoints")),
            backup_every_steps=args.backup_every_steps, resume=args.resume,
            tensorboard_dir=os.path.join(work_dir, "tensorboard") if args.tensorboard else None,
            deterministic=args.deterministic, steps_per_execution=args.steps_per_execution,
            in_memory=args.in_memory, train_metrics=args.train_metrics)
        pp_cfg = PreprocessConfig(output_dir=pp_dir, max_reject_fraction=args.max_reject_fraction,
                                  compression_level=args.compression_level,
                                  **({} if args.user_chunk_rows is None else {"user_chunk_rows": args.user_chunk_rows}))
        registry.resolve_config("esm2" if args.model == "auto" else args.model, args.preset, {})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Before any other TensorFlow work: MultiWorkerMirroredStrategy must configure collectives at startup.
    try:
        strategy = make_strategy(train_cfg.strategy, ps_min_shard_bytes=args.ps_min_shard_bytes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    import tensorflow as tf

    tf.io.gfile.makedirs(work_dir)
    timings: Dict[str, float] = {}
    started = time.time()
    schema, input_info = resolve_schema(args, work_dir, timings)
    contract = schema.contract
    model_name = registry.auto_model(contract.labels.transformed) if args.model == "auto" else args.model
    have = contract.labels.transformed + contract.pseudo_labels
    have += ("uf_count_raw",) if contract.user_features else ()  # STAN's event positions (UF_COUNT_RAW)
    missing = [k for k in registry.required_labels(model_name) if k not in have]
    if missing:
        hint = " (pseudo-labels come from user_features in the schema)" if any(m.startswith("pl_") for m in missing) else ""
        raise UsageError(f"model {model_name!r} needs label(s) {', '.join(missing)}, which dataset "
                         f"{contract.name!r} does not have (it has: {', '.join(have)}){hint}")
    try:
        model_config = registry.resolve_config(model_name, args.preset, {
            "batch_size": args.batch_size, "learning_rate": args.learning_rate})
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    import numpy as np
    import tensorflow_transform as tft

    from pipeline.evaluation import evaluate as ev
    from pipeline.beam.preprocess import TRANSFORM_DIR, preprocess_or_reuse, transformed_pattern
    from pipeline.training.train import train_model
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from serving.score import score_saved_model

    resolved = {"args": vars(args), "beam_args": beam_args, "model": model_name,
                "model_config": model_config.to_dict(), "train": asdict(train_cfg), "preprocess": asdict(pp_cfg),
                "split": asdict(schema.split), "input": input_info,
                "dataset": {"name": contract.name, "schema": schema.source, "labels": list(contract.labels.transformed),
                            "features": list(contract.model_feature_names())},
                "strategy": {"name": train_cfg.strategy, "class": type(strategy).__name__,
                             "replicas": strategy.num_replicas_in_sync}}
    config_path = os.path.join(work_dir, "config.json")
    write_json_atomically(config_path, resolved, indent=2, default=str)

    with stage("preprocess (Beam + tensorflow-transform)", timings):
        pp_summary = preprocess_or_reuse(schema, pp_cfg, beam_args, reuse=args.reuse_preprocessed)
    tft_dir = os.path.join(pp_dir, TRANSFORM_DIR)
    tft_output = tft.TFTransformOutput(tft_dir)

    with stage(f"train {model_name}", timings):
        train_info: Dict = {}
        model, history = train_model(model_name, model_config, contract, tft_output,
                                     transformed_pattern(pp_dir, "train"), transformed_pattern(pp_dir, "eval"),
                                     train_cfg, strategy=strategy,
                                     info=train_info)
    resolved["training"] = train_info  # steps per epoch, where a resumed run started, early stop
    write_json_atomically(config_path, resolved, indent=2, default=str)
    with stage("evaluate", timings):
        preds, labels = ev.collect(model, contract, tft_output, transformed_pattern(pp_dir, "eval"))
        report = ev.evaluate(preds, labels)
    with stage("export SavedModel", timings):
        # Real rows double as TF Serving warmup requests (assets.extra) and as the final scoring smoke test.
        rows = sample_canonical_rows(schema, max(args.score_rows, 128))
        export_path = export_saved_model(model, tft_dir, contract, export_base, model_name,
                                         warmup_examples=serialize_rows(rows, contract) if rows else None)
    with stage("score raw examples through the export", timings):
        rows = rows[-args.score_rows:] if args.score_rows > 0 else []
        scores = score_saved_model(export_path, serialize_rows(rows, contract)) if rows else {}

    with stage("report", timings):
        from pipeline.evaluation.report import write_run_report

        report_path = write_run_report(model_name, contract.name, report, history, work_dir, header=[
            f"- eval rows: {pp_summary['rows_eval']}; train rows: {pp_summary['rows_train']}; "
            f"rejected: {pp_summary['rows_rejected']} of {pp_summary['rows_in']}",
            f"- export: `{export_path}`"])
    summary = {"model": model_name, "input": input_info, "preprocess": pp_summary, "eval": report,
               "report": report_path,
               "export": export_path, "history": history, "training": train_info, "timings_s": timings,
               "total_s": round(time.time() - started, 2),
               "scored": {k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in scores.items()}}
    write_json_atomically(os.path.join(work_dir, "summary.json"), summary, indent=2)
    _print_summary(summary, ev.format_report(report))
    return summary


def sample_canonical_rows(schema, n: int) -> List[Dict]:
    """The last ``n`` valid rows of the last input file, as canonical raw values (what a client sends)."""
    if n <= 0:
        return []
    from pipeline.beam.sources import ORDER_COL, SPLIT_COL, ReadFile

    reader = ReadFile(schema)
    reader.setup()
    files = schema.input.files()
    rows: List[Dict] = []
    for path in reversed(files):
        batches = [b for b in reader.process(path) if not hasattr(b, "tag")]
        for b in batches:
            rows.extend(b.to_pylist())
        if rows:
            break
    rows = rows[-n:]
    for r in rows:
        r.pop(SPLIT_COL, None)
        r.pop(ORDER_COL, None)
    return rows


def _print_summary(summary: Dict, report_text: str) -> None:
    out = sys.stdout
    print("\n=== rankline run summary ===", file=out)
    pp = summary["preprocess"]
    print(f"model: {summary['model']}   rows in {pp['rows_in']}: train {pp['rows_train']}  eval {pp['rows_eval']}  "
          f"test {pp['rows_test']}  rejected {pp['rows_rejected']}"
          + ("   (preprocessing reused from an earlier run; --no-reuse-preprocessed redoes it)" if pp.get("reused")
             else ""), file=out)
    print(report_text, file=out)
    print(f"export: {summary['export']}", file=out)
    if summary["scored"]:  # one column per [B] output (wider ones, e.g. a scenario distribution, are in summary.json)
        names = sorted(n for n, v in summary["scored"].items() if not v or not isinstance(v[0], list))
        print("scored raw examples through the SavedModel:", file=out)
        print("  " + "  ".join(f"{n:>9}" for n in names), file=out)
        for i in range(len(summary["scored"][names[0]])):
            print("  " + "  ".join(f"{summary['scored'][n][i]:>9.5f}" for n in names), file=out)
    print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), file=out)
    print(f"total: {summary['total_s']}s", file=out)
    if summary.get("report"):
        print(f"report: {summary['report']}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    from serving.tf_quiet import quiet_tensorflow

    quiet_tensorflow(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001
        from pipeline.beam.preprocess import TooManyRejected
        from pipeline.training.train import ModelDataMismatch

        if isinstance(exc, (TooManyRejected, ModelDataMismatch)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
