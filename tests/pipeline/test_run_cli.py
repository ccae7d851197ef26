"""Command-line behaviour of pipeline.run: clear one-line errors, Beam options passed through untouched."""
import os
import shutil
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import run as run_mod
from pipeline.beam.runner import make_pipeline
from transforms.schema import SCHEMA_DIR


def _main(capsys, argv):
    code = run_mod.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")], err


@pytest.mark.parametrize("argv,needle", [
    (["--data", "/nonexistent/dir/*.parquet"], "/nonexistent/dir/*.parquet"),
    (["--model", "nosuchmodel"], "nosuchmodel"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--preset", "huge"], "huge"),
    (["--epochs", "0"], "epochs"),
    (["--eval-fraction", "1.5"], "--eval-fraction"),
    (["--schema", "/nonexistent/schema.yaml"], "/nonexistent/schema.yaml"),
    (["--max-reject-fraction", "2"], "max_reject_fraction"),
    (["--users", "0"], "users"),
])
def test_bad_invocations_end_with_one_clear_line(capsys, tmp_path, argv, needle):
    code, errors, err = _main(capsys, argv + ["--work-dir", str(tmp_path)])
    assert code == 2
    assert len(errors) == 1 and needle in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_bad_invocation_from_the_shell_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--model", "nosuchmodel", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    from models import registry

    expected = f"error: unknown model 'nosuchmodel'; available: {', '.join(['auto'] + list(registry.available()))}"
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert "esm2" in expected and "musenet" in expected
    assert "Traceback" not in proc.stderr


def test_model_that_the_labels_cannot_train_is_refused(capsys, tmp_path):
    schema = os.path.join(SCHEMA_DIR, "criteo-sample.yaml")
    code, errors, err = _main(capsys, ["--schema", schema, "--model", "esm2", "--work-dir", str(tmp_path)])
    assert code == 2
    assert errors == ["error: model 'esm2' needs label(s) daction, purchase, which dataset 'criteo-sample' does "
                      "not have (it has: click)"], err


def test_beam_options_reach_beam_untouched():
    args = ["--runner=FlinkRunner", "--flink_master=localhost:8081", "--parallelism=4",
            "--environment_type=LOOPBACK"]
    assert run_mod.split_beam_args(args) == args
    opts = PipelineOptions(args).get_all_options()
    assert opts["runner"] == "FlinkRunner" and opts["flink_master"] == "localhost:8081"
    assert opts["parallelism"] == 4
    dataflow = ["--runner=DataflowRunner", "--project=p", "--region=europe-west1", "--temp_location=gs://b/tmp"]
    assert run_mod.split_beam_args(dataflow) == dataflow


def test_beam_options_reach_the_runner_inside_run(tmp_path, monkeypatch):
    """The pipeline ``run()`` builds for preprocessing, captured as it is made (then stopped): its runner and the
    options it will hand that runner (``Pipeline.run`` passes ``pipeline.options`` to ``run_pipeline``)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from pipeline.beam import preprocess

    seen = []
    real = preprocess.make_pipeline

    class Stop(Exception):
        pass

    def capture(beam_args=None):
        p = real(beam_args)
        shutil.rmtree(p.local_tempdir)
        options = p.options
        seen.append((type(p.runner).__name__, options.view_as(StandardOptions).runner,
                     options.view_as(DirectOptions).direct_num_workers,
                     options.view_as(DirectOptions).direct_running_mode, options.get_all_options()["job_name"]))
        raise Stop

    monkeypatch.setattr(preprocess, "make_pipeline", capture)
    with pytest.raises(Stop):
        run_mod.run(["--rows", "200", "--work-dir", str(tmp_path), "--direct_num_workers=2",
                     "--direct_running_mode=multi_threading", "--job_name=rankline-options-check"])
    assert seen == [("FnApiRunner", "DirectRunner", 2, "multi_threading", "rankline-options-check")]


def test_direct_runner_is_local_and_other_runners_are_beams():
    pipelines = [make_pipeline(["--runner=DirectRunner"]), make_pipeline([]),
                 make_pipeline(["--runner=FlinkRunner", "--flink_master=localhost:8081"])]
    for p in pipelines:  # Beam removes a pipeline's local temp dir only when it runs; these never do
        shutil.rmtree(p.local_tempdir)
    runners = [type(p.runner).__name__ for p in pipelines]
    assert runners == ["FnApiRunner", "FnApiRunner", "FlinkRunner"]  # never the network-fetching Prism path


def test_users_and_items_reach_the_generator(tmp_path):
    """--users/--items set how many events each user and item has; they are part of the data's identity."""
    import json

    args, _ = run_mod.build_parser().parse_known_args(["--rows", "1000", "--users", "50", "--items", "30"])
    schema, info = run_mod.resolve_schema(args, str(tmp_path), {})
    with open(os.path.join(info["dir"], "_MANIFEST.json")) as fh:
        manifest = json.load(fh)
    assert (manifest["config"]["users"], manifest["config"]["items"], manifest["rows"]) == (50, 30, 1000)
    import pyarrow.parquet as pq

    table = pq.read_table(schema.input.files())
    assert len(set(table.column("user_id").to_pylist())) <= 50
    assert len(set(table.column("item_id").to_pylist())) <= 30
    default, _ = run_mod.build_parser().parse_known_args(["--rows", "1000"])
    _, default_info = run_mod.resolve_schema(default, str(tmp_path), {})
    assert default_info["dir"] != info["dir"]


@pytest.mark.parametrize("reused", [False, True])
def test_summary_says_when_preprocessing_was_reused_and_how_to_redo_it(capsys, reused):
    pp = dict(rows_in=10, rows_train=7, rows_eval=2, rows_test=0, rows_rejected=1, reused=reused)
    run_mod._print_summary({"model": "esm2", "preprocess": pp, "export": "/x", "scored": [],
                            "timings_s": {"train": 1.0}, "total_s": 2.0}, "report")
    line = capsys.readouterr().out.splitlines()[2]
    assert "rows in 10: train 7  eval 2  test 0  rejected 1" in line
    assert ("--no-reuse-preprocessed" in line) is reused


def test_no_lifecycle_stages_reaches_the_generator_config():
    args, _ = run_mod.build_parser().parse_known_args(["--rows", "1000", "--no-lifecycle-stages", "--users", "40"])
    cfg = run_mod.builtin_generator_config(args)
    assert (cfg.rows, cfg.users, cfg.lifecycle_stages, cfg.daction_informative) == (1000, 40, False, True)
    default, _ = run_mod.build_parser().parse_known_args(["--rows", "1000"])
    assert run_mod.builtin_generator_config(default).lifecycle_stages
    assert run_mod.builtin_generator_config(default).scenario_taste == 0.0
    tasted, _ = run_mod.build_parser().parse_known_args(["--rows", "1000", "--scenario-taste", "0.7"])
    assert run_mod.builtin_generator_config(tasted).scenario_taste == 0.7
