"""Scale benchmark: per-stage seconds and peak RSS of the whole process tree (prints figures; not a test).

    python -m pipeline.bench.scale --rows 10000000                       # the whole job (pipeline.run), 1 epoch
    python -m pipeline.bench.scale --rows 1000000 --preprocess-only      # data generation + preprocessing only
    python -m pipeline.bench.scale --rows 2000000 -- --in-memory         # options after -- go to pipeline.run

Runs the job in a child process and samples, every ``--interval`` seconds, the resident set size summed over the
child and all its descendants (Beam worker subprocesses included; from /proc, so Linux only). The child's log lines
``==> <stage>`` / ``<== <stage> done`` (``pipeline.run``'s stages) and ``preprocess: ... stage <name> ...``
(the steps inside preprocessing) attribute each sample to the stages running then; a stage's peak is the largest
tree RSS seen while it ran. Prints one row per stage (seconds, peak GiB) and the overall peak.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_START = re.compile(r"==> (.+)$")
_END = re.compile(r"<== (.+) done in ([0-9.]+)s")
_SUB = re.compile(r"preprocess: stage (.+?) (started|done in ([0-9.]+)s)")


def tree_rss(root: int) -> int:
    """Bytes resident in process ``root`` and all its descendants (0 once it is gone)."""
    children: Dict[int, List[int]] = {}
    rss: Dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * _PAGE  # field 24 of /proc/PID/stat: resident pages
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class Sampler(threading.Thread):
    """Samples ``tree_rss(pid)`` every ``interval`` s; ``peak`` overall and ``peaks[stage]`` for the stages
    that are open (``open_stage`` / ``close_stage``) at the time of a sample."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peaks: Dict[str, int] = {}
        self.open: Dict[str, float] = {}
        self.seconds: Dict[str, float] = {}
        self.order: List[str] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def open_stage(self, name: str) -> None:
        with self._lock:
            self.open[name] = time.time()
            if name not in self.order:
                self.order.append(name)
            self.peaks.setdefault(name, 0)

    def close_stage(self, name: str, seconds: Optional[float] = None) -> None:
        with self._lock:
            started = self.open.pop(name, None)
            if seconds is None and started is not None:
                seconds = time.time() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + (seconds or 0.0)

    def sample(self) -> None:
        rss = tree_rss(self.pid)
        with self._lock:
            self.peak = max(self.peak, rss)
            for name in self.open:
                self.peaks[name] = max(self.peaks[name], rss)

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()


def follow(proc: subprocess.Popen, sampler: Sampler, echo: bool, log_path: Optional[str]) -> None:
    log = open(log_path, "w") if log_path else None
    try:
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            line = line.rstrip("\n")
            sampler.sample()  # a stage boundary: sample before it moves
            m = _END.search(line)
            if m:
                sampler.close_stage(m.group(1), float(m.group(2)))
                continue
            m = _SUB.search(line)
            if m:
                name = "  " + m.group(1)  # indented: a step inside preprocessing
                if m.group(2) == "started":
                    sampler.open_stage(name)
                else:
                    sampler.close_stage(name, float(m.group(3)))
                continue
            m = _START.search(line)
            if m:
                sampler.open_stage(m.group(1))
    finally:
        if log:
            log.close()


def _preprocess_child(args) -> int:
    """Built-in data generation and preprocessing only, with the same stage log lines as ``pipeline.run``."""
    import logging

    from pipeline import datagen
    from pipeline.beam.preprocess import PreprocessConfig, preprocess_or_reuse
    from transforms.schema import builtin_schema_path, load_schema

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("rankline")
    cfg = datagen.GeneratorConfig(rows=args.rows, seed=args.seed, users=args.users, items=args.items)
    data = os.path.join(args.work_dir, "builtin-data", f"rows{args.rows}-seed{args.seed}-{cfg.fingerprint()}")
    for name, fn in (("generate built-in data", lambda: datagen.ensure_builtin(cfg, data)),
                     ("preprocess (Beam + tensorflow-transform)", lambda: preprocess_or_reuse(
                         load_schema(builtin_schema_path("builtin"), input_path=os.path.join(data, "part-*.parquet")),
                         PreprocessConfig(output_dir=os.path.join(args.work_dir, "preprocessed"),
                                          **({"user_chunk_rows": args.user_chunk_rows} if args.user_chunk_rows
                                             else {})),
                         ["--runner=DirectRunner"], reuse=False))):
        log.info("==> %s", name)
        start = time.time()
        fn()
        log.info("<== %s done in %.1fs", name, time.time() - start)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--work-dir", default=None, help="kept afterwards (default: a temporary directory, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir afterwards")
    p.add_argument("--preprocess-only", action="store_true", help="stop after preprocessing (no training)")
    p.add_argument("--user-chunk-rows", type=int, default=None,
                   help="with --preprocess-only: PreprocessConfig.user_chunk_rows (default: its default)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--log", default=None, help="also write the job's log here")
    p.add_argument("--quiet", action="store_true", help="do not echo the job's log")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if args._child:
        return _preprocess_child(args)
    import tempfile

    work = args.work_dir or tempfile.mkdtemp(prefix="rankline-scale-")
    common = ["--rows", str(args.rows), "--seed", str(args.seed), "--work-dir", work]
    common += ["--users", str(args.users)] if args.users else []
    common += ["--items", str(args.items)] if args.items else []
    if args.preprocess_only:
        cmd = [sys.executable, "-m", "pipeline.bench.scale", "--_child", *common]
        cmd += ["--user-chunk-rows", str(args.user_chunk_rows)] if args.user_chunk_rows else []
    else:
        cmd = [sys.executable, "-m", "pipeline.run", "--runner=DirectRunner", "--epochs", str(args.epochs),
               "--no-reuse-preprocessed", *common, *rest]
    print("running:", " ".join(cmd), flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = Sampler(proc.pid, args.interval)
    sampler.start()
    try:
        follow(proc, sampler, not args.quiet, args.log)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sampler.stop()
        sampler.join()
    total = time.time() - started
    gib = 1024 ** 3
    print(f"\n=== scale: {args.rows} rows{' (preprocessing only)' if args.preprocess_only else ''}, "
          f"exit code {rc} ===")
    print(f"{'stage':<48} {'seconds':>9} {'peak RSS GiB':>13}")
    for name in sampler.order:
        secs = sampler.seconds.get(name)
        print(f"{name:<48} {secs if secs is not None else float('nan'):>9.1f} {sampler.peaks[name] / gib:>13.2f}")
    print(f"{'total':<48} {total:>9.1f} {sampler.peak / gib:>13.2f}")
    if not args.work_dir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
