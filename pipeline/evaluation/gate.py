"""The validation gate (the role of TFX's Evaluator "blessing"): a candidate export replaces the served one only
if it is at least as good on the same newest held-out slice.

Both models are scored the way TF Serving scores them: exported SavedModels, raw serialized ``tf.Example``s into
``serving_default`` (the transform graph inside each), so a candidate with a refreshed vocabulary and the
champion with the old one are judged on the same raw rows. The figures are ``pipeline.evaluation.evaluate``'s.

Per task (``ctr``, ``ctavr``, ``cvr``, ``ctcvr`` where the labels exist), the candidate is blessed when

    AUC_cand     >= AUC_champ - auc_tolerance
    LogLoss_cand <= LogLoss_champ * (1 + logloss_tolerance)
    ECE_cand     <= max_ece
    AUC_cand     >= min_auc                       (absolute floor; the only AUC bar for the first model)

A task with fewer than ``min_positives`` positives in the slice is not judged (its AUC would be noise) and is
listed under ``skipped``; the main task (``ctr``) must always be judged.

Every comparison is recorded in ``evaluation.json`` with both figures, the threshold and pass/fail.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from pipeline.evaluation.evaluate import SEGMENT_KEY, USER_KEY, EvalConfig, evaluate
from transforms import features as F
from transforms.features import FeatureContract

GATED_TASKS = (F.CTR, F.CTAVR, F.CVR, F.CTCVR)


@dataclass(frozen=True)
class GateConfig:
    auc_tolerance: float = 0.005       # absolute AUC the candidate may lose against the champion
    logloss_tolerance: float = 0.02    # relative LogLoss increase allowed (LogLoss scales with the positive rate)
    max_ece: float = 0.05              # expected calibration error bound
    min_auc: float = 0.55              # absolute floor for every candidate (and the first model's only AUC bar)
    min_positives: int = 30            # a task with fewer positives in the slice is not judged (noise)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"GateConfig.{name} must be >= 0, got {value}")
        if self.min_auc > 1:
            raise ValueError(f"GateConfig.min_auc must be <= 1, got {self.min_auc}")


def judge(candidate: Mapping[str, Mapping], champion: Optional[Mapping[str, Mapping]],
          cfg: GateConfig = GateConfig()) -> Dict:
    """Verdict of ``candidate``'s report against ``champion``'s (``None``: no model is served yet).

    Returns {"blessed", "checks": [{task, metric, candidate, champion, threshold, passed}], "reasons": [...]}.
    """
    checks: List[Dict] = []

    def check(task, metric, value, reference, threshold, passed):
        checks.append({"task": task, "metric": metric, "candidate": value, "champion": reference,
                       "threshold": threshold, "passed": bool(passed)})

    tasks = [t for t in GATED_TASKS if t in candidate]
    if not tasks:
        raise ValueError(f"candidate report has none of the gated tasks {GATED_TASKS}")
    skipped = {}
    for task in tasks:
        cand = candidate[task]
        positives = cand.get("positives")
        if positives is not None and positives < cfg.min_positives and task != tasks[0]:
            skipped[task] = f"{positives} positives in the slice < {cfg.min_positives}: not judged"
            continue
        auc, logloss, ece = cand.get("auc"), cand["logloss"], cand["ece"]
        if auc is None or np.isnan(auc):
            check(task, "auc", None, None, None, False)
            continue
        check(task, "auc_floor", auc, None, cfg.min_auc, auc >= cfg.min_auc)
        check(task, "ece", ece, None, cfg.max_ece, ece <= cfg.max_ece)
        champ = (champion or {}).get(task)
        if champ is None:
            continue
        bar = champ["auc"] - cfg.auc_tolerance
        check(task, "auc", auc, champ["auc"], bar, auc >= bar)
        bar = champ["logloss"] * (1.0 + cfg.logloss_tolerance)
        check(task, "logloss", logloss, champ["logloss"], bar, logloss <= bar)
    reasons = [_reason(c) for c in checks if not c["passed"]]
    return {"blessed": not reasons, "checks": checks, "reasons": reasons, "skipped": skipped,
            "config": asdict(cfg), "champion": champion is not None}


def _reason(c: Dict) -> str:
    if c["candidate"] is None:
        return f"{c['task']}: no AUC (one class only in the slice)"
    op = ">=" if c["metric"] in ("auc", "auc_floor") else "<="
    name = {"auc": "AUC", "auc_floor": "AUC", "ece": "ECE", "logloss": "LogLoss"}[c["metric"]]
    return f"{c['task']} {name} {c['candidate']:.4f}, needs {op} {c['threshold']:.4f}"


def format_verdict(verdict: Dict) -> str:
    """Candidate and champion side by side, one line per check, then the verdict."""
    lines = [f"{'task':8} {'check':10} {'candidate':>10} {'champion':>10} {'bar':>10}  ok"]
    fmt = (lambda v: f"{v:10.4f}" if isinstance(v, float) else f"{'-':>10}")
    for c in verdict["checks"]:
        lines.append(f"{c['task']:8} {c['metric']:10} {fmt(c['candidate'])} {fmt(c['champion'])} "
                     f"{fmt(c['threshold'])}  {'yes' if c['passed'] else 'NO'}")
    for task, why in verdict.get("skipped", {}).items():
        lines.append(f"{task:8} {why}")
    lines.append("verdict: " + ("BLESSED" if verdict["blessed"] else "REFUSED (" + "; ".join(verdict["reasons"]) + ")"))
    return "\n".join(lines)


# ---- scoring exports on raw rows ----------------------------------------------------------------------------
def raw_labels(rows: Sequence[Mapping], contract: FeatureContract) -> Dict[str, np.ndarray]:
    """Labels (click, DAction = OR of the post-click actions, purchase), user and segment of raw rows."""
    lab = contract.labels
    out = {F.CLICK: np.array([int(r[lab.click]) for r in rows], dtype=np.float32)}
    if lab.daction:
        out[F.DACTION] = np.array([int(any(int(r[c]) for c in lab.daction)) for r in rows], dtype=np.float32)
    if lab.purchase:
        out[F.PURCHASE] = np.array([int(r[lab.purchase]) for r in rows], dtype=np.float32)
    if contract.user_id:
        users = np.array([str(r.get(contract.user_id)) for r in rows], dtype=object)
        out[USER_KEY] = np.unique(users, return_inverse=True)[1].astype(np.int64)
    if contract.segment:
        out[SEGMENT_KEY] = np.array([str(r.get(contract.segment)) for r in rows], dtype=object)
    return out


def score_export(version_dir: str, examples: Sequence[bytes], batch_size: int = 2048) -> Dict[str, np.ndarray]:
    """``serving_default`` of an exported version over serialized raw ``tf.Example``s: output -> [N]."""
    import tensorflow as tf

    fn = tf.saved_model.load(version_dir).signatures["serving_default"]
    parts: Dict[str, List[np.ndarray]] = {}
    for start in range(0, len(examples), batch_size):
        out = fn(examples=tf.constant(list(examples[start:start + batch_size])))
        for k, v in out.items():
            parts.setdefault(k, []).append(v.numpy().reshape(-1))
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_export(version_dir: str, rows: Sequence[Mapping], contract: FeatureContract,
                    cfg: EvalConfig = EvalConfig()) -> Dict[str, Dict]:
    """``pipeline.evaluation.evaluate`` figures of an export on raw rows (labels read from the rows)."""
    from serving.examples import serialize_rows

    preds = score_export(version_dir, serialize_rows(rows, contract))
    return evaluate(preds, raw_labels(rows, contract), cfg)


def gate(candidate_dir: str, champion_dir: Optional[str], rows: Sequence[Mapping], contract: FeatureContract,
         cfg: GateConfig = GateConfig()) -> Dict:
    """Evaluates both exports on ``rows`` and judges; the verdict holds both reports."""
    cand = evaluate_export(candidate_dir, rows, contract)
    champ = evaluate_export(champion_dir, rows, contract) if champion_dir else None
    verdict = judge(cand, champ, cfg)
    keep = ("n", "positives", "auc", "logloss", "ece", "gauc")
    verdict["candidate_report"] = {t: {k: r[k] for k in keep if k in r} for t, r in cand.items() if t in GATED_TASKS}
    verdict["champion_report"] = None if champ is None else \
        {t: {k: r[k] for k in keep if k in r} for t, r in champ.items() if t in GATED_TASKS}
    verdict["candidate_dir"], verdict["champion_dir"], verdict["rows"] = candidate_dir, champion_dir, len(rows)
    return verdict
