"""Every dataset in ../shared/data runs from its schema file through preprocessing, training and export."""
import glob
import math
import os

import pytest

from pipeline import run as run_mod
from transforms.schema import SCHEMA_DIR, load_schema
from tests.pipeline.beam.shard_rows import rows_on_disk

SHARED = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SCHEMA_DIR, "*.yaml"))
                if not p.endswith("builtin.yaml"))
EXPECTED_MODEL = {("click",): "dnn", ("click", "purchase"): "esmm", ("click", "daction", "purchase"): "esm2"}


def data_lines(schema):
    """Records in the input files, counted independently of the reader (non-empty lines less headers)."""
    total = 0
    for path in schema.input.files():
        with open(path, "rb") as fh:
            lines = [line for line in fh.read().splitlines() if line.strip()]
        header = schema.input.csv.header
        if header is True or (header == "auto" and lines and
                              lines[0].decode().split(schema.input.csv.delimiter) == list(schema.input.csv.columns)):
            lines = lines[1:]
        total += len(lines)
    return total


@pytest.mark.parametrize("name", SHARED)
def test_shared_dataset_end_to_end(name, tmp_path):
    schema_path = os.path.join(SCHEMA_DIR, f"{name}.yaml")
    schema = load_schema(schema_path)
    summary = run_mod.run(["--schema", schema_path, "--epochs", "1", "--batch-size", "32", "--score-rows", "3",
                           "--work-dir", str(tmp_path)])
    pp = summary["preprocess"]
    lines = data_lines(schema)
    assert pp["rows_in"] == lines
    # every record is in exactly one place, counted on disk: a split's shards or the dead letter
    out = os.path.join(str(tmp_path), "preprocessed")
    records = {s: rows_on_disk(glob.glob(os.path.join(out, "data", s, "part-*"))) for s in ("train", "eval", "test")}
    rejected = 0
    for path in glob.glob(os.path.join(out, "rejected", "part*")):
        with open(path) as fh:
            rejected += sum(1 for line in fh if line.strip())
    assert sum(records.values()) + rejected == lines
    assert {s: pp[f"rows_{s}"] for s in records} == records and pp["rows_rejected"] == rejected
    assert pp["rows_train"] > 0 and pp["rows_eval"] > 0
    assert summary["model"] == EXPECTED_MODEL[schema.contract.labels.transformed]
    assert os.path.exists(os.path.join(summary["export"], "saved_model.pb"))
    assert summary["scored"]["ctr"] and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in summary["scored"]["ctr"])
    for key, values in summary["history"].items():
        assert all(math.isfinite(v) for v in values), key
