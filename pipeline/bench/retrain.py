"""What a daily retrain costs against starting over: one run prints both, measured on the same machine.

    python -m pipeline.bench.retrain [--rows-per-day 200000] [--days 2] [--epochs 3] [--work-dir artifacts/bench-retrain]

Writes ``--days`` daily partitions of the built-in log, runs ``pipeline.run`` on all days but the last (the base,
not timed), then times

* ``pipeline.retrain`` on the last day: the partition transformed with the base graph (no re-analysis), data
  checks, warm-started training, the gate and the publish;
* ``pipeline.run`` from scratch over the concatenation of every day (re-analysis and training from scratch), which
  is what a loop without warm start and a saved transform would do each day.

Prints the retrain's stage seconds, both totals and their ratio (``bench_retrain.json`` keeps them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List


def _timed(args: List[str]) -> Dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {"seconds": round(time.time() - started, 1), "rc": proc.returncode, "tail": proc.stdout[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.retrain", description=__doc__.splitlines()[0])
    p.add_argument("--rows-per-day", type=int, default=200_000)
    p.add_argument("--days", type=int, default=2, help="partitions; the last one is the retrain's")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work-dir", default="artifacts/bench-retrain")
    args = p.parse_args(argv)
    if args.days < 2:
        print("error: --days must be >= 2 (a base and a new day)", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work_dir)
    logs = os.path.join(work, "logs")
    last = f"day-{args.days:02d}"
    base_glob = os.path.join(logs, "day-0[1-%d]" % (args.days - 1), "*.parquet") if args.days <= 10 else None
    if base_glob is None:
        print("error: --days must be <= 10", file=sys.stderr)
        return 2
    steps = [("generate", ["pipeline.datagen", "--out", logs, "--rows", str(args.rows_per_day * args.days),
                           "--days", str(args.days), "--partitions", "--new-items", "0.1", "--price-drift", "0.01"]),
             ("base run", ["pipeline.run", "--data", base_glob, "--work-dir", os.path.join(work, "loop"),
                           "--epochs", str(args.epochs), "--no-reuse-preprocessed"]),
             ("retrain", ["pipeline.retrain", "--base", os.path.join(work, "loop"), "--data",
                          os.path.join(logs, last, "*.parquet"), "--epochs", str(args.epochs)]),
             ("full run", ["pipeline.run", "--data", os.path.join(logs, "day-*", "*.parquet"), "--work-dir",
                           os.path.join(work, "full"), "--epochs", str(args.epochs), "--no-reuse-preprocessed"])]
    results = {}
    for name, cmd in steps:
        print(f"== {name}: python -m {' '.join(cmd)}", flush=True)
        results[name] = _timed(cmd)
        print(f"   {results[name]['seconds']} s, exit {results[name]['rc']}", flush=True)
        if name != "retrain" and results[name]["rc"] != 0:
            print(results[name]["tail"], file=sys.stderr)
            return 1
    retrain, full = results["retrain"], results["full run"]
    summary_path = sorted(os.path.join(work, "loop", "retrain", d, "summary.json")
                          for d in os.listdir(os.path.join(work, "loop", "retrain")) if d.isdigit())[-1]
    with open(summary_path) as fh:
        stages = json.load(fh).get("timings_s", {})
    print(f"\nrows per day {args.rows_per_day}, days {args.days}, epochs {args.epochs}, {os.cpu_count()} CPU(s)")
    print(f"retrain of day {args.days} (exit {retrain['rc']}): {retrain['seconds']} s "
          f"(stages: {', '.join(f'{k} {v}' for k, v in stages.items())})")
    print(f"full pipeline.run over days 1-{args.days}: {full['seconds']} s")
    print(f"retrain / full run: {retrain['seconds'] / full['seconds']:.2f}")
    with open(os.path.join(work, "bench_retrain.json"), "w") as fh:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in results.items()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
