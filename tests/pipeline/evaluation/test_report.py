"""The benchmark report: aggregates over seeds, RelaImpr, markdown, plots, and the benchmark command end to end."""
import json
import os
import shutil

import numpy as np
import pytest

from pipeline.evaluation import evaluate as ev
from pipeline.evaluation import report as rp


def _eval_report(seed, quality):
    """A real evaluation report of scores whose informativeness is ``quality``."""
    rng = np.random.default_rng(seed)
    n = 4000
    p = rng.uniform(0.02, 0.5, n)
    y = (rng.random(n) < p).astype(np.int64)
    score = np.clip(quality * p + (1 - quality) * rng.random(n) * 0.5, 0, 1)
    labels = {"click": y, "true_ctr": p, ev.USER_KEY: rng.integers(0, 50, n),
              ev.SEGMENT_KEY: np.array(["x", "y"], dtype=object)[rng.integers(0, 2, n)]}
    return ev.evaluate({"ctr": score}, labels)


def test_aggregate_means_stds_and_rela_impr():
    runs = {"base": [_eval_report(s, 0.3) for s in range(3)], "better": [_eval_report(s, 0.9) for s in range(3)]}
    agg = rp.aggregate(runs, baseline="better")
    aucs = [r["ctr"]["auc"] for r in runs["base"]]
    stat = agg["summary"]["base"]["ctr"]["auc"]
    assert stat["mean"] == pytest.approx(np.mean(aucs)) and stat["std"] == pytest.approx(np.std(aucs))
    worst = [r["ctr"]["worst_segment"][1] for r in runs["base"]]
    assert agg["summary"]["base"]["ctr"]["worst_segment_auc"]["mean"] == pytest.approx(np.mean(worst))
    b = np.mean([r["ctr"]["auc"] for r in runs["better"]])
    assert agg["rela_impr"]["base"]["ctr"]["auc"] == pytest.approx(((np.mean(aucs) - 0.5) / (b - 0.5) - 1) * 100)
    assert agg["rela_impr"]["better"]["ctr"]["auc"] == pytest.approx(0.0)
    assert agg["rela_impr"]["base"]["ctr"]["auc"] < 0
    assert agg["oracle"]["ctr"]["auc"] == pytest.approx(runs["base"][0]["ctr"]["oracle_auc"])


def test_segments_are_aggregated_with_the_worst_segment_counted_per_seed():
    runs = {"base": [_eval_report(s, 0.3) for s in range(4)], "better": [_eval_report(s, 0.9) for s in range(2)]}
    seg = rp.aggregate(runs, baseline=None)["segments"]["ctr"]
    assert seg["names"] == ["x", "y"] and seg["rows"] == runs["better"][0]["ctr"]["segment_rows"]
    for model, reports in runs.items():
        for s in ("x", "y"):
            values = [r["ctr"]["segment_auc"][s] for r in reports]
            stat = seg["auc"][model][s]
            assert stat["mean"] == pytest.approx(np.mean(values)) and stat["std"] == pytest.approx(np.std(values))
        names = [r["ctr"]["worst_segment"][0] for r in reports]
        assert seg["worst"][model] == {s: names.count(s) for s in set(names)} and sum(seg["worst"][model].values()) \
            == len(reports)
    assert seg["oracle"] == runs["base"][0]["ctr"]["oracle"]["segment_auc"]
    md = rp.markdown({"models": list(runs), "seeds": [0, 1, 2, 3], "epochs": 1}, rp.aggregate(runs, None), [])
    table = md.split("## AUC per segment: ctr")[1].split("\n## ")[0]
    x = seg["auc"]["base"]["x"]
    assert f"| base | {x['mean']:.4f} ± {x['std']:.4f} |" in table and "*oracle*" in table, table
    assert f"x {seg['rows']['x']:,}" in table


