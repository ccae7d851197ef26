"""GPRec on the built-in planted-truth data: CTR AUC against its backbone and the dual-embedding contrast.

    python -m pipeline.bench_gprec --rows 100000 --seeds 3                       # gprec,dnn (default presets)
    python -m pipeline.bench_gprec --models gprec:dp,gprec:ensemble,gprec_dcn,dnn --seeds 3

``--models``: ``name[:preset]`` entries of the registry, trained on the same preprocessed data over seeds
0..N-1 (as ``pipeline.benchmark``). Printed per model: eval CTR AUC mean ± std, the oracle AUC and, for GPRec,
the mean cosine between each group's positive and negative embedding (cos(p_i, n_i), paper Fig. 4; low =
contrasting) and the NMI of argmax s^1 against the planted ``true_group``. ``gprec_bench.json`` in the work
directory keeps every run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List

import numpy as np

logger = logging.getLogger("rankline.bench_gprec")


def run(specs: List[str], seeds: List[int], schema, work_dir: str, epochs: int, batch_size=None,
        beam_args=None, preprocess: bool = True) -> Dict:
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
    runs: Dict[str, List[Dict]] = {}
    oracle = float("nan")
    for spec in specs:
        name, _, preset = spec.partition(":")
        cfg = registry.resolve_config(name, preset or "default", {"batch_size": batch_size})
        for seed in seeds:
            started = time.time()
            model, _ = train_model(name, cfg, schema.contract, tft_output, transformed_pattern(pp_dir, "train"),
                                   transformed_pattern(pp_dir, "eval"), TrainConfig(epochs=epochs, seed=seed))
            report = ev.evaluate_model(model, schema.contract, tft_output, transformed_pattern(pp_dir, "eval"))
            row = {"seed": seed, "auc": report["ctr"]["auc"], "seconds": round(time.time() - started, 1)}
            oracle = report["ctr"].get("oracle_auc", oracle)
            if hasattr(model, "group_pair_cosine"):
                row["pair_cosine"] = float(np.mean(model.group_pair_cosine()))
            if "group" in report:
                row["group_nmi"] = report["group"]["nmi"]
            logger.info("%s seed %d: %s", spec, seed, row)
            runs.setdefault(spec, []).append(row)
    out = {"runs": runs, "oracle_auc": oracle, "epochs": epochs, "seeds": seeds}
    with open(os.path.join(work_dir, "gprec_bench.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def format_table(result: Dict) -> str:
    def cell(rows, key):
        v = np.array([r[key] for r in rows if key in r], float)
        return f"{v.mean():.4f} ± {v.std():.4f}" if len(v) else "-"

    lines = ["| model | ctr AUC | mean cos(p_i, n_i) | group NMI |", "|---|---|---|---|"]
    for spec, rows in result["runs"].items():
        lines.append(f"| {spec} | {cell(rows, 'auc')} | {cell(rows, 'pair_cosine')} | {cell(rows, 'group_nmi')} |")
    lines.append(f"| *oracle* | {result['oracle_auc']:.4f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from models import registry
    from pipeline.run import UsageError, _Parser, resolve_schema, split_beam_args

    p = _Parser(prog="python -m pipeline.bench_gprec", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--models", default="gprec,dnn", help="name[:preset], comma separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0, help="data generation seed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--work-dir", default="artifacts/bench_gprec")
    p.add_argument("--reuse-preprocessed", action="store_true")
    for flag in ("--schema", "--data", "--eval-fraction"):
        p.add_argument(flag, default=None)
    p.add_argument("--uninformative-daction", action="store_true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, rest = p.parse_known_args(argv)
        beam_args = split_beam_args(rest) or ["--runner=DirectRunner"]
        specs = [s.strip() for s in args.models.split(",") if s.strip()]
        for spec in specs:
            name, _, preset = spec.partition(":")
            if name not in registry.available():
                raise UsageError(f"unknown model {name!r}; available: {', '.join(registry.available())}")
            try:
                registry.resolve_config(name, preset or "default")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        work_dir = os.path.abspath(args.work_dir)
        os.makedirs(work_dir, exist_ok=True)
        schema, _ = resolve_schema(args, work_dir, {})
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run(specs, list(range(args.seeds)), schema, work_dir, args.epochs, args.batch_size, beam_args,
                 preprocess=not args.reuse_preprocessed)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
