"""Parameter-server training: ``python -m pipeline.cluster --ps 2 --workers 2 -- <pipeline.run args>`` on localhost.

One real run (chief + 2 workers + 2 PS, separate processes) of the whole job on the session's e2e run's built-in
data (``--data``; its preprocessed output copied into the run's work dir, which ``pipeline.run`` then reuses: same
inputs, schema, options and code) is shared by the tests: where the largest embedding table lives, its eval AUC
against single-process runs of the same data (two seeds), its final checkpoint restored into a one-machine model,
and its export (whole tables, the one-machine export's signatures, stock-TF-Serving checks, scores in an isolated
v1-loader process equal to the one-machine model's). Every registry model under PS: test_parameter_server_models.py.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EPOCHS, BATCH = 2, 256  # the e2e run's 6000 rows: ~19 steps an epoch
# --score-rows 0: the run's own smoke scoring is skipped; the last test scores the export (TF Serving's loader)
RUN_ARGS = ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--model", "esm2",
            "--ps-min-shard-bytes", "1024", "--score-rows", "0", "--no-tensorboard", "--early-stopping-patience", "0"]
PS_DEVICES = {f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(2)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _started_pids(log: str):
    return {line.split()[2]: int(line.split()[4]) for line in log.splitlines() if line.startswith("[cluster] started")}


def _launch(args, log_path, timeout_s):
    """Runs ``python -m pipeline.cluster ARGS`` (its own session); kills its group if it overruns or fails."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cluster"] + args, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log_path) as fh:
        return rc, fh.read()


