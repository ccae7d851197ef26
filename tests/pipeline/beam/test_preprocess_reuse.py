"""A completed preprocessing run is reused only when its inputs, schema, options and code are unchanged, and a
failed or interrupted run is never reused."""
import glob
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from pipeline.beam import preprocess
from pipeline.beam.preprocess import (DONE_FILE, PreprocessConfig, TooManyRejected, preprocess_fingerprint,
                                 preprocess_or_reuse, reusable_summary, run_preprocess)
from transforms.preprocessing import build_preprocessing_fn
from transforms.schema import parse_schema
from tests.pipeline.beam.shard_rows import rows_on_disk

SCHEMA_DOC = {
    "name": "reuse",
    "input": {"path": "PLACEHOLDER", "format": "csv"},
    "roles": {"user_id": "user", "timestamp": {"column": "ts", "format": "unix"}},
    "labels": {"click": "click"},
    "features": [
        {"name": "user", "type": "int", "transform": "vocabulary"},
        {"name": "cat", "transform": "vocabulary"},
        {"name": "price", "type": "float", "transform": "numeric", "buckets": 3},
    ],
    "split": {"kind": "hash", "key": "user", "eval_fraction": 0.3},
}


def _schema(path, **split):
    doc = dict(SCHEMA_DOC, input={"path": path, "format": "csv"})
    if split:
        doc["split"] = dict(SCHEMA_DOC["split"], **split)
    return parse_schema(doc, "/x/reuse.yaml")


def _write(path, rows, bad=0):
    lines = ["user,cat,price,ts,click"]
    lines += [f"{i % 7},c{i % 3},{1.5 + i},{1_700_000_000 + i},{i % 2}" for i in range(rows)]
    lines += [f"x{i},c0,1.0,{1_700_000_000 + i},1" for i in range(bad)]  # wrong type: rejected
    path.write_text("\n".join(lines) + "\n")


class _RetriedMetrics:
    """What a runner that ran every bundle twice (a retry) reports: attempted counters doubled, and no
    committed value (many runners have none)."""

    def __init__(self, metrics):
        self._metrics = metrics

    def query(self, filter=None):
        from apache_beam.metrics.execution import MetricResult

        got = self._metrics.query(filter)
        got["counters"] = [MetricResult(c.key, None, 2 * c.attempted) for c in got["counters"]]
        return got


class _RetriedResult:
    def __init__(self, result):
        self._result = result

    def wait_until_finish(self, duration=None):
        return self._result.wait_until_finish(duration)

    def metrics(self):
        return _RetriedMetrics(self._result.metrics())


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One run, on a runner whose metrics double-count (as retried bundles would): the summary must not care."""
    d = tmp_path_factory.mktemp("reuse")
    _write(d / "a.csv", 40)
    schema = _schema(str(d / "*.csv"))
    cfg = PreprocessConfig(output_dir=str(d / "out"))
    real = preprocess.make_pipeline

    def retrying(beam_args=None):
        p = real(beam_args)
        p.run = lambda *a, **k: _RetriedResult(type(p).run(p, *a, **k))
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preprocess, "make_pipeline", retrying)
        summary = run_preprocess(schema, cfg, build_preprocessing_fn(schema.contract), ["--runner=DirectRunner"])
    return {"dir": d, "schema": schema, "cfg": cfg, "summary": summary}


def test_counts_come_from_the_outputs_not_the_runners_metrics(done):
    """40 rows, users i % 7, hash split on the user (eval 0.3): the split worked out here with BLAKE2b (8-byte
    digest, big-endian / 2**64 < 0.3 -> eval), and each split's records counted in its published shards. The
    old summary took the runner's attempted counters and reported 80 rows in."""
    def u(key):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64

    expected_eval = sum(1 for i in range(40) if u(str(i % 7)) < 0.3)
    s = done["summary"]
    assert (s["rows_in"], s["rows_eval"], s["rows_train"], s["rows_test"], s["rows_rejected"]) == \
        (40, expected_eval, 40 - expected_eval, 0, 0)
    for split in ("train", "eval"):
        files = glob.glob(os.path.join(done["cfg"].output_dir, "data", split, "part-*"))
        assert rows_on_disk(files) == s[f"rows_{split}"]


def test_an_unchanged_run_is_reused_with_its_summary(done):
    got = reusable_summary(done["schema"], done["cfg"])
    assert got == json.loads(json.dumps(done["summary"]))  # as recorded on disk
    assert got["rows_in"] == 40


