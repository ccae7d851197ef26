"""The ``rankline`` console script (installed by ``pip install -e .``, as scripts/setup.sh does) and the entry
points' quiet TensorFlow start-up (``--verbose`` keeps the log lines)."""
import os
import subprocess
import sys

import pytest

from serving.tf_quiet import has_gpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "rankline")
COMMANDS = ("run", "retrain", "score", "benchmark", "infer-schema")
# Lines TensorFlow 2.21 writes at start-up on a machine without a GPU (this one when no /dev/nvidia* exists).
NOISE = ("Could not find cuda drivers", "oneDNN custom operations are on",
         "All log messages before absl::InitializeLog()", "failed call to cuInit")


def _env():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # tests/conftest.py sets it; the entry points must do it themselves
    return env


def _run_all(commands, timeout=420):
    """Runs the commands concurrently; returns [(returncode, stdout, stderr)]; kills them all on the way out."""
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_rankline_script_lists_and_dispatches_the_commands(tmp_path):
    assert os.path.exists(SCRIPT), f"{SCRIPT} missing: run scripts/setup.sh (pip install -e .) after setup.py changed"
    (tmp_path / "d.csv").write_text("click,cat\n" + "\n".join(f"{k % 2},c{k % 3}" for k in range(30)) + "\n")
    (rc, out, err), (rc2, out2, err2), (rc3, _, err3), (rc4, out4, _) = _run_all([
        [SCRIPT, "--help"], [SCRIPT, "infer-schema", "--help"], [SCRIPT, "nope"],
        [SCRIPT, "infer-schema", str(tmp_path / "d.csv"), "--rows", "5"]], timeout=120)
    assert rc == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    for module in ("pipeline.run", "pipeline.retrain", "serving.score", "pipeline.benchmark", "pipeline.infer_schema"):
        assert f"python -m {module}" in out
    assert rc2 == 0 and "--rows" in out2 and "usage: python -m pipeline.infer_schema" in out2, err2
    assert rc3 == 2 and "unknown command 'nope'" in err3
    assert rc4 == 0 and "from 5 sampled rows" in out4


@pytest.mark.skipif(has_gpu(), reason="on a GPU machine the start-up lines are kept")
def test_tensorflow_start_up_lines_hidden_unless_verbose():
    """Every entry point imports TensorFlow before its --help returns; its CUDA / CPU-feature lines are hidden,
    and --verbose keeps them (the first command, pipeline.run without the hiding, shows them)."""
    py = sys.executable
    results = _run_all([
        [py, "-m", "pipeline.run", "--verbose", "--help"],
        [py, "-m", "pipeline.run", "--help"],
        [py, "-m", "pipeline.retrain", "--help"],
        [py, "-m", "serving.score", "--help"],
        [py, "-m", "pipeline.benchmark", "--help"],
        [SCRIPT, "run", "--help"],
    ])
    (rc, out, err) = results[0]
    assert rc == 0 and "--verbose" in out
    shown = [n for n in NOISE if n in err]
    assert "Could not find cuda drivers" in shown and "This TensorFlow binary is optimized" in err, err
    for (rc, out, err), name in zip(results[1:], ("run", "retrain", "score", "benchmark", "rankline run")):
        assert rc == 0 and "usage:" in out, (name, err)
        assert not [n for n in NOISE if n in err] and "This TensorFlow binary is optimized" not in err, (name, err)
