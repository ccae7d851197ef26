"""Data checks: statistics against numpy, and the anomalies of a broken partition found and named, while a clean
partition of the same generator passes."""
import dataclasses

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest

from pipeline.beam import data_checks as dc
from pipeline.datagen import GeneratorConfig, generate_blocks
from pipeline.beam.sources import canonical_columns
from transforms.features import BUILTIN
from transforms.schema import ValidationSpec


def _batches(part: int, edit=None):
    """Canonical RecordBatches of one 60k-row built-in log (masked values -> nulls): its even blocks (``part``
    0, the training data) or its odd ones (1, a clean partition of the same world); ``edit(block)`` breaks them."""
    types = canonical_columns(BUILTIN)
    out = []
    for block in list(generate_blocks(GeneratorConfig(rows=60_000, seed=0)))[part::2]:
        if edit is not None:
            edit(block)
        arrays, names = [], []
        for name, t in types.items():
            if name not in block:
                continue
            v = block[name]
            mask = np.ma.getmaskarray(v) if np.ma.isMaskedArray(v) else None
            arrays.append(pa.array(np.ma.getdata(v).tolist(), type=t, mask=mask))
            names.append(name)
        out.append(pa.RecordBatch.from_arrays(arrays, names))
    return out


def _stats(batches, name="train", boundaries=None, pieces=3):
    """The CombineFn as a runner uses it: several accumulators, merged."""
    fn = dc.StatisticsFn(BUILTIN, name, boundaries)
    accs = []
    for k in range(pieces):
        acc = fn.create_accumulator()
        for b in batches[k::pieces]:
            acc = fn.add_input(acc, b)
        accs.append(acc)
    return fn.extract_output(fn.merge_accumulators(accs))


@pytest.fixture(scope="module")
def train():
    batches = _batches(0)
    return batches, _stats(batches)


def test_statistics_against_numpy(train):
    batches, stats = train
    table = pa.Table.from_batches(batches)
    feats = dc.features_by_name(stats)
    assert stats.datasets[0].num_examples == table.num_rows
    x = np.asarray(table.column("item_price").drop_null().to_numpy(), dtype=np.float64)
    f = feats["item_price"]
    assert f.num_stats.common_stats.num_missing == table.column("item_price").null_count > 0
    assert f.num_stats.common_stats.num_non_missing == len(x)
    np.testing.assert_allclose([f.num_stats.mean, f.num_stats.std_dev, f.num_stats.min, f.num_stats.max],
                               [x.mean(), x.std(), x.min(), x.max()], rtol=1e-6)
    # histogram: the sketch's boundaries are near the deciles, and the counts are the exact counts over them
    edges, mass = dc.histogram(f)
    exact = np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(edges) + 1) / len(x)
    np.testing.assert_allclose(mass, exact, atol=0.01)
    np.testing.assert_allclose(edges, np.quantile(x, np.arange(1, 10) / 10)[:len(edges)], rtol=0.05)
    click = np.asarray(table.column("click").to_numpy(), dtype=float)
    assert feats["click"].num_stats.mean == pytest.approx(click.mean())
    cat = table.column("item_category").to_pylist()
    values, counts = np.unique([v for v in cat if v is not None], return_counts=True)
    top = feats["item_category"].string_stats
    assert top.top_values[0].value == values[np.argmax(counts)]
    assert top.top_values[0].frequency == pytest.approx(counts.max())
    assert top.unique == pytest.approx(len(values), rel=0.1)


def _anomalies(train, edit=None, spec=ValidationSpec(), **kwargs):
    _, ref = train
    cur = _stats(_batches(1, edit=edit), "partition", boundaries=dc.boundaries(ref))
    return dc.compare(ref, cur, spec, BUILTIN, **kwargs)


def test_clean_partition_of_the_same_generator_passes(train):
    assert _anomalies(train) == []


def test_label_feed_that_stops_is_blocking_and_named(train):
    def stop(block):
        block["cart"] = np.zeros_like(block["cart"])
    anomalies = _anomalies(train, stop)
    assert [(a.check, a.column, a.blocking) for a in anomalies] == [("label_rate", "cart", True)]
    with pytest.raises(dc.DataCheckFailed, match=r"label_rate cart: positive rate 0\.0000 vs 0\.0\d+ in the reference"):
        raise dc.DataCheckFailed(anomalies)
    # the z figure recomputed: pooled two-proportion test of the reference's rate against 0
    _, ref = train
    f = dc.features_by_name(ref)["cart"].num_stats
    n0, p0 = f.common_stats.num_non_missing, f.mean
    n1 = sum(b.num_rows for b in _batches(1))
    pooled = p0 * n0 / (n0 + n1)
    z = p0 / np.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    assert f"z = {z:.1f}" in anomalies[0].detail