def test_a_new_process_computes_the_same_fingerprint(done):
    """What a restarted job does: parse the schema again and fingerprint it, in a fresh interpreter (its own
    string-hash salt, import order and object ids) - the fingerprint must be the recorded one."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = ("from pipeline.beam.preprocess import PreprocessConfig, preprocess_fingerprint\n"
            "from tests.pipeline.beam.test_preprocess_reuse import _schema\n"
            f"print(preprocess_fingerprint(_schema({done['schema'].input.path!r}), "
            f"PreprocessConfig(output_dir={done['cfg'].output_dir!r})))\n")
    env = dict(os.environ, PYTHONHASHSEED="random", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(done["cfg"].output_dir, DONE_FILE)) as fh:
        recorded = json.load(fh)["fingerprint"]
    assert proc.stdout.strip().splitlines()[-1] == recorded == preprocess_fingerprint(done["schema"], done["cfg"])


def test_any_change_of_inputs_schema_or_options_makes_it_stale(done):
    schema, cfg = done["schema"], done["cfg"]
    assert reusable_summary(schema, replace(cfg, compression_level=6)) is None
    assert reusable_summary(_schema(schema.input.path, eval_fraction=0.2), cfg) is None
    assert reusable_summary(replace(schema, name="other"), cfg) is None
    assert reusable_summary(schema, replace(cfg, output_dir=cfg.output_dir + "-elsewhere")) is None  # nothing there
    extra = done["dir"] / "b.csv"
    _write(extra, 5)  # a new input file
    try:
        assert reusable_summary(schema, cfg) is None
    finally:
        extra.unlink()
    assert reusable_summary(schema, cfg) is not None
    a = done["dir"] / "a.csv"
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # rewritten in place (same size)
    try:
        assert reusable_summary(schema, cfg) is None
    finally:
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reusable_summary(schema, cfg) is not None


def test_preprocess_or_reuse_runs_only_when_there_is_nothing_to_reuse(done, monkeypatch, caplog):
    calls = []

    def fake_run(schema, cfg, preprocessing_fn, beam_args=None):
        calls.append((cfg.output_dir, beam_args, callable(preprocessing_fn)))
        return {"rows_in": -1}

    monkeypatch.setattr(preprocess, "run_preprocess", fake_run)
    schema, cfg = done["schema"], done["cfg"]
    caplog.set_level("INFO", logger="pipeline.beam.preprocess")
    got = preprocess_or_reuse(schema, cfg, ["--runner=DirectRunner"])
    assert calls == [] and got["reused"] is True and got["rows_in"] == 40
    assert "reusing the completed run in " + cfg.output_dir in caplog.text
    stale = replace(cfg, compression_level=6)
    assert preprocess_or_reuse(schema, stale, ["--runner=DirectRunner"]) == {"rows_in": -1}
    assert "holds no completed run" in caplog.text
    assert preprocess_or_reuse(schema, cfg, ["--runner=DirectRunner"], reuse=False) == {"rows_in": -1}
    assert calls == [(stale.output_dir, ["--runner=DirectRunner"], True), (cfg.output_dir, ["--runner=DirectRunner"], True)]


def test_missing_outputs_or_a_damaged_record_are_not_reused(tmp_path, done):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(done["cfg"].output_dir, out)
    cfg = replace(done["cfg"], output_dir=str(out))
    assert reusable_summary(done["schema"], cfg) is not None  # a moved output directory is still reusable
    (out / DONE_FILE).write_text("{not json")
    assert reusable_summary(done["schema"], cfg) is None
    shutil.copy(os.path.join(done["cfg"].output_dir, DONE_FILE), out / DONE_FILE)
    shutil.rmtree(out / "data" / "train")
    assert reusable_summary(done["schema"], cfg) is None


def test_a_failed_run_clears_the_record_of_the_earlier_success(tmp_path):
    """The first run succeeds; the second, on changed input, fails (too many rejects) after rewriting the
    outputs: they must not be reused."""
    _write(tmp_path / "a.csv", 30)
    schema = _schema(str(tmp_path / "*.csv"))
    cfg = PreprocessConfig(output_dir=str(tmp_path / "out"), max_reject_fraction=0.1)
    run_preprocess(schema, cfg, build_preprocessing_fn(schema.contract), ["--runner=DirectRunner"])
    assert reusable_summary(schema, cfg) is not None
    _write(tmp_path / "a.csv", 30, bad=10)
    with pytest.raises(TooManyRejected):
        run_preprocess(schema, cfg, build_preprocessing_fn(schema.contract), ["--runner=DirectRunner"])
    assert not os.path.exists(os.path.join(cfg.output_dir, DONE_FILE))
    assert reusable_summary(schema, cfg) is None  # the failed run's outputs, for the input it failed on


def test_the_e2e_run_would_be_reused_by_the_same_command(e2e_run):
    """What ``pipeline.run`` checks on a restart: the schema resolved as it resolves it, the default options."""
    from pipeline.run import build_parser, resolve_schema

    work = e2e_run["work_dir"]
    args, _ = build_parser().parse_known_args(["--rows", "6000", "--work-dir", work])
    schema, _ = resolve_schema(args, work, {})
    cfg = PreprocessConfig(output_dir=os.path.join(work, "preprocessed"))
    got = reusable_summary(schema, cfg)
    assert got is not None and got["rows_in"] == e2e_run["summary"]["preprocess"]["rows_in"] == 6000
    assert reusable_summary(schema, replace(cfg, compression_level=9)) is None
