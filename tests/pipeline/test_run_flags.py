"""``pipeline.run``'s --train-metrics, --steps-per-execution and --user-chunk-rows reach the stage configs (and the
resolved config)."""
import json

import pytest

from pipeline import run as R
from pipeline.beam import preprocess as P


class _Stop(Exception):
    pass


def _configs(tmp_path, monkeypatch, *flags):
    seen = {}

    def fake(schema, cfg, beam_args, reuse=True):
        seen["pp"] = cfg
        raise _Stop

    monkeypatch.setattr(P, "preprocess_or_reuse", fake)
    work = tmp_path / "w"
    with pytest.raises(_Stop):
        R.run(["--rows", "200", "--work-dir", str(work), "--no-tensorboard", *flags])
    resolved = json.loads((work / "config.json").read_text())
    return seen["pp"], resolved


def test_flags_reach_the_preprocess_and_train_configs(tmp_path, monkeypatch):
    pp, resolved = _configs(tmp_path, monkeypatch, "--train-metrics", "auc", "--user-chunk-rows", "1234",
                            "--steps-per-execution", "3")
    assert pp.user_chunk_rows == 1234 and resolved["preprocess"]["user_chunk_rows"] == 1234
    assert resolved["train"]["train_metrics"] == "auc" and resolved["train"]["steps_per_execution"] == 3


def test_defaults_without_the_flags(tmp_path, monkeypatch):
    pp, resolved = _configs(tmp_path, monkeypatch)
    assert pp.user_chunk_rows == 1_000_000 and resolved["train"]["train_metrics"] == "loss"
    assert resolved["train"]["steps_per_execution"] is None  # decided by fit_model: 10 on one device, 1 under a strategy


def test_bad_user_chunk_rows_is_a_usage_error(tmp_path):
    with pytest.raises(R.UsageError, match="user_chunk_rows"):
        R.run(["--rows", "200", "--work-dir", str(tmp_path / "w"), "--user-chunk-rows", "0"])
