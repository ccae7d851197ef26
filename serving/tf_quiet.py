"""Hides TensorFlow's start-up log lines about CUDA and CPU features on machines without a GPU.

Called by the entry points (``pipeline.run``, ``pipeline.retrain``, ``pipeline.benchmark``, ``serving.score``,
``pipeline.infer_schema``) before anything imports TensorFlow; ``--verbose`` keeps every line.

Why not the environment alone: ``TF_CPP_MIN_LOG_LEVEL`` is read by TensorFlow's logging once absl logging is
initialised, but TensorFlow's shared libraries log while they load, before ``absl::InitializeLog()``, and such
lines ("All log messages before absl::InitializeLog() is called are written to STDERR", "oneDNN custom
operations are on", "Could not find cuda drivers on your machine", cuDNN/cuFFT/cuBLAS factory registration)
always reach stderr; the failed ``cuInit`` is an ERROR line, hidden only by level 3, which would hide every
real C++ error too. So: ``TF_CPP_MIN_LOG_LEVEL=2`` (hides "This TensorFlow binary is optimized to use
available CPU instructions", here and in child processes such as Beam workers), and in this process
TensorFlow is imported, and its platforms listed, with file descriptor 2 captured; every captured line is
written back except those matching ``NOISE``.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
from typing import Sequence

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT")


def has_gpu() -> bool:
    """An NVIDIA device node exists (the driver is loaded); no TensorFlow import."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def quiet_tensorflow(argv: Sequence[str]) -> bool:
    """Unless ``--verbose`` is in ``argv`` or the machine has a GPU: sets ``TF_CPP_MIN_LOG_LEVEL=2`` (when unset)
    and imports TensorFlow with its start-up noise dropped. Returns whether it did."""
    if "--verbose" in argv or has_gpu() or "tensorflow" in sys.modules:
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # initialises the platforms (the cuInit line); no context yet
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
    return True
