"""Offline evaluation of a multi-task model, beside the oracle (the generator's true probabilities).

For every task the model predicts, on the eval split:

* AUC and LogLoss;
* GAUC per user (users holding both classes; weighted by impressions, and uniformly as ESM² reports it)
  and NDCG@k per user;
* precision / recall / F1 of the top ``top_fraction`` of impressions (ESM² Tables 4-5);
* calibration: expected calibration error and the reliability curve;
* AUC per business segment and the worst segment among those holding at least ``min_segment_class_rows``
  positives and negatives (when the dataset declares a segment column);
* AUC on the impressions of users with few earlier events (``few_events_auc``, when per-user features exist);
* the ROC curve (for plots).

CVR is judged twice: on clicked impressions (``cvr``, the conventional view) and over the entire space
(``cvr_entire``: pCVR against purchase over all impressions, ESMM §3). On planted-truth data the same
metrics are computed from the true probabilities (``oracle``), so a report always shows the ceiling.

Users are grouped by their transformed id; ids in the vocabulary's OOV buckets (rare users pooled together)
are left out of GAUC and NDCG, since a bucket is not a user.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from pipeline.evaluation import metrics as M
from pipeline.training.data import make_dataset
from transforms import features as F
from transforms.features import FeatureContract

CVR_ENTIRE = "cvr_entire"

# task -> (model output, label, oracle column, restrict to clicked impressions?)
TASKS: Dict[str, Tuple[str, str, str, bool]] = {
    F.CTR: (F.CTR, F.CLICK, "true_ctr", False),
    F.CTAVR: (F.CTAVR, F.DACTION, "true_ctavr", False),
    F.CVR: (F.CVR, F.PURCHASE, "true_cvr", True),        # CVR on clicked impressions
    CVR_ENTIRE: (F.CVR, F.PURCHASE, "true_cvr", False),  # CVR over the entire space
    F.CTCVR: (F.CTCVR, F.PURCHASE, "true_ctcvr", False),
}
ORACLE_COLUMNS = ("true_ctr", "true_ctavr", "true_cvr", "true_ctcvr")
# Model outputs that assign each impression to a latent cluster [N, K], and the generator's hidden truth they
# should recover (normalised mutual information of the argmax assignment).
LATENT_OUTPUTS = {"scenario": "true_scenario", "group": "true_group"}
USER_KEY = "__user__"
PRIOR_EVENTS_KEY = F.UF_COUNT_RAW
SEGMENT_KEY = "__segment__"


@dataclass(frozen=True)
class EvalConfig:
    """What the report computes: NDCG cut-off, top fraction for precision/recall, calibration bins."""
    ndcg_k: int = 10
    top_fraction: float = 0.1
    calibration_bins: int = 10
    roc_points: int = 101
    min_segment_class_rows: int = 30   # a segment enters "worst segment" with this many positives and negatives
    few_events: int = 5          # "users with few events": fewer earlier events than this (a report slice)

    def __post_init__(self):
        if self.ndcg_k < 1:
            raise ValueError(f"EvalConfig.ndcg_k must be >= 1, got {self.ndcg_k}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"EvalConfig.top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.calibration_bins < 1:
            raise ValueError(f"EvalConfig.calibration_bins must be >= 1, got {self.calibration_bins}")
        if self.roc_points < 2:
            raise ValueError(f"EvalConfig.roc_points must be >= 2, got {self.roc_points}")


def _group_columns(contract: FeatureContract, tft_output) -> Tuple[Optional[str], Optional[str], int, List[str]]:
    """(user id feature, segment id feature, first OOV user index, segment names by index)."""
    spec = tft_output.transformed_feature_spec()
    user = F.categorical_id(contract.user_id) if contract.user_id else None
    user = user if user in spec else None
    user_oov_from = np.iinfo(np.int64).max
    if user:
        feature = next((f for f in contract.vocab_features if f.name == contract.user_id), None)
        if feature is not None:
            user_oov_from = int(tft_output.vocabulary_size_by_name(feature.vocab_name))
    segment = F.categorical_id(contract.segment) if contract.segment else None
    segment = segment if segment in spec else None
    names: List[str] = []
    if segment:
        feature = next((f for f in contract.vocab_features if f.name == contract.segment), None)
        if feature is not None:
            names = [v.decode() if isinstance(v, bytes) else str(v)
                     for v in tft_output.vocabulary_by_name(feature.vocab_name)]
    return user, segment, user_oov_from, names


def collect(model, contract: FeatureContract, tft_output, pattern: str, batch_size: int = 4096):
    """Runs the model over ``pattern``.

    Returns (predictions, labels): output name -> [N] (or [N, K] for multi-column outputs such as a scenario
    distribution), and label / oracle name -> [N]. When the dataset has them, ``labels`` also holds the user
    (``USER_KEY``, OOV buckets as -1) and the segment name (``SEGMENT_KEY``).
    """
    spec = tft_output.transformed_feature_spec()
    oracle = [c for c in ORACLE_COLUMNS + tuple(LATENT_OUTPUTS.values()) + (PRIOR_EVENTS_KEY,) if c in spec]
    label_keys = [k for k in (F.CLICK, F.DACTION, F.PURCHASE) if k in spec]
    user, segment, user_oov_from, segment_names = _group_columns(contract, tft_output)
    feature_keys = list(contract.model_feature_names())
    extra = oracle + [k for k in (user, segment) if k and k not in feature_keys]
    ds = make_dataset(pattern, spec, feature_keys, label_keys, batch_size, extra_keys=extra)
    preds: Dict[str, List[np.ndarray]] = {}
    labels: Dict[str, List[np.ndarray]] = {}
    for features, lab in ds:
        out = model(features, training=False)
        for k, v in out.items():
            v = v.numpy()
            preds.setdefault(k, []).append(v.reshape(len(v), -1) if v.ndim > 1 and v.shape[-1] > 1 else v.reshape(-1))
        for k, v in lab.items():
            labels.setdefault(k, []).append(v.numpy().reshape(-1))
        for key, name in ((user, USER_KEY), (segment, SEGMENT_KEY)):
            if key:
                source = features[key] if key in features else lab[key]
                labels.setdefault(name, []).append(source.numpy().reshape(-1))
    preds_np = {k: np.concatenate(v) for k, v in preds.items()}
    labels_np = {k: np.concatenate(v) for k, v in labels.items()}
    for key in (user, segment):
        if key and key not in label_keys and key in labels_np:
            labels_np.pop(key)
    if USER_KEY in labels_np:
        ids = labels_np[USER_KEY].astype(np.int64)
        labels_np[USER_KEY] = np.where(ids >= user_oov_from, -1, ids)
    if SEGMENT_KEY in labels_np:
        ids = labels_np[SEGMENT_KEY].astype(np.int64)
        labels_np[SEGMENT_KEY] = np.array([segment_names[i] if 0 <= i < len(segment_names) else "(oov)"
                                           for i in ids], dtype=object)
    return preds_np, labels_np


def roc_curve(labels: np.ndarray, scores: np.ndarray, points: int = 101) -> Dict[str, List[float]]:
    """The ROC curve resampled at ``points`` evenly spaced false-positive rates (tied scores step together)."""
    y = np.asarray(labels, np.float64).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    grid = np.linspace(0.0, 1.0, points)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    if n_pos == 0 or n_neg == 0:
        return {"fpr": grid.tolist(), "tpr": [float("nan")] * points}
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]   # thresholds between distinct scores
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).tolist()}


def score_metrics(y: np.ndarray, s: np.ndarray, users: Optional[np.ndarray], segments: Optional[np.ndarray],
                  cfg: EvalConfig, prior_events: Optional[np.ndarray] = None) -> Dict:
    """Every metric of one (labels, scores) pair; NaN where a metric is undefined (one class only)."""
    y = np.asarray(y, np.float64)
    s = np.asarray(s, np.float64)
    row: Dict = {"auc": M.auc(y, s), "logloss": M.log_loss(y, s)}
    cal = M.calibration(y, np.clip(s, 0.0, 1.0), n_bins=cfg.calibration_bins)
    row["ece"] = cal.ece
    row["reliability"] = {"mean_predicted": cal.mean_predicted.tolist(), "observed_rate": cal.observed_rate.tolist(),
                          "count": cal.count.tolist()}
    top = M.precision_recall_f1_at_top(y, s, cfg.top_fraction)
    pct = f"{cfg.top_fraction * 100:g}%"
    row.update({f"precision@{pct}": top.precision, f"recall@{pct}": top.recall, f"f1@{pct}": top.f1})
    if users is not None:
        known = users >= 0
        if known.any():
            g = M.gauc(y[known], s[known], users[known])
            row["gauc"] = g.value
            row["gauc_users"] = g.n_groups
            row["gauc_uniform"] = M.gauc(y[known], s[known], users[known], weight="uniform").value
            row[f"ndcg@{cfg.ndcg_k}"] = M.ndcg_at_k(y[known], s[known], users[known], cfg.ndcg_k).value
    if segments is not None:
        seg = M.segment_auc(y, s, segments)
        row["segment_auc"] = {str(k): v for k, v in seg.per_segment.items()}
        row["segment_rows"] = {str(k): v for k, v in seg.n_rows.items()}
        # The worst segment among those with enough of both classes for a stable AUC (a segment with two
        # positives has an AUC of 0 or 1 by chance); smaller segments still appear in ``segment_auc``.
        pos, rows = seg.n_positives, seg.n_rows
        eligible = {k: a for k, a in seg.per_segment.items()
                    if min(pos[k], rows[k] - pos[k]) >= cfg.min_segment_class_rows and not np.isnan(a)}
        worst = min(eligible, key=lambda k: (eligible[k], str(k))) if eligible else None
        row["worst_segment"] = [str(worst), eligible[worst]] if worst is not None else None
    if prior_events is not None:
        few = prior_events < cfg.few_events
        row["few_events_rows"] = int(few.sum())
        row["few_events_auc"] = M.auc(y[few], s[few]) if few.any() else float("nan")
    row["roc"] = roc_curve(y, s, cfg.roc_points)
    return row


def evaluate(preds: Dict[str, np.ndarray], labels: Dict[str, np.ndarray],
             cfg: EvalConfig = EvalConfig()) -> Dict[str, Dict]:
    """Metrics per task for the model and, where the oracle columns exist, for the true probabilities.

    Returns task -> {n, positives, auc, logloss, gauc, ..., "oracle": {same metrics}, "oracle_auc"}.
    """
    report: Dict[str, Dict] = {}
    n = len(next(iter(labels.values())))
    clicked = labels[F.CLICK] > 0 if F.CLICK in labels else np.ones(n, bool)
    users = labels.get(USER_KEY)
    segments = labels.get(SEGMENT_KEY)
    prior_events = labels.get(PRIOR_EVENTS_KEY)
    for task, (output, label, oracle, on_clicked) in TASKS.items():
        if output not in preds or label not in labels or preds[output].ndim != 1:
            continue
        mask = clicked if on_clicked else np.ones(n, bool)
        y = labels[label][mask]
        pick = (lambda a: None if a is None else a[mask])
        row = {"n": int(mask.sum()), "positives": int(y.sum())}
        row.update(score_metrics(y, preds[output][mask], pick(users), pick(segments), cfg, pick(prior_events)))
        if oracle in labels:
            row["oracle"] = score_metrics(y, labels[oracle][mask], pick(users), pick(segments), cfg,
                                          pick(prior_events))
            row["oracle_auc"] = row["oracle"]["auc"]
        report[task] = row
    for output, truth in LATENT_OUTPUTS.items():
        if output in preds and truth in labels and preds[output].ndim == 2:
            assigned = np.argmax(preds[output], axis=1)
            report[output] = {"n": n, "nmi": M.normalized_mutual_info(labels[truth], assigned),
                              "clusters_used": int(len(np.unique(assigned))),
                              "clusters_true": int(len(np.unique(labels[truth])))}
    return report


def evaluate_model(model, contract: FeatureContract, tft_output, pattern: str,
                   cfg: EvalConfig = EvalConfig()) -> Dict[str, Dict]:
    preds, labels = collect(model, contract, tft_output, pattern)
    return evaluate(preds, labels, cfg)


SUMMARY_COLUMNS = ("auc", "gauc", "logloss", "ece", "ndcg@10")


def format_report(report: Dict[str, Dict]) -> str:
    """A plain-text table: each task's model metrics with the oracle's beside them (``model / oracle``)."""
    cols = [c for c in SUMMARY_COLUMNS if any(c in r for r in report.values())]
    lines = [f"{'task':<11}" + "".join(f"{c:>17}" for c in cols) + f"{'worst segment':>24}{'rows':>9}{'pos':>7}"]
    for task, r in report.items():
        if "auc" not in r:
            continue
        cells = []
        for c in cols:
            model = r.get(c, float("nan"))
            oracle = r.get("oracle", {}).get(c)
            cells.append(f"{model:>8.4f} / {oracle:<6.4f}" if oracle is not None else f"{model:>17.4f}")
        worst = r.get("worst_segment")
        worst_text = f"{worst[0]} {worst[1]:.4f}" if worst else "-"
        lines.append(f"{task:<11}" + "".join(f"{c:>17}" for c in cells) + f"{worst_text:>24}{r['n']:>9d}"
                     f"{r['positives']:>7d}")
    for name, r in report.items():
        if "nmi" in r:
            lines.append(f"{name}: NMI with the hidden truth {r['nmi']:.3f} ({r['clusters_used']} of the model's "
                         f"clusters used; {r['clusters_true']} true)")
    if any("oracle" in r for r in report.values()):
        lines.append("(model / oracle: the oracle scores the generator's true probabilities)")
    return "\n".join(lines)
