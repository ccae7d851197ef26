"""Built-in planted-truth impression logs.

A deterministic (seeded) generator of e-commerce impression logs whose label process is known exactly, so
that evaluation can report the oracle AUC beside every model and later mechanisms can be shown to help.
Rows are produced in time order, a small block at a time, and streamed to Parquet files: memory grows with
the number of users and items, never with the number of rows.

Behaviour graph (ESM² paper, Fig. 3c): impression -> click -> D(O)Action -> purchase, with
    y1 = P(click | impression)          (Eq. 1)
    y2 = P(DAction | click)             (Eq. 2), DAction = cart OR wish
    y3 = P(purchase | click, DAction)   (Eq. 3)
    y4 = P(purchase | click, no DAction)
so that true_ctr = y1, true_ctavr = y1*y2, true_cvr = y2*y3 + (1-y2)*y4, true_ctcvr = y1*true_cvr.

Planted structures (each hidden from the columns the models see, but inferable from them):
* post-click DAction (ESM²): an item's category and brand DAction propensities move purchase only through DAction
  (purchase after a DAction is ~12x likelier), so DAction labels, ~8x as many as purchases, carry signal
  that a purchase-only model must learn from far fewer positives;
* lifecycle stages (STAN): a user's stage advances with the number of impressions they have had so far,
  and shifts click, DAction and purchase propensities (``lifecycle_stages=False``, the control: every user
  stays in the first stage);
* K latent scenarios (MUSENET): drawn per impression from hour of day, then expressed in the observable
  ``device`` and ``page``; each scenario has its own category preferences and repeat propensity, and with
  ``scenario_taste > 0`` its own taste of each user group for each category (a three-way interaction of scenario,
  group and category; 0, the default, leaves the data of earlier versions unchanged);
* repeat consumption (MUSENET): in repeat-prone scenarios the impressed item is drawn from the items the
  user clicked before, and such repeats are clicked more;
* user groups (GPRec): users share a group taste vector (groups shape age/gender/power), plus a per-user
  idiosyncratic vector tied to the user id;
* business ``segment`` (USSR): segments of unequal size whose price sensitivity differs, and with
  ``segment_taste > 0`` each segment's own taste of each user group for each category (segment x group x
  category; 0, the default, leaves the data unchanged), and with ``contrary_segment`` the smallest segment (b2b)
  clicking by the opposite of the shared affinity and item quality.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Optional

import numpy as np

logger = logging.getLogger(__name__)

# Bumped whenever the label process or the columns change, so cached data of an older generator is not reused.
GENERATOR_VERSION = 2
DAY = 86_400
START_TS = 1_700_000_000  # 2023-11-14 22:13:20 UTC
DEVICES = np.array(["android", "ios", "pc", "pad"])
PAGES = np.array(["feed", "search", "cart_page", "promo"])
GENDERS = np.array(["F", "M"])
AGES = np.array(["<18", "18-24", "25-34", "35-44", "45-54", "55+"])
POWERS = np.array(["p0", "p1", "p2", "p3", "p4"])
SEGMENTS = np.array(["mass", "value", "premium", "b2b"])
SEGMENT_SHARE = np.array([0.6, 0.25, 0.1, 0.05])
STAGES = 4  # new, growing, mature, declining


@dataclass(frozen=True)
class GeneratorConfig:
    rows: int = 200_000
    seed: int = 0
    users: Optional[int] = None  # default: rows // 10 (at least 200)
    items: Optional[int] = None  # default: rows // 40 (at least 100)
    days: int = 14
    rows_per_file: int = 50_000
    block_rows: int = 2_000  # user state (history, stage) advances between blocks
    scenarios: int = 4
    groups: int = 8
    categories: int = 40
    brands: int = 400
    cities: int = 300
    taste_dim: int = 8
    history_len: int = 20
    daction_informative: bool = True
    lifecycle_stages: bool = True  # False: the control for STAN: every user stays in stage 0 (no stage effects)
    # Weight of the scenario-specific taste term g_u . v_{scenario, category} / sqrt(D) in the click logit, g_u the
    # user's group taste (MUSENET's premise: what a user wants depends on the latent scenario). 0: no such term.
    scenario_taste: float = 0.0
    # Weight of the segment-specific taste term g_u . v_{segment, category} / sqrt(D) in the click logit (USSR's
    # premise: each business segment has its own preferences on top of what all users share). 0: no such term.
    segment_taste: float = 0.0
    # The smallest segment (``b2b``, 5% of users) clicks by the opposite of the user-item affinity and item quality
    # that every other segment shares (USSR's premise of a small segment that reads the shared representation
    # differently). False: every segment reads them alike.
    contrary_segment: bool = False
    # Change over time, for daily partitions (``--partitions``): the share of the catalogue that is not on sale
    # at the start and appears at a uniform pace over the time span (new items), and the drift of every item's
    # log price per day (prices in the logs and in the label process). 0: a static catalogue and prices.
    new_items: float = 0.0
    price_drift: float = 0.0
    missing_rate: float = 0.03
    # Target rates (the intercepts are calibrated to them, see _World.calibrate).
    target_ctr: float = 0.05
    target_daction: float = 0.10           # DAction | click
    target_purchase_daction: float = 0.07  # purchase | click, DAction
    target_purchase_oaction: float = 0.006  # purchase | click, no DAction

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")
        if self.rows_per_file < 1 or self.block_rows < 1:
            raise ValueError("rows_per_file and block_rows must be >= 1")
        for name in ("users", "items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("scenario_taste", "segment_taste"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.new_items < 1.0:
            raise ValueError(f"new_items must be in [0, 1), got {self.new_items}")
        if not 0.0 <= self.missing_rate < 0.5:
            raise ValueError(f"missing_rate must be in [0, 0.5), got {self.missing_rate}")

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(200, self.rows // 10)

    @property
    def n_items(self) -> int:
        return self.items if self.items is not None else max(100, self.rows // 40)

    def fingerprint(self) -> str:
        """Identifies the data: the config plus ``GENERATOR_VERSION`` (so a changed label process is regenerated)."""
        fields = asdict(self)
        for name, default in _LATER_FIELDS.items():  # fields added later count only when not at their default,
            if fields[name] == default:             # so data generated before they existed keeps its fingerprint
                del fields[name]
        blob = json.dumps(dict(fields, generator_version=GENERATOR_VERSION), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


_LATER_FIELDS = {"lifecycle_stages": True, "scenario_taste": 0.0, "segment_taste": 0.0, "contrary_segment": False,
                 "new_items": 0.0, "price_drift": 0.0}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_probs(n: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** a
    return p / p.sum()


class _World:
    """Static users, items and the parameters of the label process."""

    def __init__(self, cfg: GeneratorConfig, rng: np.random.Generator):
        U, I, D, G, K, C = cfg.n_users, cfg.n_items, cfg.taste_dim, cfg.groups, cfg.scenarios, cfg.categories
        # Users: group -> observable demographics; taste = group taste + idiosyncrasy.
        self.group = rng.integers(0, G, U)
        age_pref = rng.dirichlet(np.full(len(AGES), 0.4), G)
        gender_pref = rng.beta(0.6, 0.6, G)
        power_pref = rng.dirichlet(np.full(len(POWERS), 0.5), G)
        self.age = _sample_rows(rng, age_pref[self.group])
        self.gender = (rng.random(U) < gender_pref[self.group]).astype(np.int64)
        self.power = _sample_rows(rng, power_pref[self.group])
        self.city = rng.choice(cfg.cities, U, p=_zipf_probs(cfg.cities, 1.1))
        self.segment = rng.choice(len(SEGMENTS), U, p=SEGMENT_SHARE)
        self.group_taste = rng.normal(0, 1.0, (G, D))
        self.taste = self.group_taste[self.group] + rng.normal(0, 0.7, (U, D))
        self.activity = rng.pareto(1.2, U) + 0.2
        self.activity /= self.activity.sum()
        # Lifecycle: a user's stage advances every `stage_span` impressions.
        expected = self.activity * cfg.rows  # expected impressions of each user over the whole log
        self.stage_span = np.maximum(1, np.round(expected / STAGES * rng.lognormal(0, 0.3, U))).astype(np.int64)
        self.orders_scale = np.exp(0.6 * self.power + rng.normal(0, 0.5, U))
        self.repeat_affinity = rng.beta(2, 2, U)
        # Items: category (Zipf), brand (Zipf), taste vector, price (heavy tailed, category dependent).
        self.category = rng.choice(C, I, p=_zipf_probs(C, 1.0))
        self.brand = rng.choice(cfg.brands, I, p=_zipf_probs(cfg.brands, 1.05))
        cat_vec = rng.normal(0, 0.8, (C, D))
        self.item_vec = cat_vec[self.category] + rng.normal(0, 0.7, (I, D))
        self.item_vec2 = rng.normal(0, 1.0, (I, D))
        cat_price = rng.normal(3.5, 1.0, C)
        self.log_price = cat_price[self.category] + rng.normal(0, 0.6, I)
        self.popularity = _zipf_probs(I, 0.9)[rng.permutation(I)]
        self.quality = rng.normal(0, 0.5, I)
        # Scenarios: hour-of-day prior, device/page emission, category preferences, repeat behaviour.
        hour_block = (np.arange(24) * K) // 24
        self.scen_hour = np.stack([2.5 * (hour_block == k) for k in range(K)], axis=1)  # [24, K] logits
        self.scen_device = np.full((K, len(DEVICES)), 0.1 / (len(DEVICES) - 1))
        self.scen_page = np.full((K, len(PAGES)), 0.1 / (len(PAGES) - 1))
        for k in range(K):
            self.scen_device[k, k % len(DEVICES)] = 0.9
            self.scen_page[k, (k + 1) % len(PAGES)] = 0.9
        self.scen_cat = rng.normal(0, 0.6, (K, C))
        self.scen_repeat_p = np.linspace(0.6, 0.0, K)  # chance an impression re-shows a past click
        self.scen_repeat_boost = np.linspace(1.6, -1.0, K)  # click logit shift of a repeat
        # Stage effects (new, growing, mature, declining) on click / DAction / purchase logits.
        self.stage_ctr = np.array([0.5, 0.2, 0.0, -0.8])
        self.stage_da = np.array([-0.6, 0.4, 0.6, -0.2])
        self.stage_buy = np.array([-1.2, 0.0, 0.9, 0.3])
        # Segments: price sensitivity of clicks and of purchases.
        self.seg_price_ctr = np.array([-0.5, -1.0, 0.6, 0.1])
        self.seg_price_buy = np.array([-0.4, -0.8, 0.5, 0.0])
        self.seg_bias = np.array([0.0, 0.2, -0.3, -0.5])
        # With ``contrary_segment``, b2b reads the shared affinity and quality with the opposite sign.
        self.contrary_segment = bool(cfg.contrary_segment)
        self.b2b = int(np.flatnonzero(SEGMENTS == "b2b")[0])
        # DAction propensity per category and brand: it reaches purchase *only* through DAction (l_buy has no
        # category or brand term), so many DAction labels teach it long before the few purchases do (ESM²).
        self.cat_da = rng.normal(0, 1.0, C)
        self.brand_da = rng.normal(0, 1.0, cfg.brands)
        # Scenario-specific taste vectors of the categories [K, C, D], from their own stream so that the rest of
        # the world (and every earlier dataset) is the same whatever ``scenario_taste`` is.
        self.scenario_taste = float(cfg.scenario_taste)
        self.scen_cat_vec = np.random.default_rng([cfg.seed, 11]).normal(0, 1.0, (K, C, D))
        # Segment-specific taste vectors of the categories [S, C, D], likewise from their own stream.
        self.segment_taste = float(cfg.segment_taste)
        self.seg_cat_vec = np.random.default_rng([cfg.seed, 13]).normal(0, 1.0, (len(SEGMENTS), C, D))
        # New items: the last ``new_items`` share of item indices (random w.r.t. popularity, which is permuted)
        # goes on sale at a uniform time over the span; from its own stream, so the rest of the world is unchanged.
        self.on_sale_from = np.zeros(I)
        n_new = int(round(cfg.new_items * I))
        if n_new:
            self.on_sale_from[I - n_new:] = np.random.default_rng([cfg.seed, 17]).uniform(0.0, 1.0, n_new)
        self.price_drift = float(cfg.price_drift)
        self.day = 0.0  # days since the start: the price drift's clock (set per block by generate_blocks)
        self.calibrate(cfg, np.random.default_rng([cfg.seed, 7]))


    # ---- label process -------------------------------------------------------------------------
    def logits(self, u, item, scen, stage, is_repeat):
        """Intercept-free logits of y1, y2 and of purchase-given-click, plus the user-item affinity."""
        seg, cat = self.segment[u], self.category[item]
        lp = self.log_price[item] + self.price_drift * self.day - 3.5
        affinity = (self.taste[u] * self.item_vec[item]).sum(1) / np.sqrt(self.taste.shape[1])
        l1 = (0.6 * affinity + self.scenario_logit(u, item, scen, is_repeat) + self.segment_logit(u, item)
              + self.stage_ctr[stage] + self.seg_price_ctr[seg] * lp + self.seg_bias[seg] + self.quality[item])
        if self.contrary_segment:  # -(shared part) instead of +(shared part) for b2b
            l1 = l1 - 2.0 * (seg == self.b2b) * (0.6 * affinity + self.quality[item])
        affinity2 = (self.taste[u] * self.item_vec2[item]).sum(1) / np.sqrt(self.taste.shape[1])
        power = self.power[u] - 2.0
        l2 = (0.4 * affinity2 + 0.35 * power + self.stage_da[stage] - 0.3 * lp + self.cat_da[cat]
              + self.brand_da[self.brand[item]])
        l_buy = 0.3 * power + self.stage_buy[stage] + self.seg_price_buy[seg] * lp + 0.5 * self.quality[item]
        return l1, l2, l_buy, affinity

    def scenario_logit(self, u, item, scen, is_repeat):
        """The click logit's scenario part [N]: the scenario x category preference, the scenario's repeat boost
        and ``scenario_taste`` * g_u . v_{scenario, category} / sqrt(D), g_u the taste of the user's group (which
        the demographics reveal, so a model can learn the term from a few hundred thousand rows)."""
        cat = self.category[item]
        out = self.scen_cat[scen, cat] + self.scen_repeat_boost[scen] * is_repeat
        if self.scenario_taste:
            out = out + self.scenario_taste * self.group_taste_for(u, self.scen_cat_vec[scen, cat])
        return out

    def segment_logit(self, u, item):
        """The click logit's segment-specific taste [N]: ``segment_taste`` * g_u . v_{segment, category} / sqrt(D),
        g_u the taste of the user's group; the segment is a column and the demographics reveal the group."""
        if not self.segment_taste:
            return 0.0
        return self.segment_taste * self.group_taste_for(u, self.seg_cat_vec[self.segment[u], self.category[item]])

    def group_taste_for(self, u, vectors):
        """g_u . v / sqrt(D) [N]: the taste of each row's user group for that row's category vector v [N, D]."""
        group_taste = self.group_taste[self.group[u]]
        return (group_taste * vectors).sum(1) / np.sqrt(group_taste.shape[1])

    def probabilities(self, u, item, scen, stage, is_repeat):
        """(y1, y2, y3, y4, affinity); y3 == y4 when DAction is made uninformative."""
        l1, l2, l_buy, affinity = self.logits(u, item, scen, stage, is_repeat)
        y1, y2 = _sigmoid(self.b1 + l1), _sigmoid(self.b2 + l2)
        return y1, y2, _sigmoid(self.b3 + l_buy), _sigmoid(self.b4 + l_buy), affinity

    def calibrate(self, cfg: GeneratorConfig, rng: np.random.Generator, n: int = 40_000) -> None:
        """Sets the intercepts so a pilot sample hits the target rates whatever the random world is.

        Targets: CTR, DAction|click, purchase|DAction, purchase|no DAction (or purchase|click when DAction
        is uninformative). The pilot draws users by activity, items by popularity, scenarios uniformly,
        stages uniformly (all in stage 0 without lifecycle stages) and repeats at the scenario's rate, close to
        the distribution of the real log.
        """
        u = rng.choice(len(self.activity), n, p=self.activity)
        item = rng.choice(len(self.popularity), n, p=self.popularity)
        scen = rng.integers(0, cfg.scenarios, n)
        stage = rng.integers(0, STAGES, n)
        if not cfg.lifecycle_stages:
            stage = np.zeros_like(stage)
        is_repeat = rng.random(n) < self.scen_repeat_p[scen] * 0.8
        l1, l2, l_buy, _ = self.logits(u, item, scen, stage, is_repeat)
        self.b1 = _solve_intercept(l1, np.ones(n), cfg.target_ctr)
        w_click = _sigmoid(self.b1 + l1)
        self.b2 = _solve_intercept(l2, w_click, cfg.target_daction)
        w_da = w_click * _sigmoid(self.b2 + l2)
        if cfg.daction_informative:
            self.b3 = _solve_intercept(l_buy, w_da, cfg.target_purchase_daction)
            self.b4 = _solve_intercept(l_buy, w_click - w_da, cfg.target_purchase_oaction)
        else:
            target = (cfg.target_daction * cfg.target_purchase_daction
                      + (1 - cfg.target_daction) * cfg.target_purchase_oaction)
            self.b3 = self.b4 = _solve_intercept(l_buy, w_click, target)


