"""Leakage-safe per-user features: values worked out by hand, and no dependence on later events."""
import numpy as np
import pyarrow as pa

from pipeline.beam.sources import ORDER_COL, SPLIT_COL, canonical_columns
from pipeline.beam.user_features import AddUserFeatures, compute_user_features, split_by_user
from transforms import features as F
from transforms.features import BUILTIN


def test_hand_computed_sequence():
    # One user, five events in time order: (item, click, cart, purchase)
    events = [("a", 1, 0, 0), ("b", 0, 0, 0), ("a", 1, 1, 1), ("c", 1, 0, 0), ("a", 0, 0, 0)]
    rows = {"timestamp": np.arange(5), "item_id": [e[0] for e in events],
            "click": np.array([e[1] for e in events]), "cart": np.array([e[2] for e in events]),
            "wish": np.zeros(5, int), "purchase": np.array([e[3] for e in events])}
    out = compute_user_features(rows, BUILTIN)
    assert out[F.UF_COUNT] == [0, 1, 2, 3, 4]
    assert out[F.uf_rate("click")] == [0.0, 1.0, 0.5, 2 / 3, 3 / 4]
    assert out[F.uf_rate("daction")] == [0.0, 0.0, 0.0, 1 / 3, 1 / 4]
    assert out[F.uf_rate("purchase")] == [0.0, 0.0, 0.0, 1 / 3, 1 / 4]
    # clicked before: {} {a} {a} {a} {a, c}; a repeat click happened at event 2 (a again)
    assert out[F.UF_IN_HISTORY] == [0, 0, 1, 0, 1]
    assert out[F.UF_REPEAT_RATIO] == [0.0, 0.0, 0.0, 0.5, 1 / 3]
    assert out[F.UF_HISTORY] == [[], ["a"], ["a"], ["a", "a"], ["a", "a", "c"]]


def _log(n_users=6, n=120, seed=0):
    rng = np.random.default_rng(seed)
    cols = canonical_columns(BUILTIN)
    data = {name: [None] * n for name in cols}
    data["user_id"] = list(rng.integers(0, n_users, n))
    data["item_id"] = list(rng.integers(0, 8, n))
    data["timestamp"] = list(rng.integers(0, 30, n))  # many ties: the order column breaks them
    click = rng.random(n) < 0.5
    data["click"] = list(click.astype(int))
    data["cart"] = list((click & (rng.random(n) < 0.3)).astype(int))
    data["wish"] = [0] * n
    data["purchase"] = list((click & (rng.random(n) < 0.2)).astype(int))
    for name in ("staytime",) + tuple(BUILTIN.oracle):
        data[name] = [0] * n
    for f in BUILTIN.sequences:
        data[f.name] = [[] for _ in range(n)]
    arrays = [pa.array(data[name], type=t) for name, t in cols.items()]
    arrays += [pa.array([""] * n), pa.array(np.arange(n, dtype=np.int64))]
    return pa.RecordBatch.from_arrays(arrays, list(cols) + [SPLIT_COL, ORDER_COL])


def _features(batch):
    dofn = AddUserFeatures(BUILTIN)
    groups = {}
    for key, part in split_by_user(batch, "user_id"):
        groups.setdefault(key, []).append(part)
    out = {}
    for key, parts in groups.items():
        for b in dofn.process((key, parts)):
            for row in b.to_pylist():
                out[row[ORDER_COL]] = {k: row[k] for k in row if k.startswith("uf_")}
    return out


def test_later_events_never_change_earlier_features():
    batch = _log()
    base = _features(batch)
    ts = np.array(batch.column(batch.schema.get_field_index("timestamp")).to_pylist())
    order = np.array(batch.column(batch.schema.get_field_index(ORDER_COL)).to_pylist())
    rng = np.random.default_rng(1)
    for target in rng.choice(len(ts), 10, replace=False):
        later_than_nothing = (ts < ts[target]) | ((ts == ts[target]) & (order < order[target]))
        # 1) flip the target's labels: its own features and every earlier row's stay the same;
        # 2) change its item or delete it: every strictly earlier row's features stay the same.
        rows = batch.to_pylist()
        flipped = [dict(r, click=1 - r["click"], cart=0, purchase=0) if i == target else r for i, r in enumerate(rows)]
        moved = [dict(r, item_id=99) if i == target else r for i, r in enumerate(rows)]
        deleted = [r for i, r in enumerate(rows) if i != target]
        runs = [_features(pa.RecordBatch.from_pylist(x, schema=batch.schema)) for x in (flipped, moved, deleted)]
        for i in np.flatnonzero(later_than_nothing):
            o = int(order[i])
            assert all(run[o] == base[o] for run in runs), (target, i)
        assert runs[0][int(order[target])] == base[int(order[target])]
        # and the edit is visible to later events of the same user (the test can fail)
        user = rows[target]["user_id"]
        later_same_user = [int(order[i]) for i in range(len(rows))
                           if rows[i]["user_id"] == user and not later_than_nothing[i] and i != target]
        if later_same_user:
            assert any(runs[0][o] != base[o] for o in later_same_user)


def test_result_does_not_depend_on_input_order():
    batch = _log(seed=3)
    perm = np.random.default_rng(0).permutation(batch.num_rows)
    shuffled = batch.take(pa.array(perm))
    halves = [shuffled.slice(0, 50), shuffled.slice(50)]
    dofn = AddUserFeatures(BUILTIN)
    out = {}
    groups = {}
    for h in halves:
        for key, part in split_by_user(h, "user_id"):
            groups.setdefault(key, []).append(part)
    for key, parts in groups.items():
        for b in dofn.process((key, parts[::-1])):
            for row in b.to_pylist():
                out[row[ORDER_COL]] = {k: row[k] for k in row if k.startswith("uf_")}
    assert out == _features(batch)


def test_users_go_to_pinned_buckets():
    """All events of a user share a bucket chosen by CRC-32 of the user id's text mod 64 (zlib.crc32(b"7") =
    1790921346 -> 2, b"42" = 841265288 -> 8, b"0" = 4108050209 -> 33; pinned, so a per-process hash fails);
    a missing user goes to bucket 0."""
    batch = _log(n=4)
    users = pa.array([7, 42, None, 0], pa.int64())
    batch = batch.set_column(batch.schema.get_field_index("user_id"), "user_id", users)
    got = {key: sorted(part.column(part.schema.get_field_index(ORDER_COL)).to_pylist())
           for key, part in split_by_user(batch, "user_id")}
    assert got == {2: [0], 8: [1], 0: [2], 33: [3]}
