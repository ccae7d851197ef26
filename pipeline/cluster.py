"""Parameter-server training cluster: a local launcher, TF_CONFIGs for a real cluster, and the task server.

    python -m pipeline.cluster --ps 2 --workers 2 [--port-base P] -- <pipeline.run args>
    python -m pipeline.cluster --ps 2 --workers 2 --hosts c0,w0,w1,p0,p1 --port-base 2222 --print-tf-config \
        -- <pipeline.run args>
    TF_CONFIG='{...}' python -m pipeline.cluster --serve          # a worker or ps task

Local run (no ``--print-tf-config``): starts every PS and worker task (``--serve``) and then the chief
(``python -m pipeline.run --strategy parameter_server <args>``) as separate processes on this machine, each
with its own ``TF_CONFIG``; their output is streamed with a ``[chief]`` / ``[worker0]`` / ``[ps1]`` prefix.
It waits for the chief and returns its exit code; a PS or worker task that exits first fails the run.
Every process it started is stopped when it returns, fails, or gets Ctrl-C / SIGTERM (and, on Linux, when
the launcher itself is killed: the children get SIGKILL from the kernel).

Only the chief runs ``pipeline.run``: preprocessing, evaluation and export happen there; workers run the
training steps the chief schedules and PS tasks hold the variables (embedding tables split across them,
see ``pipeline.training.train.make_strategy``). The chief and the workers read the same file paths: on a
real cluster ``--work-dir`` must be a shared filesystem or a ``gs://``-style URL.

``--print-tf-config``: prints, for each task, its address, ``TF_CONFIG`` and command (a real cluster: run
each line on its host) and starts nothing. ``--hosts``: chief, workers, then PS hosts, comma-separated
(default all ``localhost``); task k listens on ``port-base + k``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

SERVER_ROLES = ("worker", "ps")
STOP_GRACE_S = 5.0


def free_ports(n: int) -> List[int]:
    """``n`` distinct ports the kernel reports free now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_spec(workers: int, ps: int, hosts: Sequence[str] | None = None,
                 port_base: int | None = None) -> Dict[str, List[str]]:
    """{"chief": [addr], "worker": [...], "ps": [...]}: task k (chief, workers, PS in that order) on
    ``hosts[k]`` (default localhost) port ``port_base + k`` (default: free local ports)."""
    if workers < 1 or ps < 1:
        raise ValueError(f"--workers and --ps must be >= 1, got {workers} and {ps}")
    n = 1 + workers + ps
    hosts = list(hosts) if hosts else ["localhost"] * n
    if len(hosts) != n:
        raise ValueError(f"--hosts: expected {n} hosts (chief, {workers} worker(s), {ps} ps), got {len(hosts)}")
    ports = [port_base + k for k in range(n)] if port_base is not None else free_ports(n)
    addrs = [f"{h}:{p}" for h, p in zip(hosts, ports)]
    return {"chief": addrs[:1], "worker": addrs[1:1 + workers], "ps": addrs[1 + workers:]}


def tasks(spec: Dict[str, List[str]]) -> List[Tuple[str, int, str]]:
    """(task type, index, TF_CONFIG JSON) of every task: PS first, then workers, then the chief."""
    return [(role, i, json.dumps({"cluster": spec, "task": {"type": role, "index": i}}))
            for role in ("ps", "worker", "chief") for i in range(len(spec[role]))]


def chief_args(run_args: Sequence[str]) -> List[str]:
    """``pipeline.run`` arguments with ``--strategy parameter_server`` (added when absent)."""
    args = list(run_args)
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--strategy=") else (
            args[i + 1] if a == "--strategy" and i + 1 < len(args) else None)
        if value is not None:
            if value != "parameter_server":
                raise ValueError(f"--strategy {value}: pipeline.cluster runs --strategy parameter_server only")
            return args
    return args + ["--strategy", "parameter_server"]


def command(role: str, run_args: Sequence[str]) -> List[str]:
    if role == "chief":
        return [sys.executable, "-m", "pipeline.run"] + chief_args(run_args)
    return [sys.executable, "-m", "pipeline.cluster", "--serve"]


