"""Per-user features across log partitions: starting each partition from the saved per-user state gives what
one run over the concatenated partitions gives."""
import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest

from pipeline import datagen
from pipeline.beam import sources
from pipeline.beam import user_features as U
from transforms import features as F
from transforms.features import BUILTIN
from transforms.schema import builtin_schema_path, load_schema

UF = (F.UF_COUNT, F.uf_rate(F.CLICK), F.uf_rate(F.DACTION), F.uf_rate(F.PURCHASE), F.UF_IN_HISTORY,
      F.UF_REPEAT_RATIO, F.UF_HISTORY)


def test_state_carried_over_a_split_equals_one_pass():
    rng = np.random.default_rng(3)
    n = 60
    rows = {"timestamp": np.arange(n), "click": (rng.random(n) < 0.4).astype(int),
            "cart": (rng.random(n) < 0.2).astype(int), "wish": (rng.random(n) < 0.1).astype(int),
            "purchase": (rng.random(n) < 0.1).astype(int), "item_id": list(rng.integers(0, 6, n))}
    whole = U.compute_user_features(rows, BUILTIN)
    for k in (1, 17, 59):
        first, state = U.compute_user_features_and_state({c: v[:k] for c, v in rows.items()}, BUILTIN)
        second, after = U.compute_user_features_and_state({c: v[k:] for c, v in rows.items()}, BUILTIN, state)
        for name in whole:
            assert first[name] + second[name] == whole[name], (k, name)
        assert after["n"] == n and after["clicks"] == int(rows["click"].sum())
    # the state is what a literal count gives: label sums and the clicked items
    _, state = U.compute_user_features_and_state(rows, BUILTIN)
    assert state["sums"][F.uf_rate(F.PURCHASE)] == rows["purchase"].sum()
    assert state["clicked"] == sorted({str(i) for i, c in zip(rows["item_id"], rows["click"]) if c})


def _save(batch, out_dir):
    import uuid

    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_batches([batch]), os.path.join(out_dir, f"{uuid.uuid4().hex}.parquet"))


def _run(schema, files, states_in=None, states_out=None):
    """Reads ``files`` and adds per-user features (from ``states_in`` when given); returns the rows as a table."""
    import tempfile

    import pyarrow.parquet as pq

    out_dir = tempfile.mkdtemp(dir=os.environ.get("PYTEST_TMP", None))
    with beam.Pipeline() as p:
        rows = (p | beam.Create([tuple(f) for f in files])
                | beam.ParDo(sources.ReadFile(schema, 2_000)).with_outputs(sources.REJECTED, sources.STATS,
                                                                             main="rows")).rows
        if states_in is None and states_out is None:
            rows = U.add_user_features(rows, BUILTIN)
        else:
            states = U.read_states(p, states_in or "/nonexistent/none-*")
            rows, after = U.add_user_features_with_state(rows, states, BUILTIN)
            U.write_states(after, states_out)
        _ = rows | beam.Map(_save, out_dir)
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(out_dir, "*.parquet")))])
    import shutil

    shutil.rmtree(out_dir)
    return table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending"),
                          (F.UF_COUNT, "ascending")])


def test_partitions_with_carried_state_equal_one_run_over_their_concatenation(tmp_path):
    cfg = datagen.GeneratorConfig(rows=6_000, seed=1, days=3, users=150, items=60)
    datagen.write_partitions(cfg, str(tmp_path / "days"), progress=False)
    pattern = str(tmp_path / "days" / "day-*" / "*.parquet")
    schema = load_schema(builtin_schema_path("builtin"), input_path=pattern)
    whole = _run(schema, sources.plan_files(schema))
    parts, state = [], None
    for day in (1, 2, 3):
        day_schema = load_schema(builtin_schema_path("builtin"),
                                 input_path=str(tmp_path / "days" / f"day-{day:02d}" / "*.parquet"))
        prefix = str(tmp_path / f"state-{day}" / "part")
        parts.append(_run(day_schema, sources.plan_files(day_schema), state, prefix))
        state = prefix + "-*.jsonl"
        assert glob.glob(state)
    joined = pa.concat_tables(parts).sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                                              ("item_id", "ascending"), (F.UF_COUNT, "ascending")])
    assert joined.num_rows == whole.num_rows == 6_000
    for name in UF + ("user_id", "timestamp", "item_id"):
        assert joined.column(name).to_pylist() == whole.column(name).to_pylist(), name
    # the carried state mattered: day 3 alone (no state) gives other features
    alone = _run(load_schema(builtin_schema_path("builtin"),
                             input_path=str(tmp_path / "days" / "day-03" / "*.parquet")),
                 sources.plan_files(load_schema(builtin_schema_path("builtin"),
                                                input_path=str(tmp_path / "days" / "day-03" / "*.parquet"))))
    assert alone.column(F.UF_COUNT).to_pylist() != parts[2].column(F.UF_COUNT).to_pylist()
    # every user seen so far has a state after day 3 (users absent from day 3 carried unchanged)
    import json

    users = {json.loads(line)["user"] for f in glob.glob(state) for line in open(f)}
    assert users == {str(u) for u in whole.column("user_id").to_pylist()}
