"""pipeline.bench.oracle_gap: the generator's hidden indices are the ones it used, the scenario posterior is Bayes' rule,
and the breakdown's first row is the oracle AUC the benchmark reports."""
import numpy as np
import pytest

from pipeline import datagen
from pipeline.bench import oracle_gap
from pipeline.evaluation.metrics import auc

CFG = datagen.GeneratorConfig(rows=4_000, seed=3)


def test_hidden_columns_are_extra_and_reproduce_the_true_probabilities():
    plain = list(datagen.generate_blocks(CFG))
    hidden = list(datagen.generate_blocks(CFG, hidden=True))
    world = datagen._World(CFG, np.random.default_rng(CFG.seed))
    for a, b in zip(plain, hidden):
        assert set(b) - set(a) == {"_user", "_item", "_device", "_page", "_is_repeat"}
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        u, item = b["_user"], b["_item"]
        assert np.array_equal(b["user_id"], u + 100_000) and np.array_equal(b["item_id"], item + 5_000_000)
        assert np.array_equal(b["device"], datagen.DEVICES[b["_device"]])
        y1 = world.probabilities(u, item, b["true_scenario"], b["true_stage"], b["_is_repeat"])[0]
        np.testing.assert_allclose(y1, b["true_ctr"], rtol=1e-6)
    assert sum(b["_is_repeat"].sum() for b in hidden) > 0


def test_scenario_posterior_by_hand():
    world = datagen._World(CFG, np.random.default_rng(CFG.seed))
    # hour 0 lies in scenario 0's block (prior logit 2.5 vs 0); device 0 is scenario 0's (0.9, else 0.1/3),
    # page 1 is scenario 0's (0.9, else 0.1/3).
    post = oracle_gap.scenario_posterior(world, np.array([0, 0]), np.array([0, 1]), np.array([1, 1]))
    odd = (0.1 / 3) ** 2
    expected0 = np.array([np.exp(2.5) * 0.81, odd, odd, odd])
    # device 1 belongs to scenario 1, page 1 to scenario 0: scenario 0 has 0.9 * 0.1/3, scenario 1 0.1/3 * 0.9
    expected1 = np.array([np.exp(2.5) * 0.9 * 0.1 / 3, 0.1 / 3 * 0.9, odd, odd])
    np.testing.assert_allclose(post, np.stack([expected0 / expected0.sum(), expected1 / expected1.sum()]), rtol=1e-12)


@pytest.mark.parametrize("task,label,column", [("ctr", "click", "true_ctr"), ("cvr", "purchase", "true_cvr")])
def test_breakdown_starts_from_the_oracle_auc_of_the_eval_split(task, label, column):
    cfg = CFG if task == "ctr" else datagen.GeneratorConfig(rows=200_000, seed=3)  # ~30 purchases
    result = oracle_gap.breakdown(cfg, eval_fraction=0.25, task=task)
    blocks = list(datagen.generate_blocks(cfg))
    col = {k: np.concatenate([b[k] for b in blocks]) for k in ("timestamp", "click", label, column)}
    ts = col["timestamp"]
    ev = ts >= ts.min() + 0.75 * (ts.max() - ts.min())
    if task == "cvr":
        ev &= col["click"] == 1
    y, p = col[label][ev], col[column][ev]
    assert result["eval_rows"] == ev.sum() and result["positives"] == y.sum() > 10
    assert result["oracle"] == pytest.approx(auc(y, p), abs=1e-4)  # float32 column vs float64 logit
    scores = {k: v for k, v in result.items() if k not in ("eval_rows", "positives")}
    assert all(0.5 < v < 1.0 for v in scores.values())
    assert scores["all of the above"] < scores["oracle"]
    if task == "cvr":  # scenarios move clicks only
        assert scores["scenario -> posterior given hour, device, page"] == scores["oracle"]
    with pytest.raises(ValueError, match="task"):
        oracle_gap.breakdown(CFG, task="ctcvr")


def test_scenario_row_expects_the_scenario_specific_taste_under_the_posterior():
    # with the scenario-specific taste the scenario carries more of the click logit, so replacing it by its
    # posterior expectation loses more of the oracle's AUC
    base = datagen.GeneratorConfig(rows=40_000, seed=3)
    tasted = datagen.GeneratorConfig(rows=40_000, seed=3, scenario_taste=1.5)
    row = "scenario -> posterior given hour, device, page"
    plain, with_taste = oracle_gap.breakdown(base), oracle_gap.breakdown(tasted)
    assert plain["oracle"] - plain[row] < with_taste["oracle"] - with_taste[row]


def test_cli_prints_the_table_and_refuses_bad_sizes(capsys):
    assert oracle_gap.main(["--rows", "3000", "--users", "100"]) == 0
    out = capsys.readouterr().out
    assert "| oracle | " in out and "| all of the above | " in out
    assert oracle_gap.main(["--rows", "3000", "--task", "cvr"]) == 0
    assert "CVR AUC on the clicked impressions" in capsys.readouterr().out
    assert oracle_gap.main(["--rows", "3000", "--items", "0"]) == 2
    assert "items" in capsys.readouterr().err