def test_model_diagnostics_are_aggregated_and_tabled(tmp_path):
    runs = {"gprec": [dict(_eval_report(s, 0.8), diagnostics={"pair_cosine": c}) for s, c in enumerate((0.1, 0.3))],
            "dnn": [_eval_report(s, 0.5) for s in range(2)]}
    agg = rp.aggregate(runs, baseline="dnn")
    stat = agg["summary"]["gprec"][rp.DIAGNOSTICS]["pair_cosine"]
    assert stat["mean"] == pytest.approx(0.2) and stat["std"] == pytest.approx(0.1)
    assert rp.DIAGNOSTICS not in agg["summary"]["dnn"]
    rp.write_report({"dataset": "toy", "models": ["gprec", "dnn"], "seeds": [0, 1], "epochs": 1, "baseline": "dnn"},
                    runs, {}, str(tmp_path), plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "| gprec | 0.2000 ± 0.1000 |" in md and "Model diagnostics" in md
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["per_seed"]["gprec"][1][rp.DIAGNOSTICS] == {"pair_cosine": 0.3}


def test_write_report_produces_markdown_json_and_real_pngs(tmp_path):
    runs = {"a": [_eval_report(s, 0.5) for s in range(2)], "b": [_eval_report(s, 0.8) for s in range(2)]}
    histories = {m: [{"loss": [0.5, 0.4], "val_loss": [0.55, 0.5]}] * 2 for m in runs}
    result = {"dataset": "toy", "models": ["a", "b"], "seeds": [0, 1], "epochs": 2, "baseline": "a"}
    rp.write_report(result, runs, histories, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    mean_b = np.mean([r["ctr"]["auc"] for r in runs["b"]])
    assert f"{mean_b:.4f} ±" in md and "*oracle*" in md and "RelaImpr vs a" in md
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["per_seed"]["b"][1]["ctr"]["auc"] == pytest.approx(runs["b"][1]["ctr"]["auc"])
    assert set(payload["plots"]) == {"roc_ctr.png", "reliability_ctr.png", "segment_auc_ctr.png",
                                     "training_curves.png"}
    import matplotlib.image as mpimg

    for name in payload["plots"]:
        assert f"]({name})" in md
        img = mpimg.imread(tmp_path / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01, name   # not blank


def test_benchmark_command_writes_report_on_preprocessed_data(e2e_run, tmp_path, capsys):
    from pipeline import benchmark

    src = e2e_run["work_dir"]
    for sub in ("builtin-data", "preprocessed"):
        shutil.copytree(os.path.join(src, sub), tmp_path / sub)
    rc = benchmark.main(["--models", "esmm,esm2", "--seeds", "2", "--epochs", "1", "--rows", "6000",
                         "--batch-size", "256", "--work-dir", str(tmp_path), "--reuse-preprocessed",
                         "--baseline", "esmm"])
    assert rc == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["models"] == ["esmm", "esm2"] and payload["seeds"] == [0, 1]
    for model in ("esmm", "esm2"):
        per_seed = [s["ctr"]["auc"] for s in payload["per_seed"][model]]
        assert len(per_seed) == 2 and all(0.5 < a < 1 for a in per_seed)
        assert f"{np.mean(per_seed):.4f} ± {np.std(per_seed):.4f}" in out
    assert "ctavr" in payload["summary"]["esm2"] and "ctavr" not in payload["summary"]["esmm"]
    assert payload["oracle"]["ctr"]["auc"] > 0.5
    assert "worst_segment_auc" in payload["summary"]["esm2"]["ctr"]
    assert os.path.exists(tmp_path / "roc_cvr_entire.png") and os.path.exists(tmp_path / "training_curves.png")


def test_benchmark_with_deterministic_repeats_a_seeds_figures_exactly(e2e_run, tmp_path):
    from pipeline import benchmark

    work = tmp_path
    for sub in ("builtin-data", "preprocessed"):
        shutil.copytree(os.path.join(e2e_run["work_dir"], sub), work / sub)
    reports, configs = [], []
    # the second run reuses the first one's preprocessing (the copy's paths differ); the third overrides the
    # learning rate, which must reach the model (a different result) and the report
    for extra in ([], [], ["--learning-rate", "0.0002"]):
        assert benchmark.main(["--models", "dnn", "--seeds", "1", "--epochs", "1", "--rows", "6000",
                               "--batch-size", "256", "--work-dir", str(work), "--reuse-preprocessed",
                               "--no-plots", "--deterministic"] + extra) == 0
        payload = json.loads((work / "report.json").read_text())
        reports.append(payload["per_seed"]["dnn"][0]["ctr"])
        configs.append(payload["configs"]["dnn"])
    assert reports[0]["auc"] == reports[1]["auc"] and reports[0]["logloss"] == reports[1]["logloss"]
    assert reports[2]["logloss"] != reports[0]["logloss"]
    from models import registry

    assert configs[0]["learning_rate"] == registry.resolve_config("dnn").learning_rate != 0.0002
    assert configs[2]["learning_rate"] == 0.0002 and configs[2]["batch_size"] == 256


def test_benchmark_rejects_a_bad_learning_rate(capsys):
    from pipeline import benchmark

    assert benchmark.main(["--models", "dnn", "--learning-rate", "-1"]) == 2
    assert "learning_rate must be > 0" in capsys.readouterr().err


def test_benchmark_rejects_a_baseline_outside_the_models(capsys):
    from pipeline import benchmark

    assert benchmark.main(["--models", "esm2", "--baseline", "dnn"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_benchmark_model_specs_take_an_optional_preset(capsys):
    from pipeline import benchmark

    assert benchmark.parse_spec("gprec:ensemble") == ("gprec", "ensemble")
    assert benchmark.parse_spec("esm2", "paper") == ("esm2", "paper")
    assert benchmark.main(["--models", "esm2:nosuchpreset"]) == 2
    assert "nosuchpreset" in capsys.readouterr().err
    assert benchmark.main(["--models", "nosuchmodel"]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
