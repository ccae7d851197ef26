"""Compare models on the same preprocessed data over several seeds (prints a table; not a test).

    python -m pipeline.benchmark --models esm2,esmm --seeds 3                 # built-in data, 200k rows
    python -m pipeline.benchmark --models esm2,esmm --uninformative-daction  # the control experiment
    python -m pipeline.benchmark --schema transforms/schemas/ali-ccp-sample.yaml --models esmm,dnn
    python -m pipeline.benchmark --models gprec,gprec:ensemble,gprec_dcn,dnn --rows 100000   # name[:preset]

The data is preprocessed once; every (model, seed) trains on the same TFRecords and is evaluated on the
same eval split. Output, in the work directory: ``report.md`` (AUC, GAUC, LogLoss, calibration, NDCG,
top-10% F1 and worst-segment AUC as mean ± std over seeds, the oracle beside them on planted-truth data,
RelaImpr against ``--baseline``), ``report.json`` and PNG plots (ROC and reliability per task, AUC per
segment, training curves). The AUC table is also printed. Models that report figures about themselves
(``diagnostics()``, e.g. GPRec's mean cos(p_i, n_i)) get a table of those too.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("rankline.benchmark")


def parse_spec(spec: str, default_preset: str = "default") -> Tuple[str, str]:
    """``name[:preset]`` -> (registry name, preset); without ``:preset`` the run's ``--preset``."""
    name, _, preset = spec.partition(":")
    return name, preset or default_preset


def resolve_spec(spec: str, preset: str = "default", batch_size=None, learning_rate=None):
    """(registry name, resolved config) of ``name[:preset]`` with the run's ``--batch-size`` / ``--learning-rate``
    overrides (None: the preset's); ValueError names an unknown preset or a bad value."""
    from models import registry

    name, model_preset = parse_spec(spec, preset)
    return name, registry.resolve_config(name, model_preset,
                                         {"batch_size": batch_size, "learning_rate": learning_rate})


def run_benchmark(models: List[str], seeds: List[int], schema, work_dir: str, epochs: int, preset: str = "default",
                  batch_size=None, beam_args=None, preprocess: bool = True, baseline: Optional[str] = None,
                  plots: bool = True, deterministic: bool = False, learning_rate: Optional[float] = None) -> Dict:
    """Trains every (model, seed) on the same preprocessed data; writes the report; returns its aggregate.
    ``batch_size`` and ``learning_rate`` (when given) override every model's preset; each model's resolved
    config goes into the report."""
    import tensorflow_transform as tft

    from pipeline.evaluation import evaluate as ev
    from pipeline.beam.preprocess import TRANSFORM_DIR, PreprocessConfig, preprocess_or_reuse, transformed_pattern
    from pipeline.evaluation.report import DIAGNOSTICS, write_report
    from pipeline.training.train import TrainConfig, train_model

    pp_dir = os.path.join(work_dir, "preprocessed")
    pp_cfg = PreprocessConfig(output_dir=pp_dir)
    preprocess_or_reuse(schema, pp_cfg, beam_args or ["--runner=DirectRunner"], reuse=not preprocess)
    tft_output = tft.TFTransformOutput(os.path.join(pp_dir, TRANSFORM_DIR))
    runs: Dict[str, List[Dict]] = {}
    histories: Dict[str, List[Dict]] = {}
    eval_rows = 0
    total = len(models) * len(seeds)
    configs: Dict[str, Dict] = {}
    for spec in models:
        model_name, cfg = resolve_spec(spec, preset, batch_size, learning_rate)
        configs[spec] = cfg.to_dict()
        for seed in seeds:
            started = time.time()
            logger.info("[%d/%d] training %s, seed %d", len(sum(runs.values(), [])) + 1, total, spec, seed)
            model, history = train_model(model_name, cfg, schema.contract, tft_output,
                                         transformed_pattern(pp_dir, "train"), transformed_pattern(pp_dir, "eval"),
                                         TrainConfig(epochs=epochs, seed=seed, deterministic=deterministic))
            report = ev.evaluate_model(model, schema.contract, tft_output, transformed_pattern(pp_dir, "eval"))
            eval_rows = max([eval_rows] + [r["n"] for r in report.values()])
            diagnostics = model.diagnostics()
            if diagnostics:
                report[DIAGNOSTICS] = diagnostics
            runs.setdefault(spec, []).append(report)
            histories.setdefault(spec, []).append(history)
            logger.info("%s seed %d: %s (%.0fs)", spec, seed,
                        {t: round(r["auc"], 4) for t, r in report.items() if "auc" in r}, time.time() - started)
    result = {"dataset": schema.contract.name, "models": models, "seeds": seeds, "epochs": epochs, "preset": preset,
              "baseline": baseline or models[0], "eval_rows": eval_rows, "configs": configs}
    agg = write_report(result, runs, histories, work_dir, plots=plots)
    return dict(result, **agg)


def format_table(result: Dict) -> str:
    """The AUC table (mean ± std over seeds, oracle last) as markdown."""
    from pipeline.evaluation.report import TASK_ORDER, metric_table

    tasks = [t for t in TASK_ORDER if any(t in per_task for per_task in result["summary"].values())]
    return "\n".join(metric_table(result, "auc", tasks))


def main(argv=None) -> int:
    from serving.tf_quiet import quiet_tensorflow

    quiet_tensorflow(sys.argv[1:] if argv is None else argv)
    from pipeline.datagen import add_builtin_data_args
    from pipeline.run import UsageError, _Parser, resolve_schema, split_beam_args

    p = _Parser(prog="python -m pipeline.benchmark", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--models", default="esm2,esmm", help="name[:preset], comma separated")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--schema", default=None)
    p.add_argument("--data", default=None)
    add_builtin_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="data generation seed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", default="default")
    p.add_argument("--eval-fraction", type=float, default=None)
    p.add_argument("--work-dir", default="artifacts/benchmark")
    p.add_argument("--baseline", default=None, help="model RelaImpr is measured against (default: the first)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up log lines (CUDA, CPU features), hidden on machines without a GPU")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="override every model's learning rate (e.g. a lower one, so that early stopping, which "
                        "restores the best epoch, finds each model's peak at a finer grid)")
    p.add_argument("--deterministic", action="store_true",
                   help="ordered input pipeline and deterministic ops: a seed's figures repeat exactly (slower)")
    p.add_argument("--reuse-preprocessed", action="store_true",
                   help="skip preprocessing when the work directory holds a completed run of the same inputs, "
                        "schema, options and preprocessing code")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, rest = p.parse_known_args(argv)
        beam_args = split_beam_args(rest) or ["--runner=DirectRunner"]
        from models import registry

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.baseline and args.baseline not in models:
            raise UsageError(f"--baseline {args.baseline!r} is not among --models {models}")
        for spec in models:
            name, _ = parse_spec(spec, args.preset)
            if name not in registry.available():
                raise UsageError(f"unknown model {name!r}; available: {', '.join(registry.available())}")
            try:
                resolve_spec(spec, args.preset, args.batch_size, args.learning_rate)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        work_dir = os.path.abspath(args.work_dir)
        os.makedirs(work_dir, exist_ok=True)
        schema, _ = resolve_schema(args, work_dir, {})
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(models, list(range(args.seeds)), schema, work_dir, args.epochs, args.preset,
                           args.batch_size, beam_args, preprocess=not args.reuse_preprocessed,
                           baseline=args.baseline, plots=not args.no_plots, deterministic=args.deterministic,
                           learning_rate=args.learning_rate)
    print(format_table(result))
    print(f"report: {os.path.join(work_dir, 'report.md')} (and report.json, plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