@pytest.fixture(scope="module")
def ps_run(e2e_run, tmp_path_factory):
    import shutil

    work = str(tmp_path_factory.mktemp("ps_run"))
    data_dir = e2e_run["summary"]["input"]["dir"]
    shutil.copytree(os.path.join(e2e_run["work_dir"], "preprocessed"), os.path.join(work, "preprocessed"))
    rc, log = _launch(["--ps", "2", "--workers", "2", "--"] + RUN_ARGS +
                      ["--data", os.path.join(data_dir, "part-*.parquet"), "--work-dir", work],
                      os.path.join(work, "cluster.log"), timeout_s=420)
    assert rc == 0, log[-4000:]
    with open(os.path.join(work, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["preprocess"].get("reused"), summary["preprocess"]  # else the copy was not what it reads
    return {"work": work, "summary": summary, "log": log, "data_dir": data_dir}


@pytest.fixture(scope="module")
def pipeline_parts(ps_run):
    """(schema, tft_output, preprocessed dir) of the PS run."""
    import tensorflow_transform as tft

    from pipeline.beam.preprocess import TRANSFORM_DIR
    from transforms.schema import builtin_schema_path, load_schema

    schema = load_schema(builtin_schema_path("builtin"),
                         input_path=os.path.join(ps_run["data_dir"], "part-*.parquet"))
    pp = os.path.join(ps_run["work"], "preprocessed")
    return schema, tft.TFTransformOutput(os.path.join(pp, TRANSFORM_DIR)), pp


def _one_machine_esm2(schema, tft_output, pp):
    """A one-machine ESM² of the PS run's config, built as the pipeline builds it."""
    from models import registry
    from pipeline.training.data import make_dataset
    from pipeline.beam.preprocess import transformed_pattern
    from pipeline.training.train import model_inputs

    contract = schema.contract
    categorical, dense, sequences = model_inputs(contract, tft_output)
    cfg = registry.resolve_config("esm2", "default", {"batch_size": BATCH})
    model = registry.build("esm2", categorical, dense, cfg, sequences)
    sample, _ = next(iter(make_dataset(transformed_pattern(pp, "train"), tft_output.transformed_feature_spec(),
                                       contract.model_feature_names(), ("click",), batch_size=2)))
    model(sample)
    return model, cfg


def test_ctrl_c_stops_every_task(tmp_path):
    """SIGINT to the launcher once all five tasks are up: it exits 130 and no task it started is left."""
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cluster", "--ps", "2", "--workers", "2", "--",
                                 "--work-dir", str(tmp_path / "w"), "--rows", "100"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                # a shell's background job inherits SIGINT ignored; a terminal's Ctrl-C is not
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            pids = {}
            while len(pids) < 5 and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = _started_pids(log_path.read_text())
            assert len(pids) == 5, log_path.read_text()[-2000:]
            assert all(_alive(p) for p in pids.values())
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 130
    assert not [n for n, p in pids.items() if _alive(p)], pids


def test_print_tf_config_gives_each_task_its_cluster_role():
    out = subprocess.run([sys.executable, "-m", "pipeline.cluster", "--ps", "2", "--workers", "2", "--hosts",
                          "c,w0,w1,p0,p1", "--port-base", "2222", "--print-tf-config", "--", "--epochs", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("TF_CONFIG=")]
    configs = [json.loads(l.split("'")[1]) for l in lines]
    expected = {"chief": ["c:2222"], "worker": ["w0:2223", "w1:2224"], "ps": ["p0:2225", "p1:2226"]}
    assert all(c["cluster"] == expected for c in configs)
    assert sorted((c["task"]["type"], c["task"]["index"]) for c in configs) == [
        ("chief", 0), ("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1)]
    chief = next(l for l in lines if '"type": "chief"' in l)
    assert chief.endswith("python -m pipeline.run --epochs 1 --strategy parameter_server")
    assert all(l.endswith("python -m pipeline.cluster --serve") for l in lines if l is not chief)


def test_only_the_chief_runs_the_job_and_every_task_is_stopped(ps_run):
    log = ps_run["log"]
    stages = [l for l in log.splitlines() if "==> " in l]
    assert stages and all(l.startswith("[chief]") for l in stages)
    assert any("==> export SavedModel" in l for l in stages)
    pids = _started_pids(log)
    assert set(pids) == {"ps0", "ps1", "worker0", "worker1", "chief"}
    assert not [n for n, p in pids.items() if _alive(p)]
    training = ps_run["summary"]["training"]
    assert training["strategy"].startswith("ParameterServerStrategy") and training["workers"] == 2 and training["ps_tasks"] == 2


def test_largest_embedding_table_is_split_across_both_ps_tasks(ps_run, pipeline_parts):
    """Rows of each table's parts (``<table>/part_<k>``) sum to its vocabulary size + OOV buckets (from the
    transform output); the largest table's parts live on PS task 0 and PS task 1."""
    from transforms import features as F

    schema, tft_output, _ = pipeline_parts
    devices = ps_run["summary"]["training"]["variable_devices"]
    tables = {}
    for name, (device, shape) in devices.items():
        base = name.split(":")[0]
        if "/emb_" in base and (base.endswith("/embeddings") or "/embeddings/part_" in base):
            tables.setdefault(base.split("/part_")[0], []).append((device, shape))
    rows = {t: sum(s[0] for _, s in parts) for t, parts in tables.items()}
    largest = max(rows, key=rows.get)
    field = largest.split("/emb_")[1].split("/")[0]
    f = next(f for f in schema.contract.vocab_features if F.categorical_id(f.name) == field)
    assert rows[largest] == tft_output.vocabulary_size_by_name(f.vocab_name) + f.num_oov_buckets
    assert {d for d, _ in tables[largest]} == PS_DEVICES, tables[largest]
    assert len(tables[largest]) == 2
    dense = [n for n in devices if "/emb_" not in n and "/part_" in n]
    assert not dense  # only embedding tables are split


def _eval_auc(model, schema, tft_output, pp):
    from pipeline.evaluation import evaluate as ev
    from pipeline.beam.preprocess import transformed_pattern

    preds, labels = ev.collect(model, schema.contract, tft_output, transformed_pattern(pp, "eval"))
    return ev.evaluate(preds, labels)["ctr"]["auc"]


def test_eval_auc_is_the_single_process_auc_within_seed_noise(ps_run, pipeline_parts):
    """Two single-process runs (seeds 0, 1) of the same data and config; the PS run's CTR AUC must be within
    max(3 x their gap, 0.02) of their mean."""
    from models import registry
    from pipeline.beam.preprocess import transformed_pattern
    from pipeline.training.train import TrainConfig, train_model

    schema, tft_output, pp = pipeline_parts
    cfg = registry.resolve_config("esm2", "default", {"batch_size": BATCH})
    aucs = []
    for seed in (0, 1):
        model, _ = train_model("esm2", cfg, schema.contract, tft_output, transformed_pattern(pp, "train"),
                               transformed_pattern(pp, "eval"),
                               TrainConfig(epochs=EPOCHS, seed=seed, early_stopping_patience=0))
        aucs.append(_eval_auc(model, schema, tft_output, pp))
    ps_auc = ps_run["summary"]["eval"]["ctr"]["auc"]
    tolerance = max(3 * abs(aucs[0] - aucs[1]), 0.02)
    assert abs(ps_auc - np.mean(aucs)) <= tolerance, (ps_auc, aucs)
    assert np.mean(aucs) > 0.55, aucs  # the reference learned something, so the comparison means something


def test_checkpoint_restores_and_export_serves_whole_tables_like_the_weights_say(ps_run, pipeline_parts, tmp_path):
    import tensorflow as tf

    from models.keras import keras
    from pipeline.beam.preprocess import TRANSFORM_DIR
    from pipeline.run import sample_canonical_rows
    from serving.examples import serialize_rows
    from serving.export import export_saved_model
    from serving.graph_check import check_servable

    schema, tft_output, pp = pipeline_parts
    summary = ps_run["summary"]
    # The final checkpoint (written by the chief from split variables) restores into a one-machine model + Adam.
    model, cfg = _one_machine_esm2(schema, tft_output, pp)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    model.optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(summary["training"]["final_checkpoint"])
    status.assert_existing_objects_matched()
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * summary["training"]["steps_per_epoch"]
    ps_export = summary["export"]
    check_servable(ps_export)
    # A one-machine export of the restored weights: the PS export has its variables (names, whole shapes: no
    # "part_" pieces) and its signatures.
    one = export_saved_model(model, os.path.join(pp, TRANSFORM_DIR), schema.contract, str(tmp_path / "export"),
                             "esm2")
    saved = {p: dict(tf.train.list_variables(os.path.join(p, "variables", "variables"))) for p in (ps_export, one)}
    assert saved[ps_export] == saved[one] and not [n for n in saved[ps_export] if "part_" in n]
    sigs = {}
    for path in (ps_export, one):
        from tensorflow.python.tools import saved_model_utils

        meta = saved_model_utils.get_meta_graph_def(path, "serve")
        sigs[path] = {k: ({n: (t.dtype, str(t.tensor_shape)) for n, t in s.inputs.items()},
                          {n: (t.dtype, str(t.tensor_shape)) for n, t in s.outputs.items()})
                      for k, s in meta.signature_def.items()}
    assert sigs[ps_export] == sigs[one] and set(sigs[one]) >= {"serving_default", "predict_raw", "transform_features"}
    # Scored in an isolated process by TF Serving's loader (tf.compat.v1, one Session) == the restored weights.
    serialized = serialize_rows(sample_canonical_rows(schema, 32), schema.contract)
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps([base64.b64encode(s).decode() for s in serialized]))
    out = tmp_path / "v1.json"
    subprocess.run([sys.executable, "-m", "tests.pipeline.training.ps_worker", "v1score", ps_export, str(examples),
                    str(out)], cwd=REPO, check=True, timeout=180)
    served = json.loads(out.read_text())
    transformed = tf.saved_model.load(one).signatures["transform_features"](examples=tf.constant(serialized))
    expected = model(dict(transformed), training=False)
    assert set(served) == {"ctr", "ctavr", "cvr", "ctcvr"}
    for name, values in served.items():
        np.testing.assert_allclose(values, expected[name].numpy().reshape(-1), rtol=0, atol=1e-6, err_msg=name)
