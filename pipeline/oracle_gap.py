"""How much of the oracle's CTR AUC the built-in data's columns can reveal (prints a table; not a test).

    python -m pipeline.oracle_gap                                   # the default 200k rows
    python -m pipeline.oracle_gap --rows 600000 --users 6000 --items 1500

The benchmark's *oracle* ranks impressions by the generator's true click probability. Its logit
(``datagen._World.logits``) has parts that no column shows. This command recomputes the oracle's CTR AUC on the
eval split (the last ``--eval-fraction`` of the time range, as the pipeline splits the built-in data) with
hidden parts replaced by what the columns can reveal of them:

* ``scenario``: the scenario x category term and the scenario's repeat boost -> their expectation under the
  Bayes posterior of the scenario given hour, device and page (what a model that infers scenarios perfectly knows);
* ``stage``: the lifecycle stage's click term -> its mean. The stage follows the user's count of impressions
  relative to how active the user will be over the whole log, which no column shows. A model can infer part of it
  from the user's event count, so this row bounds the loss from above;
* ``user taste``: the user's taste vector -> their group's (the idiosyncratic part is tied to the user id, to be
  learnt from that user's few events);
* ``item taste and quality``: the item's taste vector -> its category's mean, its quality -> 0 (learnable from
  the item id only, from that item's events);
* ``all of the above``.

These are bounds on what a model can reach from the columns, not a model's figures. Each row is the oracle with
one part replaced, so the drops do not add up to the last row's.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Dict

import numpy as np

from pipeline import datagen
from pipeline.metrics import auc
from pipeline.split import time_cutoffs


def collect(cfg: datagen.GeneratorConfig) -> Dict[str, np.ndarray]:
    """The columns the breakdown needs, for every generated row (time order)."""
    keep = ("timestamp", "click", "true_scenario", "true_stage", "_user", "_item", "_device", "_page", "_is_repeat")
    parts: Dict[str, list] = {k: [] for k in keep}
    for block in datagen.generate_blocks(cfg, hidden=True):
        for k in keep:
            parts[k].append(np.asarray(block[k]))
    return {k: np.concatenate(v) for k, v in parts.items()}


def scenario_posterior(world, hour: np.ndarray, device: np.ndarray, page: np.ndarray) -> np.ndarray:
    """P(scenario | hour, device, page) [N, K] by Bayes' rule from the generator's prior and emissions."""
    logits = world.scen_hour[hour]
    prior = np.exp(logits - logits.max(1, keepdims=True))
    post = prior * world.scen_device[:, device].T * world.scen_page[:, page].T
    return post / post.sum(1, keepdims=True)


def breakdown(cfg: datagen.GeneratorConfig, eval_fraction: float = 0.2) -> Dict[str, float]:
    """CTR AUC on the eval split of the oracle and of the oracle with hidden parts replaced (see the module doc)."""
    world = datagen._World(cfg, np.random.default_rng(cfg.seed))  # the same world generate_blocks builds
    c = collect(cfg)
    ts = c["timestamp"]
    eval_cut, _ = time_cutoffs((ts.min(), ts.max(), len(ts)), eval_fraction)  # as the preprocessing splits
    ev = ts >= eval_cut
    u, item, scen, stage = c["_user"][ev], c["_item"][ev], c["true_scenario"][ev], c["true_stage"][ev]
    rep = c["_is_repeat"][ev].astype(np.float64)
    y = c["click"][ev]
    device, page = c["_device"][ev], c["_page"][ev]
    hour = (ts[ev] // 3600) % 24
    cat = world.category[item]

    def logit(**replaced):
        """The click logit of the eval rows in a copy of the world with some of its arrays replaced."""
        variant = copy.copy(world)
        variant.__dict__.update(replaced)
        return variant.logits(u, item, scen, stage, rep)[0]

    full = logit()
    post = scenario_posterior(world, hour, device, page)
    scen_term = world.scen_cat[scen, cat] + world.scen_repeat_boost[scen] * rep
    scen_expected = (post * (world.scen_cat[:, cat].T + world.scen_repeat_boost[None, :] * rep[:, None])).sum(1)
    scen_delta = scen_expected - scen_term
    stage_delta = world.stage_ctr[stage].mean() - world.stage_ctr[stage]
    group_taste = world.group_taste[world.group]
    user_delta = logit(taste=group_taste) - full
    counts = np.bincount(world.category, minlength=cfg.categories)
    cat_mean = np.zeros((cfg.categories, cfg.taste_dim))
    np.add.at(cat_mean, world.category, world.item_vec)
    cat_mean /= np.maximum(counts, 1)[:, None]
    item_delta = logit(item_vec=cat_mean[world.category], quality=np.zeros_like(world.quality)) - full
    both_delta = logit(taste=group_taste, item_vec=cat_mean[world.category],
                       quality=np.zeros_like(world.quality)) - full
    rows = {
        "oracle": full,
        "scenario -> posterior given hour, device, page": full + scen_delta,
        "stage -> its mean": full + stage_delta,
        "user taste -> group taste": full + user_delta,
        "item taste -> category mean, quality -> 0": full + item_delta,
        "all of the above": full + scen_delta + stage_delta + both_delta,
    }
    out = {name: auc(y, score) for name, score in rows.items()}
    out["eval_rows"] = int(ev.sum())
    return out


def main(argv=None) -> int:
    from pipeline.run import add_builtin_data_args

    p = argparse.ArgumentParser(prog="python -m pipeline.oracle_gap", description=__doc__.splitlines()[0])
    add_builtin_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="data generation seed")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    args = p.parse_args(argv)
    try:
        cfg = datagen.GeneratorConfig(rows=args.rows, seed=args.seed, users=args.users, items=args.items,
                                      daction_informative=not args.uninformative_daction)
        if not 0.0 < args.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"generating {cfg.rows} rows ({cfg.n_users} users, {cfg.n_items} items) ...", file=sys.stderr)
    result = breakdown(cfg, args.eval_fraction)
    oracle = result["oracle"]
    print(f"CTR AUC on the eval split ({result.pop('eval_rows')} rows)")
    print("| oracle with | ctr AUC | vs oracle |")
    print("|---|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:.4f} | {value - oracle:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
