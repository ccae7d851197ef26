"""Every registry model (and MUSENET with k-means++ seeding) trains a step under ``--strategy parameter_server``:
one cluster (chief + 1 worker + 2 PS, separate processes, ``pipeline.cluster``) on the session's e2e run's
preprocessed built-in data (``e2e_run``, shared with other tests: no preprocessing of its own), each model through
the pipeline's own ``train_model`` (contract binding included)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from models import registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PS_DEVICES = {f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(2)}
NAMES = list(registry.available()) + ["musenet:kmeans++"]


@pytest.fixture(scope="module")
def sweep(e2e_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("ps_models")
    data_glob = os.path.join(e2e_run["summary"]["input"]["dir"], "part-*.parquet")
    pp = os.path.join(e2e_run["work_dir"], "preprocessed")  # read only: every model reads, none writes there
    out = str(work / "sweep.json")
    chief = [sys.executable, "-m", "tests.pipeline.training.ps_worker", "models", pp, data_glob, out] + NAMES
    code = ("import sys; from pipeline import cluster; "
            f"sys.exit(cluster.launch_local(cluster.cluster_spec(1, 2), [], chief_cmd={chief!r}))")
    log_path = work / "cluster.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=1200)  # a bound for a loaded machine; ~16 models x 8 s on an idle one
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 0, log_path.read_text()[-4000:]
    with open(out) as fh:
        return json.load(fh)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_trains_a_step_under_ps(sweep, name):
    r = sweep[name]
    assert r["strategy"].startswith("ParameterServerStrategy")
    assert r["steps_run"] == 1 and all(np.isfinite(r["history"]["loss"]))
    split = {d for n, (d, _) in r["variable_devices"].items() if "/emb_" in n and "/part_" in n}
    assert split == PS_DEVICES  # its tables are split across both PS tasks
    if name == "stan":  # the Beta state is updated in train_step, on the PS
        counts = {k: v for k, v in r["state"].items() if k.endswith("stage/count")}
        assert counts and all(v > 0 for v in counts.values()), r["state"]
    if name == "musenet:kmeans++":
        assert [v for k, v in r["state"].items() if k.endswith("prototypes_seeded")] == [True]
