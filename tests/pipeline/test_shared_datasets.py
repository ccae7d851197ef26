"""Every dataset in ../shared/data is preprocessed from its hand-written schema file (Beam + tensorflow-transform,
as ``pipeline.run`` does), every record landing in exactly one place. Training, export and scoring of every
shared dataset run once, on its drafted schema (tests/pipeline/test_infer_schema.py), whose labels are checked
there to be this schema's: one end-to-end run per dataset instead of two."""
import glob
import os

import pytest

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


def check_records_on_disk(pp, out, lines):
    """Every one of the ``lines`` input records is in exactly one place, counted on disk in the preprocessing
    output dir ``out``: a split's shards or the dead letter; ``pp`` (the preprocessing summary) counts the same."""
    assert pp["rows_in"] == lines
    records = {s: rows_on_disk(glob.glob(os.path.join(out, "data", s, "part-*"))) for s in ("train", "eval", "test")}
    rejected = 0
    for path in glob.glob(os.path.join(out, "rejected", "part*")):
        with open(path) as fh:
            rejected += sum(1 for line in fh if line.strip())
    assert sum(records.values()) + rejected == lines
    assert {s: pp[f"rows_{s}"] for s in records} == records and pp["rows_rejected"] == rejected
    assert pp["rows_train"] > 0 and pp["rows_eval"] > 0


@pytest.mark.parametrize("name", SHARED)
def test_shared_dataset_preprocesses_every_record_into_one_place(name, tmp_path):
    from pipeline.beam.preprocess import PreprocessConfig, preprocess_or_reuse

    schema = load_schema(os.path.join(SCHEMA_DIR, f"{name}.yaml"))
    out = str(tmp_path / "preprocessed")
    # pipeline.run's preprocessing stage with its defaults (gzip level 1, no reject bound), without the training
    pp = preprocess_or_reuse(schema, PreprocessConfig(output_dir=out, compression_level=1), ["--runner=DirectRunner"],
                             reuse=False)
    check_records_on_disk(pp, out, data_lines(schema))
    assert schema.contract.labels.transformed in EXPECTED_MODEL  # the model the drafted schema's run must pick
