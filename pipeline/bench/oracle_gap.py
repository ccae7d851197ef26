"""How much of the oracle's AUC the built-in data's columns can reveal (prints a table; not a test).

    python -m pipeline.bench.oracle_gap                                   # the default 200k rows, CTR
    python -m pipeline.bench.oracle_gap --rows 600000 --users 6000 --items 1500
    python -m pipeline.bench.oracle_gap --task cvr                        # purchases over clicked impressions

The benchmark's *oracle* ranks impressions by the generator's true probabilities. Their logits
(``datagen._World.logits``: click, DAction, purchase) have parts that no column shows. This command recomputes
the oracle's AUC on the eval split (the last ``--eval-fraction`` of the time range, as the pipeline splits the
built-in data) with hidden parts replaced by what the columns can reveal of them. ``--task ctr`` (default) ranks
all eval impressions by the true click probability; ``--task cvr`` ranks the clicked ones by the true purchase
probability after a click, y2 y3 + (1 - y2) y4.

* ``scenario``: the scenario x category term, the scenario's repeat boost (and the scenario-specific taste, with
  ``--scenario-taste``) -> their expectation under the
  Bayes posterior of the scenario given hour, device and page (what a model that infers scenarios perfectly
  knows). Scenarios move clicks only, so for CVR this row is the oracle;
* ``stage``: the lifecycle stage's click, DAction and purchase terms -> their means. The stage follows the
  user's count of impressions relative to how active the user will be over the whole log, which no column shows.
  A model can infer part of it from the user's event count, so this row bounds the loss from above;
* ``user taste``: the user's taste vector -> their group's (the idiosyncratic part is tied to the user id, to be
  learnt from that user's few events);
* ``item taste and quality``: the item's two taste vectors (click, DAction) -> their category's means, its
  quality -> 0 (learnable from the item id only, from that item's events);
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
from pipeline.evaluation.metrics import auc
from pipeline.beam.split import time_cutoffs


def collect(cfg: datagen.GeneratorConfig) -> Dict[str, np.ndarray]:
    """The columns the breakdown needs, for every generated row (time order)."""
    keep = ("timestamp", "click", "purchase", "true_scenario", "true_stage", "_user", "_item", "_device", "_page", "_is_repeat")
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


TASKS = ("ctr", "cvr")


def breakdown(cfg: datagen.GeneratorConfig, eval_fraction: float = 0.2, task: str = "ctr") -> Dict[str, float]:
    """AUC on the eval split of the oracle and of the oracle with hidden parts replaced (see the module doc).

    ``task``: "ctr" (click over all eval impressions) or "cvr" (purchase over the clicked eval impressions,
    scored by the true y2 y3 + (1 - y2) y4)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    world = datagen._World(cfg, np.random.default_rng(cfg.seed))  # the same world generate_blocks builds
    c = collect(cfg)
    ts = c["timestamp"]
    eval_cut, _ = time_cutoffs((ts.min(), ts.max(), len(ts)), eval_fraction)  # as the preprocessing splits
    ev = ts >= eval_cut
    if task == "cvr":
        ev &= c["click"] == 1
    u, item, scen, stage = c["_user"][ev], c["_item"][ev], c["true_scenario"][ev], c["true_stage"][ev]
    rep = c["_is_repeat"][ev].astype(np.float64)
    y = c["click" if task == "ctr" else "purchase"][ev]
    device, page = c["_device"][ev], c["_page"][ev]
    hour = (ts[ev] // 3600) % 24

    def logits(**replaced) -> np.ndarray:
        """[3, N]: the click, DAction and purchase logits of the eval rows in a copy of the world with some of
        its arrays replaced."""
        variant = copy.copy(world)
        variant.__dict__.update(replaced)
        return np.stack(variant.logits(u, item, scen, stage, rep)[:3])

    def score(l: np.ndarray) -> np.ndarray:
        if task == "ctr":
            return l[0]
        y2 = datagen._sigmoid(world.b2 + l[1])
        return y2 * datagen._sigmoid(world.b3 + l[2]) + (1.0 - y2) * datagen._sigmoid(world.b4 + l[2])

    full = logits()
    zero = np.zeros_like(full)
    post = scenario_posterior(world, hour, device, page)
    scen_term = world.scenario_logit(u, item, scen, rep)
    scen_expected = sum(post[:, k] * world.scenario_logit(u, item, np.full_like(scen, k), rep)
                        for k in range(cfg.scenarios))
    scen_delta = zero.copy()
    scen_delta[0] = scen_expected - scen_term                     # scenarios move clicks only
    stage_delta = np.stack([effect[stage].mean() - effect[stage]
                            for effect in (world.stage_ctr, world.stage_da, world.stage_buy)])
    group_taste = world.group_taste[world.group]
    user_delta = logits(taste=group_taste) - full
    counts = np.maximum(np.bincount(world.category, minlength=cfg.categories), 1)[:, None]

    def category_mean(vectors: np.ndarray) -> np.ndarray:
        """Each item's vector replaced by the mean over its category's items [I, D]."""
        mean = np.zeros((cfg.categories, vectors.shape[1]))
        np.add.at(mean, world.category, vectors)
        return (mean / counts)[world.category]

    items = dict(item_vec=category_mean(world.item_vec), item_vec2=category_mean(world.item_vec2),
                 quality=np.zeros_like(world.quality))
    item_delta = logits(**items) - full
    both_delta = logits(taste=group_taste, **items) - full
    rows = {
        "oracle": full,
        "scenario -> posterior given hour, device, page": full + scen_delta,
        "stage -> its mean": full + stage_delta,
        "user taste -> group taste": full + user_delta,
        "item taste -> category mean, quality -> 0": full + item_delta,
        "all of the above": full + scen_delta + stage_delta + both_delta,
    }
    out = {name: auc(y, score(l)) for name, l in rows.items()}
    out["eval_rows"] = int(ev.sum())
    out["positives"] = int(y.sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.oracle_gap", description=__doc__.splitlines()[0])
    datagen.add_builtin_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="data generation seed")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--task", choices=TASKS, default="ctr",
                   help="ctr: clicks over all eval impressions; cvr: purchases over the clicked ones")
    args = p.parse_args(argv)
    try:
        cfg = datagen.builtin_generator_config(args)
        if not 0.0 < args.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"generating {cfg.rows} rows ({cfg.n_users} users, {cfg.n_items} items) ...", file=sys.stderr)
    result = breakdown(cfg, args.eval_fraction, args.task)
    oracle = result["oracle"]
    rows, positives = result.pop("eval_rows"), result.pop("positives")
    what = "eval split" if args.task == "ctr" else "clicked impressions of the eval split"
    print(f"{args.task.upper()} AUC on the {what} ({rows} rows, {positives} positives)")
    print(f"| oracle with | {args.task} AUC | vs oracle |")
    print("|---|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:.4f} | {value - oracle:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
