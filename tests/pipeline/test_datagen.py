import glob
import hashlib
import json
import os
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import datagen
from pipeline.datagen import GeneratorConfig


def _read(d):
    return pq.read_table(sorted(glob.glob(os.path.join(d, "part-*.parquet")))).to_pandas()


def _digest(d):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(d, "part-*.parquet"))):
        h.update(open(f, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    cfg = GeneratorConfig(rows=60_000, seed=3, rows_per_file=25_000)
    manifest = datagen.write_parquet(cfg, str(out), progress=False)
    return cfg, str(out), manifest, _read(str(out))


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    datagen.write_parquet(GeneratorConfig(rows=5_000, seed=11), a, progress=False)
    datagen.write_parquet(GeneratorConfig(rows=5_000, seed=11), b, progress=False)
    datagen.write_parquet(GeneratorConfig(rows=5_000, seed=12), c, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_files_rows_and_manifest(generated):
    cfg, out, manifest, df = generated
    assert len(df) == cfg.rows == manifest["rows"]
    assert manifest["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(os.path.join(out, f)).metadata.num_rows for f in manifest["files"]] == [25_000, 25_000, 10_000]
    assert df["timestamp"].is_monotonic_increasing


def test_label_rates_within_stated_ranges(generated):
    _, _, _, df = generated
    click = df.click == 1
    daction = (df.cart == 1) | (df.wish == 1)
    ctr = click.mean()
    da_given_click = daction[click].mean()
    buy_given_click = df.purchase[click].mean()
    buy_da = df.purchase[daction].mean()
    buy_no_da = df.purchase[click & ~daction].mean()
    assert 0.05 <= ctr <= 0.10, ctr
    assert 0.06 <= da_given_click <= 0.16, da_given_click
    assert 0.01 <= buy_given_click <= 0.035, buy_given_click
    assert buy_da > 3 * buy_no_da, (buy_da, buy_no_da)
    assert (df.staytime[click] > 0).all() and (df.staytime[~click] == 0).all()


def test_funnel_is_never_violated(generated):
    _, _, _, df = generated
    no_click = df.click == 0
    assert (df.cart[no_click] == 0).all() and (df.wish[no_click] == 0).all() and (df.purchase[no_click] == 0).all()


def test_true_probabilities_are_consistent_and_match_empirical_rates(generated):
    _, _, _, df = generated
    np.testing.assert_allclose(df.true_ctcvr, df.true_ctr * df.true_cvr, rtol=1e-5)
    assert (df.true_ctavr <= df.true_ctr + 1e-7).all()
    # Calibration: the mean true probability matches the observed rate within sampling error.
    n = len(df)
    for label, prob in (("click", "true_ctr"), ("purchase", "true_ctcvr")):
        p = df[prob].mean()
        assert abs(df[label].mean() - p) < 4 * np.sqrt(p * (1 - p) / n), label


def test_missing_values_and_heavy_tails(generated):
    _, _, _, df = generated
    for col in ("user_city", "item_brand", "item_price", "user_orders_90d"):
        assert 0.01 < df[col].isna().mean() < 0.06, col
    for col in ("click", "user_id", "item_id", "timestamp", "true_ctr"):
        assert df[col].notna().all(), col
    price = df.item_price.dropna()
    assert price.max() > 20 * price.median()  # heavy tailed: log1p helps
    top_share = df.item_category.value_counts(normalize=True).iloc[0]
    assert top_share > 3 / df.item_category.nunique()  # Zipf-skewed, not uniform


def test_planted_structures_are_present(generated):
    _, _, _, df = generated
    # Scenarios are latent but shape click preference; stages shift purchase propensity.
    by_scen = df.groupby("true_scenario").click.mean()
    assert by_scen.max() > 2 * by_scen.min()
    clicked = df[df.click == 1]
    by_stage = clicked.groupby("true_stage").purchase.mean()
    assert by_stage.loc[2] > 2 * by_stage.loc[0]
    # Repeat consumption: a good share of impressions re-show an item the user clicked before.
    seen, repeats = set(), 0
    for u, i, c in zip(df.user_id.values, df.item_id.values, df.click.values):
        repeats += (u, i) in seen
        if c:
            seen.add((u, i))
    assert repeats / len(df) > 0.05
    assert df.segment.nunique() == 4


def test_uninformative_daction_decouples_purchase(tmp_path):
    datagen.write_parquet(GeneratorConfig(rows=200_000, seed=3, daction_informative=False), str(tmp_path), progress=False)
    df = _read(str(tmp_path))
    click = df.click == 1
    daction = (df.cart == 1) | (df.wish == 1)
    ratio = df.purchase[daction].mean() / df.purchase[click & ~daction].mean()
    assert 0.5 < ratio < 2.0, ratio


def test_generation_streams_memory_does_not_grow_with_rows(tmp_path):
    def peak(rows):
        tracemalloc.start()
        datagen.write_parquet(GeneratorConfig(rows=rows, users=2_000, items=500, rows_per_file=20_000),
                              str(tmp_path / str(rows)), progress=False)
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    small, large = peak(40_000), peak(160_000)
    assert large < 1.5 * small, (small, large)


def test_ensure_builtin_reuses_matching_data(tmp_path):
    cfg = GeneratorConfig(rows=2_000, seed=1)
    first = datagen.ensure_builtin(cfg, str(tmp_path))
    second = datagen.ensure_builtin(cfg, str(tmp_path))
    assert first["reused"] is False and second["reused"] is True
    third = datagen.ensure_builtin(GeneratorConfig(rows=3_000, seed=1), str(tmp_path))
    assert third["reused"] is False and third["rows"] == 3_000


def test_config_validation():
    with pytest.raises(ValueError, match="rows"):
        GeneratorConfig(rows=0)
    with pytest.raises(ValueError, match="missing_rate"):
        GeneratorConfig(missing_rate=0.7)
    with pytest.raises(ValueError, match="items"):
        GeneratorConfig(items=0)


def test_fingerprint_changes_with_the_generator_version(monkeypatch):
    before = GeneratorConfig(rows=1000).fingerprint()
    assert GeneratorConfig(rows=1000).fingerprint() == before
    monkeypatch.setattr(datagen, "GENERATOR_VERSION", datagen.GENERATOR_VERSION + 1)
    assert GeneratorConfig(rows=1000).fingerprint() != before


def test_without_lifecycle_stages_every_user_stays_in_the_first_stage():
    cfg = GeneratorConfig(rows=20_000, seed=3, lifecycle_stages=False)
    world = datagen._World(cfg, np.random.default_rng(cfg.seed))
    blocks = list(datagen.generate_blocks(cfg, hidden=True))
    for b in blocks:
        assert not b["true_stage"].any()
        # the label process is the first stage's for every row, however many impressions the user has had
        y1, y2, y3, y4, _ = world.probabilities(b["_user"], b["_item"], b["true_scenario"],
                                                np.zeros(len(b["_user"]), np.int64), b["_is_repeat"])
        np.testing.assert_allclose(b["true_ctr"], y1, rtol=1e-6)
        np.testing.assert_allclose(b["true_cvr"], y2 * y3 + (1 - y2) * y4, rtol=1e-5)
    click = np.concatenate([b["click"] for b in blocks])
    assert 0.03 < click.mean() < 0.09  # the intercepts are calibrated without stages too
    staged = list(datagen.generate_blocks(GeneratorConfig(rows=20_000, seed=3), hidden=True))
    assert set(np.concatenate([b["true_stage"] for b in staged])) == {0, 1, 2, 3}


def test_fingerprint_of_data_generated_before_lifecycle_stages_was_an_option_is_unchanged():
    # the built-in data directory of the default 200k rows, seed 0, as named before the options existed
    assert GeneratorConfig(rows=200_000, seed=0).fingerprint() == "352702eab973"
    assert GeneratorConfig(rows=200_000, seed=0, scenario_taste=0.0).fingerprint() == "352702eab973"
    assert GeneratorConfig(rows=200_000, seed=0, lifecycle_stages=False).fingerprint() != "352702eab973"
    assert GeneratorConfig(rows=200_000, seed=0, scenario_taste=0.5).fingerprint() != "352702eab973"


def test_default_data_is_unchanged_by_options_added_later():
    # A later option at its default must leave the rows as they were, since the data directory keeps its
    # fingerprint and is reused. Digest of the rows of generator version 2 before ``scenario_taste`` existed.
    h = hashlib.sha256()
    for b in datagen.generate_blocks(GeneratorConfig(rows=6000, seed=3)):
        for k in ("item_id", "click", "purchase"):
            h.update(np.asarray(b[k], np.int64).tobytes())
        h.update(np.round(np.asarray(b["true_ctr"], np.float64), 5).tobytes())
    assert h.hexdigest()[:16] == "e2a9cb508487c28f"


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def _first_blocks(**option):
    """The first block of the default data and of the data with ``option`` (rows=4,000, seed 5, hidden columns).
    The first block's impressions precede any history, so only the labels may differ; checked here."""
    plain = next(datagen.generate_blocks(GeneratorConfig(rows=4_000, seed=5), hidden=True))
    varied = next(datagen.generate_blocks(GeneratorConfig(rows=4_000, seed=5, **option), hidden=True))
    for k in ("_user", "_item", "true_scenario", "true_stage", "segment", "device", "page", "timestamp"):
        np.testing.assert_array_equal(plain[k], varied[k])
    return plain, varied


def _daction_logit_shift(plain, varied):
    """logit P(DAction | click) of ``varied`` minus that of ``plain``, per row."""
    y2 = lambda b: b["true_ctavr"].astype(np.float64) / b["true_ctr"]  # noqa: E731
    return _logit(y2(varied)) - _logit(y2(plain))


def test_scenario_taste_adds_the_user_groups_scenario_specific_taste_for_the_category_to_the_click_logit():
    w = 0.8
    plain, tasted = _first_blocks(scenario_taste=w)
    world = datagen._World(GeneratorConfig(rows=4_000, seed=5), np.random.default_rng(5))
    # the scenario-specific category vectors come from their own stream: seed (5, 11), N(0, 1), [K, C, D]
    vectors = np.random.default_rng([5, 11]).normal(0, 1.0, (4, 40, 8))
    u, scen, cat = plain["_user"], plain["true_scenario"], world.category[plain["_item"]]
    group_taste = world.group_taste[world.group[u]]
    term = w * np.einsum("nd,nd->n", group_taste, vectors[scen, cat]) / np.sqrt(8)
    shift = _logit(tasted["true_ctr"]) - _logit(plain["true_ctr"]) - term
    # what remains is the re-calibrated intercept, the same for every row
    assert np.ptp(shift) < 1e-3, np.ptp(shift)
    # DAction after a click moves only by its re-calibrated intercept too: the term enters clicks only
    assert np.ptp(_daction_logit_shift(plain, tasted)) < 1e-3
    assert term.std() > 0.5
    # the same group and category are liked in one scenario and disliked in another
    per_scenario = np.einsum("d,kd->k", group_taste[0], vectors[:, cat[0]])
    assert per_scenario.max() - per_scenario.min() > 0.5
    with pytest.raises(ValueError, match="scenario_taste"):
        GeneratorConfig(scenario_taste=-1.0)


def test_segment_taste_adds_the_user_groups_segment_specific_taste_for_the_category_to_the_click_logit():
    w = 1.5
    plain, tasted = _first_blocks(segment_taste=w)
    world = datagen._World(GeneratorConfig(rows=4_000, seed=5), np.random.default_rng(5))
    # the segment-specific category vectors come from their own stream: seed (5, 13), N(0, 1), [S, C, D]
    vectors = np.random.default_rng([5, 13]).normal(0, 1.0, (4, 40, 8))
    u, cat = plain["_user"], world.category[plain["_item"]]
    segment = np.array([list(datagen.SEGMENTS).index(s) for s in plain["segment"]])
    group_taste = world.group_taste[world.group[u]]
    term = w * np.einsum("nd,nd->n", group_taste, vectors[segment, cat]) / np.sqrt(8)
    shift = _logit(tasted["true_ctr"]) - _logit(plain["true_ctr"]) - term
    assert np.ptp(shift) < 1e-3, np.ptp(shift)       # the rest is the re-calibrated intercept
    assert term.std() > 1.0
    with pytest.raises(ValueError, match="segment_taste"):
        GeneratorConfig(segment_taste=-0.5)
    assert GeneratorConfig(rows=200_000, seed=0, segment_taste=0.0).fingerprint() == "352702eab973"


def test_contrary_segment_flips_the_shared_affinity_and_quality_in_the_b2b_click_logit_only():
    plain, contrary = _first_blocks(contrary_segment=True)
    world = datagen._World(GeneratorConfig(rows=4_000, seed=5), np.random.default_rng(5))
    u, item = plain["_user"], plain["_item"]
    shared = 0.6 * np.einsum("nd,nd->n", world.taste[u], world.item_vec[item]) / np.sqrt(8) + world.quality[item]
    b2b = plain["segment"] == "b2b"
    assert 20 < b2b.sum() < 0.1 * len(b2b)
    shift = _logit(contrary["true_ctr"]) - _logit(plain["true_ctr"])
    rest = shift + np.where(b2b, 2.0 * shared, 0.0)   # b2b rows: shared -> -shared; the rest is the intercept
    assert np.ptp(rest) < 1e-3, np.ptp(rest)
    assert np.ptp(shift[b2b]) > 1.0
    # the other segments' click logits move only by the re-calibrated intercept; DAction and purchase not at all
    assert np.ptp(_daction_logit_shift(plain, contrary)) < 1e-3
    assert GeneratorConfig(rows=200_000, seed=0, contrary_segment=False).fingerprint() == "352702eab973"


def test_cli_takes_the_shared_generator_options_and_its_own(tmp_path, capsys):
    out = str(tmp_path / "gen")
    assert datagen.main(["--out", out, "--rows", "3000", "--rows-per-file", "1000", "--days", "3", "--seed", "4",
                         "--no-lifecycle-stages", "--scenario-taste", "0.5", "--segment-taste", "0.25",
                         "--contrary-segment"]) == 0
    manifest = json.loads(open(os.path.join(out, "_MANIFEST.json")).read())
    assert manifest["fingerprint"] == GeneratorConfig(rows=3000, rows_per_file=1000, days=3, seed=4,
                                                      lifecycle_stages=False, scenario_taste=0.5,
                                                      segment_taste=0.25, contrary_segment=True).fingerprint()
    assert len(manifest["files"]) == 3
    assert datagen.main(["--out", out, "--scenario-taste", "-1"]) == 2
    assert "scenario_taste" in capsys.readouterr().err


def test_new_items_go_on_sale_over_the_span_and_never_before():
    cfg = GeneratorConfig(rows=20_000, seed=4, new_items=0.3, days=4)
    n_items = cfg.n_items
    n_new = int(round(0.3 * n_items))
    # the on-sale times recomputed from the documented stream: the last 30% of item indices, uniform over the span
    on_sale = np.zeros(n_items)
    on_sale[n_items - n_new:] = np.random.default_rng([4, 17]).uniform(0.0, 1.0, n_new)
    span = cfg.days * datagen.DAY
    seen_new_late = 0
    for block in datagen.generate_blocks(cfg, hidden=True):
        t_end = (block["timestamp"].max() - datagen.START_TS) / span
        assert (on_sale[block["_item"]] <= t_end + 2 * cfg.block_rows / cfg.rows).all()
        seen_new_late += int((block["_item"] >= n_items - n_new).sum())
    assert seen_new_late > 0
    first = next(datagen.generate_blocks(cfg, hidden=True))
    assert (on_sale[first["_item"]] <= cfg.block_rows / cfg.rows).all()


def test_price_drift_moves_every_items_log_price_by_the_drift_per_day():
    cfg = GeneratorConfig(rows=20_000, seed=4, price_drift=0.05, days=10, missing_rate=0.0)
    plain = GeneratorConfig(rows=20_000, seed=4, days=10, missing_rate=0.0)
    for a, b in zip(datagen.generate_blocks(cfg, hidden=True), datagen.generate_blocks(plain, hidden=True)):
        same = a["_item"] == b["_item"]  # re-shown past clicks may differ: clicks depend on the price
        assert same.mean() > 0.5
        day = (a["timestamp"].astype(np.float64).mean() - datagen.START_TS) / datagen.DAY
        shift = np.log(np.asarray(a["item_price"], np.float64)[same]) - np.log(np.asarray(b["item_price"], np.float64)[same])
        # the block's price clock is the block's mid-time; the noise draws are shared, so the shift is exact
        assert shift.mean() == pytest.approx(0.05 * day, abs=0.05 * cfg.days * cfg.block_rows / cfg.rows)
        assert shift.std() < 1e-5


def test_partitions_split_one_log_by_day_and_break_the_chosen_day(tmp_path):
    cfg = GeneratorConfig(rows=9_000, seed=2, days=3)
    whole = [b for b in datagen.generate_blocks(cfg)]
    whole = {k: np.concatenate([np.ma.getdata(b[k]) for b in whole])
             for k in ("timestamp", "cart", "wish", "purchase", "item_id", "click")}
    datagen.write_partitions(cfg, str(tmp_path / "labels"), break_partition=3, break_kind="labels", progress=False)
    datagen.write_partitions(cfg, str(tmp_path / "column"), break_partition=2, break_kind="column", progress=False)
    days = (whole["timestamp"] - datagen.START_TS) // datagen.DAY
    for d in range(3):
        table = pq.read_table(str(tmp_path / "labels" / f"day-{d + 1:02d}"))
        sel = days == d
        np.testing.assert_array_equal(table.column("timestamp").to_numpy(), whole["timestamp"][sel])
        np.testing.assert_array_equal(table.column("item_id").to_numpy(), whole["item_id"][sel])
        for label in ("cart", "wish", "purchase"):  # the post-click feed stopped on day 3, clicks did not
            expected = np.zeros(sel.sum()) if d == 2 else whole[label][sel]
            np.testing.assert_array_equal(table.column(label).to_numpy(), expected)
        np.testing.assert_array_equal(table.column("click").to_numpy(), whole["click"][sel])
        manifest = json.load(open(tmp_path / "labels" / f"day-{d + 1:02d}" / "_MANIFEST.json"))
        assert manifest["rows"] == sel.sum() and manifest["broken"] == ("labels" if d == 2 else None)
        names = pq.read_schema(glob.glob(str(tmp_path / "column" / f"day-{d + 1:02d}" / "*.parquet"))[0]).names
        assert ("item_brand" in names) == (d != 1)
    assert whole["cart"][days == 2].sum() > 0  # the break removed real post-click events
    with pytest.raises(ValueError, match="break_partition must be in 1..3"):
        datagen.write_partitions(cfg, str(tmp_path / "x"), break_partition=4)
