"""Does an exported version load and score on an accelerator as TF Serving's GPU image would run it?

    python -m serving.check_device --saved-model EXPORT/esm2/1              # GPU:0 against the CPU
    python -m serving.check_device --saved-model EXPORT/esm2/1 --device GPU:1

The version is loaded twice with the v1 loader into Sessions, which is how TF Serving runs a SavedModel:

* the reference Session sees no GPU (``device_count {GPU: 0}``): TF Serving's CPU image;
* the device Session sees ``--device`` (for ``GPU:N`` only that GPU, ``visible_device_list``) with soft
  placement and no hard device in the graph, so TensorFlow's default placement puts every op with a kernel
  there on it: TF Serving's ``-gpu`` image.

Both replay the version's own warmup requests (``assets.extra/tf_serving_warmup_requests``: real raw
``tf.Example``s written at export) through ``serving_default``. The command prints, per warmup batch, each
Session's p50 latency and the largest absolute and relative difference of any output, then how many of the
traced run's matrix multiplications ran on the device. Exit status: 0 when every output matches within
``--atol`` + ``--rtol`` * |cpu| and at least one MatMul ran on the device; 1 when not; 2 when the version has no
warmup file or the device does not exist here (the devices there are are named).

``--device CPU:0`` runs the same comparison CPU against CPU (a check of the command itself on machines without
an accelerator).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np


class DeviceUnavailable(RuntimeError):
    """The requested device is not present on this machine."""


def warmup_batches(saved_model_dir: str) -> List[np.ndarray]:
    """The serialized examples of each warmup request (object arrays of bytes), in file order."""
    import tensorflow as tf

    from serving.warmup import read_warmup_file, warmup_path

    path = warmup_path(saved_model_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{saved_model_dir}: no warmup file {path} (export with warmup_examples)")
    batches = []
    for i, log in enumerate(read_warmup_file(path)):
        inputs = log.predict_log.request.inputs
        if "examples" not in inputs:
            raise ValueError(f"{path}: record {i} has no 'examples' input (has {sorted(inputs)})")
        batches.append(np.array(tf.make_ndarray(inputs["examples"]).ravel(), dtype=object))
    if not batches:
        raise ValueError(f"{path}: no warmup records")
    return batches


def session_config(device: str | None):
    """ConfigProto: ``None`` = CPU only; ``'CPU:0'`` = the default CPU placement; ``'GPU:N'`` = GPU N only (it
    is GPU:0 inside the Session). Raises DeviceUnavailable when GPU N is not here."""
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    if device is None or device.upper().startswith("CPU"):
        config.device_count["GPU"] = 0
        return config
    kind, _, index = device.upper().partition(":")
    gpus = tf.config.list_physical_devices("GPU")
    if kind != "GPU" or not index.isdigit():
        raise ValueError(f"--device must be CPU:0 or GPU:N, got {device!r}")
    if int(index) >= len(gpus):
        have = ", ".join(d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()) or "none"
        raise DeviceUnavailable(f"no {device} on this machine (devices: {have})")
    config.gpu_options.visible_device_list = index
    config.gpu_options.allow_growth = True
    return config


def compare(reference: Dict[str, np.ndarray], other: Dict[str, np.ndarray]) -> tuple:
    """(max |a - b|, max |a - b| / max(|a|, 1e-12)) over every output of two score dicts with the same keys."""
    if set(reference) != set(other):
        raise ValueError(f"outputs differ: {sorted(reference)} vs {sorted(other)}")
    worst_abs = worst_rel = 0.0
    for name, want in reference.items():
        want = np.asarray(want, np.float64)
        diff = np.abs(np.asarray(other[name], np.float64) - want)
        if diff.size:
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(want), 1e-12)).max()))
    return worst_abs, worst_rel


def within(reference: Dict[str, np.ndarray], other: Dict[str, np.ndarray], atol: float, rtol: float) -> bool:
    return all(np.allclose(other[k], reference[k], atol=atol, rtol=rtol) for k in reference)


def _p50_ms(fn, reps: int) -> float:
    from serving.bench_latency import _percentiles

    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)[0]


def matmuls_on(placements: Sequence[tuple], device: str) -> tuple:
    """(MatMul-like nodes on ``device``, MatMul-like nodes anywhere) of a traced run's (device, op) list.
    ``device`` is the in-Session name (GPU:N is GPU:0 there); stream entries of GPU traces are not counted."""
    local = "GPU:0" if device.upper().startswith("GPU") else device.upper()
    mm = [d for d, op in placements if "MatMul" in op and not d.rsplit("/", 1)[-1].startswith("stream")]
    return sum(1 for d in mm if d.upper().endswith("DEVICE:" + local)), len(mm)


def check(saved_model_dir: str, device: str = "GPU:0", reps: int = 30, atol: float = 1e-5,
          rtol: float = 1e-4) -> Dict:
    """Runs the comparison; returns {'device', 'rows': [(batch, cpu p50, device p50, max abs, max rel)],
    'matmuls': (on device, total), 'ok'}. Raises DeviceUnavailable / FileNotFoundError as described above."""
    from serving.bench_latency import SessionRunner

    config = session_config(device)  # raises before anything is loaded when the device is missing
    batches = warmup_batches(saved_model_dir)
    cpu = SessionRunner(saved_model_dir, config=session_config(None))
    dev = SessionRunner(saved_model_dir, config=config)
    try:
        rows, ok = [], True
        for examples in batches:
            want, got = cpu(examples=examples), dev(examples=examples)
            worst_abs, worst_rel = compare(want, got)
            ok = ok and within(want, got, atol, rtol)
            rows.append((len(examples), _p50_ms(lambda: cpu(examples=examples), reps),
                         _p50_ms(lambda: dev(examples=examples), reps), worst_abs, worst_rel))
        on_device, total = matmuls_on(dev.placements(examples=batches[-1]), device)
    finally:
        cpu.close()
        dev.close()
    return {"device": device, "rows": rows, "matmuls": (on_device, total), "ok": ok and on_device > 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.check_device", description=__doc__.splitlines()[0])
    p.add_argument("--saved-model", required=True, help="an exported version directory (with its warmup file)")
    p.add_argument("--device", default="GPU:0", help="GPU:N (default GPU:0), or CPU:0 to check the command")
    p.add_argument("--reps", type=int, default=30, help="timed calls per warmup batch and Session")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    try:
        result = check(args.saved_model, args.device, args.reps, args.atol, args.rtol)
    except (DeviceUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.saved_model}: serving_default on {result['device']} against the CPU-only Session, "
          f"{len(result['rows'])} warmup request(s)")
    print(f"{'batch':>6} {'cpu p50 ms':>11} {result['device'] + ' p50 ms':>13} {'max |diff|':>11} {'max rel diff':>13}")
    for batch, cpu_ms, dev_ms, worst_abs, worst_rel in result["rows"]:
        print(f"{batch:>6} {cpu_ms:>11.3f} {dev_ms:>13.3f} {worst_abs:>11.2e} {worst_rel:>13.2e}")
    on_device, total = result["matmuls"]
    print(f"MatMul nodes on {result['device']}: {on_device} of {total}")
    print(f"outputs match within atol {args.atol:g} + rtol {args.rtol:g} and compute ran on {result['device']}: "
          f"{'yes' if result['ok'] else 'NO'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