def _solve_intercept(logits: np.ndarray, weights: np.ndarray, target: float) -> float:
    """b such that the weighted mean of sigmoid(b + logits) equals ``target`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(mid + logits), weights=weights) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` [N, C]."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions share its key (stable)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    run_start = np.repeat(start, np.diff(np.r_[start, len(sk)]))
    out = np.empty_like(keys)
    out[order] = np.arange(len(sk)) - run_start
    return out


def generate_blocks(cfg: GeneratorConfig, hidden: bool = False) -> Iterator[Dict[str, np.ndarray]]:
    """Yields column dicts of ``block_rows`` impressions each, in timestamp order. ``hidden``: also the
    generator's internal indices ``_user``, ``_item``, ``_device``, ``_page`` and the ``_is_repeat`` flag (for
    analyses such as ``pipeline.bench.oracle_gap``; never written to files)."""
    rng = np.random.default_rng(cfg.seed)
    w = _World(cfg, rng)
    U, I, H = cfg.n_users, cfg.n_items, cfg.history_len
    hist = np.full((U, H), -1, dtype=np.int64)  # ring buffer of clicked items
    hist_n = np.zeros(U, dtype=np.int64)
    seen = np.zeros(U, dtype=np.int64)  # impressions so far (drives the lifecycle stage)
    span = cfg.days * DAY
    done = 0
    while done < cfg.rows:
        n = min(cfg.block_rows, cfg.rows - done)
        t0 = START_TS + span * done / cfg.rows
        t1 = START_TS + span * (done + n) / cfg.rows
        ts = np.sort(rng.uniform(t0, t1, n)).astype(np.int64)
        hour = (ts // 3600) % 24
        u = rng.choice(U, n, p=w.activity)
        # Latent scenario from hour of day, expressed through device and page.
        logits = w.scen_hour[hour]
        p = np.exp(logits - logits.max(1, keepdims=True))
        scen = _sample_rows(rng, p / p.sum(1, keepdims=True))
        device = _sample_rows(rng, w.scen_device[scen])
        page = _sample_rows(rng, w.scen_page[scen])
        # Item: a past click (repeat) or a popularity draw.
        n_hist = np.minimum(hist_n[u], H)
        want_repeat = rng.random(n) < w.scen_repeat_p[scen] * (0.5 + w.repeat_affinity[u])
        is_repeat = want_repeat & (n_hist > 0)
        slot = (rng.random(n) * np.maximum(n_hist, 1)).astype(np.int64)
        if cfg.new_items:  # only items on sale by the middle of this block
            on_sale = w.popularity * (w.on_sale_from <= (0.5 * (t0 + t1) - START_TS) / span)
            item = rng.choice(I, n, p=on_sale / on_sale.sum())
        else:
            item = rng.choice(I, n, p=w.popularity)
        item = np.where(is_repeat, hist[u, slot], item)
        # Lifecycle stage from the user's impressions so far (including earlier rows of this block).
        count_before = seen[u] + _cumcount(u)
        stage = np.minimum(count_before // w.stage_span[u], STAGES - 1)
        if not cfg.lifecycle_stages:
            stage = np.zeros_like(stage)
        w.day = (0.5 * (t0 + t1) - START_TS) / DAY
        y1, y2, y3, y4, affinity = w.probabilities(u, item, scen, stage, is_repeat)
        seg, cat = w.segment[u], w.category[item]
        click = rng.random(n) < y1
        daction = click & (rng.random(n) < y2)
        purchase = click & (rng.random(n) < np.where(daction, y3, y4))
        kind = rng.random(n)  # DAction -> cart only / wish only / both
        cart = daction & (kind < 0.75)
        wish = daction & (kind >= 0.6)
        stay = np.where(click, np.exp(rng.normal(2.5 + 0.6 * daction + 0.4 * purchase + 0.3 * affinity, 0.8)), 0.0)
        cvr = y2 * y3 + (1.0 - y2) * y4
        # Observable numeric features (heavy tailed) with missing values.
        price = np.exp(w.log_price[item] + w.price_drift * w.day + rng.normal(0, 0.05, n))
        sales = rng.poisson(w.popularity[item] * 2e5 * np.exp(w.quality[item]))
        orders = rng.poisson(w.orders_scale[u] * (1 + stage))
        miss = lambda: rng.random(n) < cfg.missing_rate  # noqa: E731
        block = {
            "user_id": u.astype(np.int64) + 100_000,
            "item_id": item.astype(np.int64) + 5_000_000,
            "timestamp": ts,
            "user_gender": _with_missing(GENDERS[w.gender[u]], miss()),
            "user_age": AGES[w.age[u]],
            "user_city": _with_missing(np.char.add("city_", w.city[u].astype(str)), miss()),
            "user_power": POWERS[w.power[u]],
            "item_category": np.char.add("cat_", cat.astype(str)),
            "item_brand": _with_missing(np.char.add("brand_", w.brand[item].astype(str)), miss()),
            "device": DEVICES[device],
            "page": PAGES[page],
            "segment": SEGMENTS[seg],
            "item_price": _with_missing(price.astype(np.float32), miss()),
            "item_sales_30d": _with_missing(sales.astype(np.int64), miss()),
            "user_orders_90d": _with_missing(orders.astype(np.int64), miss()),
            "click": click.astype(np.int64),
            "cart": cart.astype(np.int64),
            "wish": wish.astype(np.int64),
            "purchase": purchase.astype(np.int64),
            "staytime": stay.astype(np.float32),
            "true_ctr": y1.astype(np.float32),
            "true_ctavr": (y1 * y2).astype(np.float32),
            "true_cvr": cvr.astype(np.float32),
            "true_ctcvr": (y1 * cvr).astype(np.float32),
            "true_scenario": scen.astype(np.int64),
            "true_group": w.group[u].astype(np.int64),
            "true_stage": stage.astype(np.int64),
        }
        if hidden:
            block.update(_user=u, _item=item, _device=device, _page=page, _is_repeat=is_repeat)
        # Advance user state: impressions seen, and clicked items into the history ring buffer (time order).
        np.add.at(seen, u, 1)
        cu, ci = u[click], item[click]
        pos = hist_n[cu] + _cumcount(cu)
        hist[cu, pos % H] = ci
        np.add.at(hist_n, cu, 1)
        done += n
        yield block


def _with_missing(values: np.ndarray, mask: np.ndarray):
    """A numpy array with a boolean mask of missing entries (turned into Parquet nulls on write)."""
    return np.ma.masked_array(values, mask=mask)


def write_parquet(cfg: GeneratorConfig, out_dir: str, progress: bool = True) -> Dict:
    """Streams the generated rows to ``out_dir/part-XXXXX.parquet`` and writes ``_MANIFEST.json``."""
    started = time.time()
    files, stats, written = _write_blocks(generate_blocks(cfg), out_dir, cfg.rows_per_file, cfg.rows, progress)
    manifest = {
        "config": asdict(cfg),
        "fingerprint": cfg.fingerprint(),
        "rows": written,
        "files": [os.path.basename(f) for f in files],
        "label_counts": stats,
        "seconds": round(time.time() - started, 2),
    }
    with open(os.path.join(out_dir, "_MANIFEST.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


def _write_blocks(blocks, out_dir: str, rows_per_file: int, total_rows: int, progress: bool = True,
                  drop_columns=()):
    """Writes column-dict blocks to ``out_dir/part-XXXXX.parquet`` (``drop_columns`` left out of the files);
    returns (file paths, label counts, rows written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    schema = _arrow_schema()
    for name in drop_columns:
        schema = schema.remove(schema.get_field_index(name))
    writer, file_idx, in_file, written = None, 0, 0, 0
    files = []
    stats = {"click": 0, "cart": 0, "wish": 0, "daction": 0, "purchase": 0}
    buf = []
    next_report = 0.1

    def flush():
        nonlocal buf
        if not buf:
            return
        merged = {k: np.ma.concatenate([b[k] for b in buf]) if isinstance(buf[0][k], np.ma.MaskedArray)
                  else np.concatenate([b[k] for b in buf]) for k in buf[0] if k not in drop_columns}
        table = pa.table({k: _to_arrow(v) for k, v in merged.items()})
        writer.write_table(table.select(schema.names))
        buf = []

    for block in blocks:
        n = len(block["timestamp"])
        offset = 0
        while offset < n:
            if writer is None:
                path = os.path.join(out_dir, f"part-{file_idx:05d}.parquet")
                files.append(path)
                writer = pq.ParquetWriter(path, schema, compression="snappy")
            take = min(n - offset, rows_per_file - in_file)
            buf.append({k: v[offset:offset + take] for k, v in block.items()})
            offset += take
            in_file += take
            if in_file == rows_per_file:
                flush()
                writer.close()
                writer, in_file, file_idx = None, 0, file_idx + 1
        for k in ("click", "cart", "wish", "purchase"):
            stats[k] += int(block[k].sum())
        stats["daction"] += int((block["cart"] | block["wish"]).sum())
        written += n
        if sum(len(b["timestamp"]) for b in buf) >= 50_000:
            flush()
        if progress and written / total_rows >= next_report:
            logger.info("generated %d/%d rows (%.0f%%)", written, total_rows, 100 * written / total_rows)
            next_report += 0.1
    if writer is not None:
        flush()
        writer.close()
    return files, stats, written


BREAKS = ("labels", "column")  # what --break-partition breaks: the post-click feed stops, or item_brand disappears
BROKEN_COLUMN = "item_brand"
POST_CLICK = ("cart", "wish", "purchase")


def _day_blocks(blocks, days: int):
    """Splits time-ordered blocks at day boundaries: yields (day index, block part)."""
    for block in blocks:
        day = np.minimum((block["timestamp"] - START_TS) // DAY, days - 1)
        for d in np.unique(day):
            sel = day == d
            yield int(d), {k: v[sel] for k, v in block.items()}


def write_partitions(cfg: GeneratorConfig, out_dir: str, break_partition: Optional[int] = None,
                     break_kind: str = "labels", progress: bool = True) -> Dict:
    """One log over ``cfg.days`` days of one world, written as daily partitions ``out_dir/day-NN/part-*.parquet``
    (NN from 01), each with its own ``_MANIFEST.json``. ``break_partition`` (1-based) breaks that day on purpose:
    ``labels``, the post-click event feed stops (every cart, wish and purchase 0); ``column``, ``item_brand`` is
    missing from its files."""
    import itertools

    if break_partition is not None and not 1 <= break_partition <= cfg.days:
        raise ValueError(f"break_partition must be in 1..{cfg.days}, got {break_partition}")
    if break_kind not in BREAKS:
        raise ValueError(f"break kind must be one of {BREAKS}, got {break_kind!r}")
    os.makedirs(out_dir, exist_ok=True)
    manifests = []
    for day, parts in itertools.groupby(_day_blocks(generate_blocks(cfg), cfg.days), key=lambda x: x[0]):
        broken = break_partition == day + 1
        blocks = (b for _, b in parts)
        if broken and break_kind == "labels":  # the post-click event feed (cart, wish, purchase) stops
            blocks = (dict(b, **{k: np.zeros_like(b[k]) for k in POST_CLICK}) for b in blocks)
        day_dir = os.path.join(out_dir, f"day-{day + 1:02d}")
        started = time.time()
        files, stats, written = _write_blocks(blocks, day_dir, cfg.rows_per_file, cfg.rows // cfg.days, False,
                                              drop_columns=(BROKEN_COLUMN,) if broken and break_kind == "column" else ())
        manifest = {"config": asdict(cfg), "fingerprint": cfg.fingerprint(), "day": day + 1, "rows": written,
                    "files": [os.path.basename(f) for f in files], "label_counts": stats,
                    "broken": break_kind if broken else None, "seconds": round(time.time() - started, 2)}
        with open(os.path.join(day_dir, "_MANIFEST.json"), "w") as fh:
            json.dump(manifest, fh, indent=2)
        manifests.append(manifest)
        if progress:
            logger.info("day %d: %d rows%s", day + 1, written, f" (broken: {break_kind})" if broken else "")
    return {"days": manifests, "rows": sum(m["rows"] for m in manifests)}


def _arrow_schema():
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float32()
    cols = [("user_id", i), ("item_id", i), ("timestamp", i), ("user_gender", s), ("user_age", s),
            ("user_city", s), ("user_power", s), ("item_category", s), ("item_brand", s), ("device", s),
            ("page", s), ("segment", s), ("item_price", f), ("item_sales_30d", i), ("user_orders_90d", i),
            ("click", i), ("cart", i), ("wish", i), ("purchase", i), ("staytime", f),
            ("true_ctr", f), ("true_ctavr", f), ("true_cvr", f), ("true_ctcvr", f),
            ("true_scenario", i), ("true_group", i), ("true_stage", i)]
    return pa.schema(cols)


def _to_arrow(v):
    import pyarrow as pa

    if isinstance(v, np.ma.MaskedArray):
        return pa.array(np.asarray(v.data), mask=np.ma.getmaskarray(v))
    return pa.array(v)


def ensure_builtin(cfg: GeneratorConfig, out_dir: str) -> Dict:
    """Reuses ``out_dir`` when its manifest matches ``cfg``; otherwise (re)generates it."""
    manifest_path = os.path.join(out_dir, "_MANIFEST.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        if manifest.get("fingerprint") == cfg.fingerprint() and all(
                os.path.exists(os.path.join(out_dir, f)) for f in manifest["files"]):
            manifest["reused"] = True
            return manifest
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if name.startswith("part-") or name == "_MANIFEST.json":
            os.remove(os.path.join(out_dir, name))
    manifest = write_parquet(cfg, out_dir)
    manifest["reused"] = False
    return manifest


def add_builtin_data_args(p: argparse.ArgumentParser) -> None:
    """The generator's options shared by every command that generates built-in data (``pipeline.run``,
    ``pipeline.benchmark``, ``pipeline.bench.oracle_gap`` and this module's CLI; ``--seed`` each adds itself)."""
    p.add_argument("--rows", type=int, default=GeneratorConfig.rows,
                   help=f"rows of built-in data to generate (default {GeneratorConfig.rows})")
    p.add_argument("--users", type=int, default=None,
                   help="built-in data only: number of users (default rows/10; fewer users = more events per user)")
    p.add_argument("--items", type=int, default=None, help="built-in data only: number of items (default rows/40)")
    p.add_argument("--uninformative-daction", action="store_true",
                   help="built-in data only: make purchase independent of DAction (ESM² should then not beat ESMM)")
    p.add_argument("--no-lifecycle-stages", action="store_true",
                   help="built-in data only: every user stays in the first lifecycle stage (the control for STAN)")
    p.add_argument("--scenario-taste", type=float, default=0.0, metavar="W",
                   help="built-in data only: weight of a scenario-specific user-group x category taste in the "
                        "click logit (MUSENET's premise; default 0: scenarios shift clicks additively only)")
    p.add_argument("--segment-taste", type=float, default=0.0, metavar="W",
                   help="built-in data only: weight of a segment-specific user-group x category taste in the "
                        "click logit (USSR's premise; default 0: segments differ by price sensitivity only)")
    p.add_argument("--contrary-segment", action="store_true",
                   help="built-in data only: the smallest segment (b2b, 5%% of users) clicks by the opposite of the "
                        "user-item affinity and item quality all other segments share (USSR's premise)")


def builtin_generator_config(args, **fields) -> GeneratorConfig:
    """The ``GeneratorConfig`` of the options above, ``--seed`` and ``fields``; ValueError names a bad one."""
    return GeneratorConfig(rows=args.rows, seed=args.seed, users=args.users, items=args.items,
                           daction_informative=not args.uninformative_daction,
                           lifecycle_stages=not args.no_lifecycle_stages, scenario_taste=args.scenario_taste,
                           segment_taste=args.segment_taste, contrary_segment=args.contrary_segment, **fields)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.datagen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory for part-*.parquet")
    add_builtin_data_args(parser)
    parser.add_argument("--seed", type=int, default=GeneratorConfig.seed)
    parser.add_argument("--days", type=int, default=GeneratorConfig.days)
    parser.add_argument("--rows-per-file", type=int, default=GeneratorConfig.rows_per_file)
    parser.add_argument("--partitions", action="store_true",
                        help="write one directory per day (OUT/day-01, OUT/day-02, ...) for the retraining loop; "
                             "--rows is the total over --days days")
    parser.add_argument("--new-items", type=float, default=0.0, metavar="SHARE",
                        help="share of the catalogue that appears over the time span (default 0)")
    parser.add_argument("--price-drift", type=float, default=0.0, metavar="D",
                        help="drift of every item's log price per day (default 0)")
    parser.add_argument("--break-partition", type=int, default=None, metavar="DAY",
                        help="with --partitions: break this day (1-based) on purpose, see --break")
    parser.add_argument("--break", dest="break_kind", choices=BREAKS, default="labels",
                        help="labels: the post-click feed (cart, wish, purchase) stops that day; column: item_brand is "
                             "missing that day")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = builtin_generator_config(args, days=args.days, rows_per_file=args.rows_per_file,
                                       new_items=args.new_items, price_drift=args.price_drift)
        if args.break_partition is not None and not args.partitions:
            raise ValueError("--break-partition needs --partitions")
        if args.partitions:
            result = write_partitions(cfg, args.out, args.break_partition, args.break_kind)
            print(json.dumps([{k: m[k] for k in ("day", "rows", "label_counts", "broken")} for m in result["days"]],
                             indent=2))
            return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = write_parquet(cfg, args.out)
    print(json.dumps({k: manifest[k] for k in ("rows", "files", "label_counts", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