def serve() -> None:
    """Runs this process's worker or PS task (from ``TF_CONFIG``) until it is killed."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type not in SERVER_ROLES:
        raise SystemExit(f"error: TF_CONFIG task type must be one of {', '.join(SERVER_ROLES)} for --serve, got "
                         f"{resolver.task_type!r} (the chief runs python -m pipeline.run --strategy parameter_server)")
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"{resolver.task_type} {resolver.task_id} serving at {server.target}", flush=True)
    server.join()


def _die_with_parent() -> None:
    """Child side (Linux): SIGKILL this process when the launcher dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stream(proc: subprocess.Popen, prefix: str, out) -> threading.Thread:
    def pump():
        for line in iter(proc.stdout.readline, b""):
            out.write(f"[{prefix}] {line.decode(errors='replace')}")
            out.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def stop(procs: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live process, then SIGKILL those still alive after ``grace_s``; reaps them all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(spec: Dict[str, List[str]], run_args: Sequence[str], out=None, env: Dict | None = None,
                 chief_cmd: Sequence[str] | None = None) -> int:
    """Starts every task of ``spec`` on this machine, waits for the chief; returns its exit code (1 when a
    worker or PS task exits first). Every started process is stopped on return, exception or signal.
    ``chief_cmd``: the chief's command (default ``pipeline.run`` with ``run_args``)."""
    out = out or sys.stdout
    chief_cmd = list(chief_cmd) if chief_cmd else command("chief", run_args)  # checks the arguments first
    procs: List[Tuple[str, subprocess.Popen]] = []
    threads = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_signal) if threading.current_thread() is threading.main_thread() else None
    try:
        for role, index, tf_config in tasks(spec):
            name = role if role == "chief" else f"{role}{index}"
            task_env = dict(env if env is not None else os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1")
            cmd = chief_cmd if role == "chief" else command(role, run_args)
            proc = subprocess.Popen(cmd, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
            procs.append((name, proc))
            out.write(f"[cluster] started {name} pid {proc.pid} at {spec[role][index]}\n")
            out.flush()
            threads.append(_stream(proc, name, out))
        chief = procs[-1][1]
        while True:
            code = chief.poll()
            if code is not None:
                break
            dead = [(n, p.returncode) for n, p in procs[:-1] if p.poll() is not None]
            if dead:
                out.write(f"[cluster] task(s) {', '.join(f'{n} (exit {c})' for n, c in dead)} stopped before the "
                          "chief finished: stopping the cluster\n")
                code = 1
                break
            time.sleep(0.2)
        return code
    finally:
        stop([p for _, p in procs])
        for t in threads:
            t.join(timeout=2.0)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def print_tf_configs(spec: Dict[str, List[str]], run_args: Sequence[str], out=None) -> None:
    out = out or sys.stdout
    for role, index, tf_config in tasks(spec):
        cmd = (["python", "-m", "pipeline.run"] + chief_args(run_args) if role == "chief"
               else ["python", "-m", "pipeline.cluster", "--serve"])
        out.write(f"# {role} {index} at {spec[role][index]}\nTF_CONFIG='{tf_config}' {shlex.join(cmd)}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, run_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--ps", type=int, default=2, help="parameter server tasks")
    p.add_argument("--workers", type=int, default=2, help="worker tasks")
    p.add_argument("--port-base", type=int, default=None,
                   help="task k listens on PORT_BASE + k (chief, workers, PS); default: free local ports")
    p.add_argument("--hosts", default=None, help="comma-separated hosts of chief, workers, PS (default localhost)")
    p.add_argument("--print-tf-config", action="store_true",
                   help="print each task's TF_CONFIG and command instead of starting the tasks here")
    p.add_argument("--serve", action="store_true", help="run this process's worker/ps task from TF_CONFIG")
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return 0
    try:
        hosts = args.hosts.split(",") if args.hosts else None
        if hosts and not args.print_tf_config and any(h not in ("localhost", "127.0.0.1") for h in hosts):
            raise ValueError("--hosts other than localhost: use --print-tf-config and start each task on its host")
        if args.print_tf_config and hosts and args.port_base is None:
            raise ValueError("--print-tf-config with --hosts needs --port-base")
        spec = cluster_spec(args.workers, args.ps, hosts, args.port_base)
        if args.print_tf_config:
            print_tf_configs(spec, run_args)
            return 0
        return launch_local(spec, run_args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[cluster] interrupted: every task stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
