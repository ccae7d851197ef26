"""The Beam stage on the multi-process DirectRunner, with a three-way time split checked against numpy."""
import glob
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline import datagen
from pipeline.beam.preprocess import PreprocessConfig, run_preprocess
from transforms.preprocessing import build_preprocessing_fn
from transforms.schema import builtin_schema_path, load_schema
from tests.pipeline.beam.shard_rows import rows_on_disk


@pytest.mark.parametrize("beam_args", [["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                        "--direct_num_workers=2"]])
def test_multiprocess_runner_time_split_three_ways(tmp_path, beam_args):
    data = str(tmp_path / "data")
    datagen.write_parquet(datagen.GeneratorConfig(rows=3000, seed=5, rows_per_file=1000), data, progress=False)
    schema = load_schema(builtin_schema_path("builtin"), input_path=os.path.join(data, "part-*.parquet"))
    schema = replace(schema, split=replace(schema.split, eval_fraction=0.2, test_fraction=0.1))
    summary = run_preprocess(schema, PreprocessConfig(output_dir=str(tmp_path / "out")),
                             build_preprocessing_fn(schema.contract), beam_args)
    ts = pd.concat([pd.read_parquet(f) for f in glob.glob(os.path.join(data, "*.parquet"))]).timestamp.to_numpy()
    lo, hi = ts.min(), ts.max()
    eval_cut, test_cut = lo + (hi - lo) * 0.7, lo + (hi - lo) * 0.9
    assert summary["rows_in"] == 3000 and summary["rows_rejected"] == 0
    assert summary["rows_train"] == int(np.sum(ts < eval_cut))
    assert summary["rows_eval"] == int(np.sum((ts >= eval_cut) & (ts < test_cut)))
    assert summary["rows_test"] == int(np.sum(ts >= test_cut))
    for split in ("train", "eval", "test"):  # the records in each split's shards, counted on disk
        files = glob.glob(os.path.join(str(tmp_path / "out"), "data", split, "part-*"))
        assert rows_on_disk(files) == summary[f"rows_{split}"]
    assert set(summary["oov_rate"]) == {"eval", "test"}
    assert summary["oov_rate"]["test"]["user_gender"] == 0.0  # every gender is seen in training
