import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """One small end-to-end run of ``pipeline.run`` shared by the tests that inspect its artifacts."""
    from pipeline import run as run_mod

    work = tmp_path_factory.mktemp("e2e")
    summary = run_mod.run(["--rows", "6000", "--epochs", "3", "--batch-size", "256", "--work-dir", str(work),
                           "--score-rows", "8",
                           "--runner=DirectRunner"])
    return {"work_dir": str(work), "summary": summary}


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same Python, NumPy and TF seeds, so a pass or failure reproduces.

    Tests that need other seeds set them themselves; this only removes unseeded initialisers as a
    source of run-to-run differences (a CI failure once came from one).
    """
    import tensorflow as tf

    tf.keras.utils.set_random_seed(20261124)
    yield
