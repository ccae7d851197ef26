"""serving.check_device: the version's warmup requests scored in a CPU-only Session and in a device Session,
outputs compared, MatMul placement counted; a missing device or warmup file is a usage error (exit 2)."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from serving.check_device import compare, main, matmuls_on, warmup_batches, within


def test_warmup_batches_are_the_exported_examples(served_export):
    batches = warmup_batches(served_export["version_dir"])
    # export writes batches of 1, 16 and 128 examples, capped at the 32 given (serving.warmup.build_records)
    assert [len(b) for b in batches] == [1, 16, 32]
    assert list(batches[-1]) == list(served_export["examples"])


def test_cpu_against_cpu_passes_and_prints_every_warmup_batch(served_export, capsys):
    assert main(["--saved-model", served_export["version_dir"], "--device", "CPU:0", "--reps", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 16, 32]
    assert all(float(r[3]) == 0.0 and float(r[4]) == 0.0 for r in rows)  # same Session config: identical
    placed = next(line for line in lines if line.startswith("MatMul nodes on CPU:0"))
    on, total = (int(v) for v in placed.split(": ")[1].split(" of "))
    assert on == total > 0
    assert lines[-1].endswith(": yes")


def test_missing_gpu_or_warmup_file_is_a_usage_error(served_export, tmp_path, capsys):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert main(["--saved-model", served_export["version_dir"], "--device", "GPU:0"]) == 2
    assert "no GPU:0 on this machine (devices: CPU:0" in capsys.readouterr().err
    bare = str(tmp_path / "1")
    shutil.copytree(served_export["version_dir"], bare)
    os.remove(os.path.join(bare, "assets.extra", "tf_serving_warmup_requests"))
    assert main(["--saved-model", bare, "--device", "CPU:0"]) == 2
    assert "no warmup file" in capsys.readouterr().err
    assert main(["--saved-model", bare, "--device", "TPU:0"]) == 2
    assert "CPU:0 or GPU:N" in capsys.readouterr().err


def test_compare_and_tolerance_by_hand():
    cpu = {"ctr": np.array([0.5, 0.2], np.float32), "cvr": np.array([1e-3], np.float32)}
    dev = {"ctr": np.array([0.5, 0.2002], np.float32), "cvr": np.array([1.1e-3], np.float32)}
    worst_abs, worst_rel = compare(cpu, dev)
    assert worst_abs == pytest.approx(2e-4, rel=1e-3)      # ctr[1]
    assert worst_rel == pytest.approx(0.1, rel=1e-3)       # cvr: 1e-4 / 1e-3
    assert within(cpu, dev, atol=1e-3, rtol=0) and not within(cpu, dev, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="outputs differ"):
        compare(cpu, {"ctr": cpu["ctr"]})


def test_matmul_count_ignores_gpu_stream_entries():
    gpu = "/job:localhost/replica:0/task:0/device:GPU:0"
    placements = [(gpu, "MatMul"), (gpu, "_FusedMatMul"), ("/device:GPU:0/stream:all", "MatMul"),
                  ("/job:localhost/replica:0/task:0/device:CPU:0", "_MklMatMul"), (gpu, "Relu")]
    assert matmuls_on(placements, "GPU:0") == (2, 3)
    assert matmuls_on(placements, "GPU:3") == (2, 3)  # GPU:N is GPU:0 inside its Session
    assert matmuls_on(placements, "CPU:0") == (1, 3)