def test_label_rate_check_needs_both_the_factor_and_significance():
    from tensorflow_metadata.proto.v0 import statistics_pb2

    def label(rate, n):
        f = statistics_pb2.FeatureNameStatistics()
        f.num_stats.mean, f.num_stats.common_stats.num_non_missing = rate, n
        return f

    spec = ValidationSpec()  # factor 0.8: outside [0.2 p0, 5 p0]; z > 4
    assert dc._label_rate_shift(label(0.01, 50_000), label(0.003, 50_000), spec) is None    # x0.3: inside
    assert dc._label_rate_shift(label(0.01, 50_000), label(0.001, 50_000), spec)            # x0.1, z ~ 8.5
    assert dc._label_rate_shift(label(0.01, 300), label(0.0, 300), spec) is None            # x0, z ~ 1.7: noise
    assert dc._label_rate_shift(label(0.001, 50_000), label(0.006, 50_000), spec)           # x6, significant


def test_shifted_numeric_distribution_is_found(train):
    def shift(block):
        block["item_price"] = block["item_price"] * 3.0
    anomalies = _anomalies(train, shift)
    drift = [a for a in anomalies if a.check == "drift"]
    assert [a.column for a in drift] == ["item_price"] and not drift[0].blocking
    # x3 prices: the training buckets' masses recomputed with numpy from the shifted values
    _, ref = train
    edges, mass = dc.histogram(dc.features_by_name(ref)["item_price"])
    shifted = np.concatenate([np.asarray(b.column("item_price").drop_null().to_numpy(), dtype=np.float64)
                              for b in _batches(1, edit=shift)])
    q = np.bincount(np.searchsorted(edges, shifted, side="left"), minlength=len(edges) + 1) / len(shifted)
    assert drift[0].value == pytest.approx(np.max(np.abs(q - mass)))
    assert drift[0].value > 0.15
    p, q = np.array([0.5, 0.5]), np.array([0.2, 0.8])
    assert dc.linf(p, q) == pytest.approx(0.3)
    assert dc.psi(p, q) == pytest.approx(0.3 * np.log(2.5) + 0.3 * np.log(1.6))


def test_missing_column_and_missing_values_are_blocking(train):
    def drop(block):
        del block["item_brand"]
    columns = list(canonical_columns(BUILTIN))
    anomalies = _anomalies(train, drop, reference_columns=columns,
                           current_columns=[c for c in columns if c != "item_brand"] + ["promo_code"])
    found = {(a.check, a.column): a.blocking for a in anomalies}
    assert found == {("missing_column", "item_brand"): True, ("new_column", "promo_code"): False,
                     ("missing_rate", "item_brand"): True}


def test_reject_and_oov_rates_and_thresholds_from_the_spec(train):
    spec = dataclasses.replace(ValidationSpec(), blocking=("oov_rate",))
    anomalies = _anomalies(train, spec=spec, reference_reject_rate=0.01, current_reject_rate=0.2,
                           reference_oov={"item_id": 0.05}, current_oov={"item_id": 0.30, "user_id": 0.1})
    found = {(a.check, a.column): a.blocking for a in anomalies}
    assert found == {("reject_rate", "(rows)"): False, ("oov_rate", "item_id"): True}
    assert "BLOCK  oov_rate" in dc.format_anomalies(anomalies)


def test_statistics_in_a_beam_pipeline(train, tmp_path):
    batches, ref = train
    with beam.Pipeline() as p:
        _ = (p | beam.Create(batches[:4]) | beam.CombineGlobally(dc.StatisticsFn(BUILTIN, "train"))
             | beam.Map(dc.write_statistics, str(tmp_path / "stats.pb")))
    stats = dc.read_statistics(str(tmp_path / "stats.pb"))
    rows = sum(b.num_rows for b in batches[:4])
    assert stats.datasets[0].num_examples == rows
    clicks = sum(int(np.sum(b.column("click").to_numpy())) for b in batches[:4])
    assert dc.features_by_name(stats)["click"].num_stats.mean == pytest.approx(clicks / rows)
