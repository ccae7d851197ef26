"""The whole job: data -> Beam/tensorflow-transform -> train -> evaluate -> export -> score.

    python -m pipeline.run --runner=DirectRunner                 # built-in planted-truth data
    python -m pipeline.run --data 'logs/*.parquet' --model esm2  # your own Parquet logs (built-in schema)

Every option this entry point does not define is a Beam pipeline option and reaches Beam untouched
(``--runner=FlinkRunner --flink_master=...``, ``--runner=DataflowRunner --project=... --region=...``).
An option neither this job nor Beam knows is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Dict, List, Sequence, Tuple

logger = logging.getLogger("rankline")


class UsageError(Exception):
    """A problem with the command line or its inputs: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from models import registry

    p = _Parser(prog="python -m pipeline.run", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", default=None,
                   help="glob of Parquet impression logs in the built-in schema (default: generate the built-in data)")
    p.add_argument("--rows", type=int, default=200_000, help="rows of built-in data to generate (default 200000)")
    p.add_argument("--seed", type=int, default=0, help="seed for data generation and training")
    p.add_argument("--work-dir", default="artifacts/run", help="where data, transform graph, TFRecords go")
    p.add_argument("--export-dir", default=None, help="SavedModel base directory (default WORK_DIR/export)")
    p.add_argument("--model", default="esm2", help=f"model to train: {', '.join(registry.available())}")
    p.add_argument("--preset", default="default", help="model config preset (e.g. default, paper)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="last fraction of the time range used for eval")
    p.add_argument("--score-rows", type=int, default=5, help="raw eval rows scored through the export at the end")
    p.add_argument("--uninformative-daction", action="store_true",
                   help="built-in data only: make purchase independent of DAction")
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


def resolve_input(args, work_dir: str, timings: Dict[str, float]) -> Tuple[str, Dict]:
    from pipeline import datagen

    if args.data:
        import glob as globlib

        from apache_beam.io.filesystems import FileSystems

        pattern = args.data
        if "://" in pattern:
            matched = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
        else:
            matched = globlib.glob(pattern)
        if not matched:
            raise UsageError(f"--data: no files match {pattern!r}")
        return pattern, {"source": pattern, "files": len(matched)}
    cfg = datagen.GeneratorConfig(rows=args.rows, seed=args.seed, daction_informative=not args.uninformative_daction)
    out = os.path.join(work_dir, "builtin-data", f"rows{args.rows}-seed{args.seed}-{cfg.fingerprint()}")
    with stage("generate built-in data", timings):
        manifest = datagen.ensure_builtin(cfg, out)
    logger.info("built-in data: %d rows in %s (%s)", manifest["rows"], out,
                "reused" if manifest.get("reused") else "generated")
    return os.path.join(out, "part-*.parquet"), {"source": "builtin", "dir": out, "rows": manifest["rows"],
                                                  "label_counts": manifest["label_counts"]}


def run(argv: Sequence[str] | None = None) -> Dict:
    from models import registry

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    beam_args = split_beam_args(rest)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=DirectRunner"] + beam_args
    try:
        model_config = registry.resolve_config(args.model, args.preset, {
            "batch_size": args.batch_size, "learning_rate": args.learning_rate})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.rows < 10:
        raise UsageError(f"--rows must be >= 10, got {args.rows}")

    from pipeline.train import TrainConfig
    try:
        train_cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    work_dir = os.path.abspath(args.work_dir)
    export_base = os.path.abspath(args.export_dir or os.path.join(work_dir, "export"))
    pp_dir = os.path.join(work_dir, "preprocessed")
    from pipeline.preprocess import PreprocessConfig
    try:
        PreprocessConfig(input_pattern="-", output_dir=pp_dir, eval_fraction=args.eval_fraction)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    os.makedirs(work_dir, exist_ok=True)
    timings: Dict[str, float] = {}
    started = time.time()
    input_pattern, input_info = resolve_input(args, work_dir, timings)

    import tensorflow_transform as tft

    from pipeline import evaluate as ev
    from pipeline.preprocess import TRANSFORM_DIR, run_preprocess, transformed_pattern
    from pipeline.train import train_model
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from serving.score import score_saved_model
    from transforms.features import BUILTIN
    from transforms.preprocessing import preprocessing_fn

    contract = BUILTIN
    pp_cfg = PreprocessConfig(input_pattern=input_pattern, output_dir=pp_dir, eval_fraction=args.eval_fraction)
    resolved = {"args": vars(args), "beam_args": beam_args, "model_config": model_config.to_dict(),
                "train": asdict(train_cfg), "preprocess": asdict(pp_cfg), "input": input_info}
    with open(os.path.join(work_dir, "config.json"), "w") as fh:
        json.dump(resolved, fh, indent=2, default=str)

    with stage("preprocess (Beam + tensorflow-transform)", timings):
        pp_summary = run_preprocess(contract, pp_cfg, preprocessing_fn, beam_args)
    logger.info("preprocess: %s", pp_summary)
    tft_dir = os.path.join(pp_dir, TRANSFORM_DIR)
    tft_output = tft.TFTransformOutput(tft_dir)

    with stage(f"train {args.model}", timings):
        model, history = train_model(args.model, model_config, contract, tft_output,
                                     transformed_pattern(pp_dir, "train"), transformed_pattern(pp_dir, "eval"),
                                     train_cfg)
    with stage("evaluate", timings):
        preds, labels = ev.collect(model, contract, tft_output, transformed_pattern(pp_dir, "eval"))
        report = ev.evaluate(preds, labels)
    with stage("export SavedModel", timings):
        export_path = export_saved_model(model, tft_dir, contract, export_base, args.model)
    with stage("score raw examples through the export", timings):
        rows = _sample_raw_rows(input_pattern, args.score_rows)
        scores = score_saved_model(export_path, serialize_rows(rows, contract)) if rows else {}

    summary = {"input": input_info, "preprocess": pp_summary, "eval": report, "export": export_path,
               "history": history, "timings_s": timings, "total_s": round(time.time() - started, 2),
               "scored": {k: [round(float(x), 6) for x in v] for k, v in scores.items()}}
    with open(os.path.join(work_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    _print_summary(summary, ev.format_report(report))
    return summary


def _sample_raw_rows(pattern: str, n: int) -> List[Dict]:
    """The last ``n`` rows of the last input file (eval period, raw columns as a user would send them)."""
    if n <= 0:
        return []
    import glob as globlib

    import pyarrow.parquet as pq

    files = sorted(globlib.glob(pattern))
    if not files:
        return []
    pf = pq.ParquetFile(files[-1])
    table = pf.read_row_group(pf.num_row_groups - 1)
    return table.slice(max(0, table.num_rows - n)).to_pylist()


def _print_summary(summary: Dict, report_text: str) -> None:
    out = sys.stdout
    print("\n=== rankline run summary ===", file=out)
    pp = summary["preprocess"]
    print(f"rows: train {pp.get('rows_train', '?')}  eval {pp.get('rows_eval', '?')}", file=out)
    print(report_text, file=out)
    print(f"export: {summary['export']}", file=out)
    if summary["scored"]:
        names = sorted(summary["scored"])
        print("scored raw examples through the SavedModel:", file=out)
        print("  " + "  ".join(f"{n:>9}" for n in names), file=out)
        for i in range(len(summary["scored"][names[0]])):
            print("  " + "  ".join(f"{summary['scored'][n][i]:>9.5f}" for n in names), file=out)
    print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), file=out)
    print(f"total: {summary['total_s']}s", file=out)


def main(argv: Sequence[str] | None = None) -> int:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
