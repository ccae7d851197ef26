"""Offline evaluation of a multi-task model beside the oracle (the generator's true probabilities)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from pipeline.data import make_dataset
from pipeline.metrics import auc
from transforms import features as F
from transforms.features import FeatureContract

# task -> (label, oracle column, restrict to clicked impressions?)
TASKS = {
    F.CTR: (F.CLICK, "true_ctr", False),
    F.CTAVR: (F.DACTION, "true_ctavr", False),
    F.CVR: (F.PURCHASE, "true_cvr", True),   # CVR is judged on clicked impressions
    F.CTCVR: (F.PURCHASE, "true_ctcvr", False),
}


def collect(model, contract: FeatureContract, tft_output, pattern: str, batch_size: int = 4096):
    """Runs the model over ``pattern``; returns (predictions, labels+oracle) as flat numpy arrays."""
    spec = tft_output.transformed_feature_spec()
    oracle = [c for c in ("true_ctr", "true_ctavr", "true_cvr", "true_ctcvr") if c in spec]
    labels = [k for k in (F.CLICK, F.DACTION, F.PURCHASE) if k in spec]
    ds = make_dataset(pattern, spec, contract.model_feature_names(), labels, batch_size, extra_keys=oracle)
    preds: Dict[str, List[np.ndarray]] = {}
    labels: Dict[str, List[np.ndarray]] = {}
    for features, lab in ds:
        out = model(features, training=False)
        for k, v in out.items():
            preds.setdefault(k, []).append(v.numpy().reshape(-1))
        for k, v in lab.items():
            labels.setdefault(k, []).append(v.numpy().reshape(-1))
    return ({k: np.concatenate(v) for k, v in preds.items()}, {k: np.concatenate(v) for k, v in labels.items()})


def evaluate(preds: Dict[str, np.ndarray], labels: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """AUC per task for the model and, where the oracle columns exist, for the true probabilities."""
    report = {}
    clicked = labels[F.CLICK] > 0
    for task, (label, oracle, on_clicked) in TASKS.items():
        if task not in preds or label not in labels:
            continue
        mask = clicked if on_clicked else np.ones_like(clicked)
        row = {"auc": auc(labels[label][mask], preds[task][mask]), "n": int(mask.sum()),
               "positives": int(labels[label][mask].sum())}
        if oracle in labels:
            row["oracle_auc"] = auc(labels[label][mask], labels[oracle][mask])
        report[task] = row
    return report


def format_report(report: Dict[str, Dict[str, float]]) -> str:
    lines = [f"{'task':<7}{'AUC':>8}{'oracle':>9}{'gap':>8}{'rows':>10}{'pos':>8}"]
    for task, r in report.items():
        oracle = r.get("oracle_auc", float("nan"))
        lines.append(f"{task:<7}{r['auc']:>8.4f}{oracle:>9.4f}{oracle - r['auc']:>8.4f}{r['n']:>10d}{r['positives']:>8d}")
    return "\n".join(lines)
