"""Compare models on the same preprocessed data over several seeds (prints a table; not a test).

    python -m pipeline.benchmark --models esm2,esmm --seeds 3                 # built-in data, 200k rows
    python -m pipeline.benchmark --models esm2,esmm --uninformative-daction  # the control experiment
    python -m pipeline.benchmark --schema transforms/schemas/ali-ccp-sample.yaml --models esmm,dnn

The data is preprocessed once; every (model, seed) trains on the same TFRecords and is evaluated on the
same eval split. Output: a table of AUC mean ± std per task (with the oracle AUC on planted-truth data)
and ``benchmark.json`` in the work directory.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List

import numpy as np

logger = logging.getLogger("rankline.benchmark")


def run_benchmark(models: List[str], seeds: List[int], schema, work_dir: str, epochs: int, preset: str = "default",
                  batch_size=None, beam_args=None, preprocess: bool = True) -> Dict:
    import tensorflow_transform as tft

    from models import registry
    from pipeline import evaluate as ev
    from pipeline.preprocess import TRANSFORM_DIR, PreprocessConfig, run_preprocess, transformed_pattern
    from pipeline.train import TrainConfig, train_model
    from transforms.preprocessing import build_preprocessing_fn

    pp_dir = os.path.join(work_dir, "preprocessed")
    if preprocess or not os.path.exists(os.path.join(pp_dir, TRANSFORM_DIR)):
        run_preprocess(schema, PreprocessConfig(output_dir=pp_dir), build_preprocessing_fn(schema.contract),
                       beam_args or ["--runner=DirectRunner"])
    tft_output = tft.TFTransformOutput(os.path.join(pp_dir, TRANSFORM_DIR))
    results: Dict[str, Dict[str, List[float]]] = {}
    oracle: Dict[str, float] = {}
    for model_name in models:
        cfg = registry.resolve_config(model_name, preset, {"batch_size": batch_size})
        for seed in seeds:
            started = time.time()
            model, _ = train_model(model_name, cfg, schema.contract, tft_output, transformed_pattern(pp_dir, "train"),
                                   transformed_pattern(pp_dir, "eval"), TrainConfig(epochs=epochs, seed=seed))
            preds, labels = ev.collect(model, schema.contract, tft_output, transformed_pattern(pp_dir, "eval"))
            report = ev.evaluate(preds, labels)
            for task, row in report.items():
                results.setdefault(model_name, {}).setdefault(task, []).append(row["auc"])
                if "oracle_auc" in row:
                    oracle[task] = row["oracle_auc"]
            logger.info("%s seed %d: %s (%.0fs)", model_name, seed,
                        {t: round(r["auc"], 4) for t, r in report.items()}, time.time() - started)
    out = {"models": models, "seeds": seeds, "epochs": epochs, "auc": results, "oracle_auc": oracle}
    with open(os.path.join(work_dir, "benchmark.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def format_table(result: Dict) -> str:
    tasks = sorted({t for per_model in result["auc"].values() for t in per_model},
                   key=["ctr", "ctavr", "cvr", "ctcvr"].index)
    lines = ["| model | " + " | ".join(f"{t} AUC" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for model, per_task in result["auc"].items():
        cells = []
        for t in tasks:
            v = np.asarray(per_task.get(t, []), dtype=float)
            cells.append(f"{np.nanmean(v):.4f} ± {np.nanstd(v):.4f}" if len(v) else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if result["oracle_auc"]:
        lines.append("| oracle | " + " | ".join(f"{result['oracle_auc'].get(t, float('nan')):.4f}" for t in tasks)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from pipeline.run import UsageError, _Parser, resolve_schema, split_beam_args

    p = _Parser(prog="python -m pipeline.benchmark", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--models", default="esm2,esmm")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--schema", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0, help="data generation seed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", default="default")
    p.add_argument("--eval-fraction", type=float, default=None)
    p.add_argument("--uninformative-daction", action="store_true")
    p.add_argument("--work-dir", default="artifacts/benchmark")
    p.add_argument("--reuse-preprocessed", action="store_true", help="skip preprocessing when outputs exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, rest = p.parse_known_args(argv)
        beam_args = split_beam_args(rest) or ["--runner=DirectRunner"]
        from models import registry

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in registry.available()]
        if unknown:
            raise UsageError(f"unknown model(s) {unknown}; available: {', '.join(registry.available())}")
        work_dir = os.path.abspath(args.work_dir)
        os.makedirs(work_dir, exist_ok=True)
        schema, _ = resolve_schema(args, work_dir, {})
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_benchmark(models, list(range(args.seeds)), schema, work_dir, args.epochs, args.preset,
                           args.batch_size, beam_args, preprocess=not args.reuse_preprocessed)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
