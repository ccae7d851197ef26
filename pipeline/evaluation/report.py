"""The benchmark report: mean ± std over seeds, the oracle, RelaImpr against a baseline, and PNG plots.

Input: per (model, seed) the evaluation report of ``pipeline.evaluation.evaluate.evaluate`` and the Keras training
history. Output (in one directory): ``report.json`` (every scalar per seed, the aggregates, the oracle),
``report.md`` (tables a person reads, among them the AUC of every segment and which segment was the worst in how
many seeds; plots embedded) and the plots:

* ``roc_<task>.png``: ROC curve per model (first seed) with the oracle's;
* ``reliability_<task>.png``: reliability curve per model (first seed) with the oracle's;
* ``segment_auc_<task>.png``: AUC per business segment, mean ± std over seeds, oracle beside;
* ``training_curves.png``: training and validation loss per epoch, mean over seeds.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from pipeline.evaluation.metrics import rela_impr

# Scalar metrics aggregated over seeds, in report order (those absent from a task are skipped).
METRICS = ("auc", "gauc", "gauc_uniform", "ndcg@10", "logloss", "ece", "precision@10%", "recall@10%", "f1@10%",
           "worst_segment_auc", "few_events_auc")
TASK_ORDER = ("ctr", "ctavr", "cvr", "cvr_entire", "ctcvr")
RELA_IMPR_METRICS = ("auc", "gauc")
# Key of a run's ``model.diagnostics()`` figures (about the trained model itself) beside the tasks.
DIAGNOSTICS = "diagnostics"


def scalars(task_report: Dict, task: Optional[str] = None) -> Dict[str, float]:
    """The scalar metrics of one task's evaluation (curves and per-segment tables dropped); for the
    ``DIAGNOSTICS`` entry, all of its figures."""
    if task == DIAGNOSTICS:
        return {k: float(v) for k, v in task_report.items()}
    out = {m: float(task_report[m]) for m in METRICS if m in task_report and task_report[m] is not None}
    worst = task_report.get("worst_segment")
    if worst:
        out["worst_segment_auc"] = float(worst[1])
    if "nmi" in task_report:
        out["nmi"] = float(task_report["nmi"])
    return out


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    ok = v[~np.isnan(v)]
    return {"mean": float(ok.mean()) if ok.size else float("nan"),
            "std": float(ok.std()) if ok.size else float("nan"), "values": [float(x) for x in v]}


def aggregate(runs: Dict[str, List[Dict]], baseline: Optional[str]) -> Dict:
    """Summary of ``runs`` (model -> [evaluation report per seed]).

    Returns {"summary": model -> task -> metric -> {mean, std, values}, "oracle": task -> metric -> value,
    "rela_impr": model -> task -> metric -> percent (STAN Eq. 15, of the means, against ``baseline``)}.
    """
    summary: Dict[str, Dict[str, Dict]] = {}
    oracle: Dict[str, Dict[str, float]] = {}
    for model, reports in runs.items():
        tasks = [t for t in TASK_ORDER if any(t in r for r in reports)]
        tasks += sorted({t for r in reports for t in r if t not in TASK_ORDER})
        for task in tasks:
            per_seed = [scalars(r[task], task) for r in reports if task in r]
            known = list(METRICS) + ["nmi"]
            names = [m for m in known if any(m in s for s in per_seed)]
            names += sorted({m for s in per_seed for m in s} - set(known))
            summary.setdefault(model, {})[task] = {
                m: _mean_std([s.get(m, float("nan")) for s in per_seed]) for m in names}
            for r in reports:
                if task in r and "oracle" in r[task] and task not in oracle:
                    oracle[task] = scalars(r[task]["oracle"])
    rela: Dict[str, Dict[str, Dict[str, float]]] = {}
    if baseline and baseline in summary:
        for model, per_task in summary.items():
            for task, per_metric in per_task.items():
                base = summary[baseline].get(task, {})
                for m in RELA_IMPR_METRICS:
                    if m in per_metric and m in base and not math.isnan(base[m]["mean"]) \
                            and base[m]["mean"] != 0.5:
                        rela.setdefault(model, {}).setdefault(task, {})[m] = rela_impr(
                            per_metric[m]["mean"], base[m]["mean"])
    return {"summary": summary, "oracle": oracle, "rela_impr": rela, "segments": segment_summary(runs)}


def segment_summary(runs: Dict[str, List[Dict]]) -> Dict[str, Dict]:
    """Per task with a segment column: {"names": sorted segments, "rows": segment -> eval rows, "auc": model ->
    segment -> {mean, std, values} over seeds, "worst": model -> segment -> seeds in which it was the worst
    eligible segment, "oracle": segment -> the oracle's AUC}."""
    out: Dict[str, Dict] = {}
    for task in TASK_ORDER:
        names = sorted({s for reports in runs.values() for r in reports if task in r
                        for s in r[task].get("segment_auc", {})})
        if not names:
            continue
        entry: Dict = {"names": names, "rows": {}, "auc": {}, "worst": {}, "oracle": {}}
        for model, reports in runs.items():
            seeds = [r[task] for r in reports if task in r]
            if not seeds:
                continue
            entry["rows"].update(seeds[0].get("segment_rows", {}))
            entry["auc"][model] = {s: _mean_std([r.get("segment_auc", {}).get(s, float("nan")) for r in seeds])
                                   for s in names}
            worst = [r["worst_segment"][0] for r in seeds if r.get("worst_segment")]
            entry["worst"][model] = {s: worst.count(s) for s in sorted(set(worst))}
            if not entry["oracle"] and "segment_auc" in seeds[0].get("oracle", {}):
                entry["oracle"] = dict(seeds[0]["oracle"]["segment_auc"])
        out[task] = entry
    return out


def segment_tables(agg: Dict) -> List[str]:
    """Markdown: per task, AUC per segment (mean ± std over seeds) and which segment was the worst in how many
    seeds, with the oracle's row."""
    out: List[str] = []
    for task, entry in agg.get("segments", {}).items():
        names = entry["names"]
        rows = ", ".join(f"{s} {entry['rows'][s]:,}" for s in names if s in entry["rows"])
        out += [f"## AUC per segment: {task}", "", f"Eval rows per segment: {rows}.", "",
                "| model | " + " | ".join(names) + " | worst (seeds) |", "|---|" + "---|" * (len(names) + 1)]
        for model, per_segment in entry["auc"].items():
            worst = ", ".join(f"{s} ×{n}" for s, n in entry["worst"].get(model, {}).items()) or "-"
            out.append(f"| {model} | " + " | ".join(_cell(per_segment.get(s)) for s in names) + f" | {worst} |")
        if entry["oracle"]:
            out.append("| *oracle* | " + " | ".join(
                "-" if math.isnan(entry["oracle"].get(s, float("nan"))) else f"{entry['oracle'][s]:.4f}"
                for s in names) + " | |")
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------- markdown

def _cell(stat: Optional[Dict[str, float]]) -> str:
    if not stat or math.isnan(stat["mean"]):
        return "-"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def metric_table(agg: Dict, metric: str, tasks: Sequence[str]) -> List[str]:
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for model, per_task in agg["summary"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(per_task.get(t, {}).get(metric)) for t in tasks) + " |")
    if any(metric in agg["oracle"].get(t, {}) for t in tasks):
        lines.append("| *oracle* | " + " | ".join(
            f"{agg['oracle'][t][metric]:.4f}" if metric in agg["oracle"].get(t, {}) else "-" for t in tasks) + " |")
    return lines


def markdown(result: Dict, agg: Dict, plots: Sequence[str]) -> str:
    tasks = [t for t in TASK_ORDER if any(t in per_task for per_task in agg["summary"].values())]
    out = [f"# Benchmark: {', '.join(result['models'])} on {result.get('dataset', '?')}", "",
           f"- seeds: {result['seeds']} (mean ± std over seeds); epochs: {result['epochs']}; "
           f"eval rows: {result.get('eval_rows', '?')}",
           f"- baseline for RelaImpr: **{result.get('baseline') or '-'}**",
           "- CVR is judged on clicked impressions (`cvr`) and over all impressions (`cvr_entire`).",
           "- *oracle*: the same metric computed from the generator's true probabilities (planted-truth data).",
           ""]
    titles = {"auc": "AUC", "gauc": "GAUC (per user, weighted by impressions)", "logloss": "LogLoss",
              "ece": "Expected calibration error", "ndcg@10": "NDCG@10 per user",
              "f1@10%": "F1 of the top 10% (ESM² Tables 4-5)", "worst_segment_auc": "Worst-segment AUC",
              "few_events_auc": "AUC on users with few earlier events (< 5)"}
    for metric, title in titles.items():
        if any(metric in per_metric for per_task in agg["summary"].values() for per_metric in per_task.values()):
            out += [f"## {title}", ""] + metric_table(agg, metric, tasks) + [""]
    out += segment_tables(agg)
    if agg["rela_impr"]:
        out += [f"## RelaImpr vs {result.get('baseline')} (%, STAN Eq. 15)", "",
                "| model | " + " | ".join(f"{t} {m.upper()}" for t in tasks for m in RELA_IMPR_METRICS) + " |",
                "|---|" + "---|" * (len(tasks) * len(RELA_IMPR_METRICS))]
        for model, per_task in agg["rela_impr"].items():
            cells = [f"{per_task[t][m]:+.2f}" if m in per_task.get(t, {}) else "-"
                     for t in tasks for m in RELA_IMPR_METRICS]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        out.append("")
    latent = sorted({t for per_task in agg["summary"].values() for t, pm in per_task.items() if "nmi" in pm})
    if latent:
        out += ["## Latent assignments vs hidden truth (NMI)", "", "| model | " + " | ".join(latent) + " |",
                "|---|" + "---|" * len(latent)]
        for model, per_task in agg["summary"].items():
            out.append(f"| {model} | " + " | ".join(_cell(per_task.get(t, {}).get("nmi")) for t in latent) + " |")
        out.append("")
    diagnosed = {m: per_task[DIAGNOSTICS] for m, per_task in agg["summary"].items() if DIAGNOSTICS in per_task}
    if diagnosed:
        names = sorted({n for figures in diagnosed.values() for n in figures})
        out += ["## Model diagnostics (`diagnostics()`, about the trained model itself)", "",
                "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for model, figures in diagnosed.items():
            out.append(f"| {model} | " + " | ".join(_cell(figures.get(n)) for n in names) + " |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(runs: Dict[str, List[Dict]], histories: Dict[str, List[Dict]], agg: Dict, out_dir: str) -> List[str]:
    """Writes the PNGs; returns their file names (relative to ``out_dir``)."""
    plt = _pyplot()
    written: List[str] = []
    tasks = [t for t in TASK_ORDER if any(t in r[0] for r in runs.values() if r)]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=90)
        plt.close(fig)
        written.append(name)

    for task in tasks:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        oracle_curve = None
        for model, reports in runs.items():
            if reports and task in reports[0]:
                r = reports[0][task]
                ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{model} ({r['auc']:.3f})")
                oracle_curve = oracle_curve or r.get("oracle")
        if oracle_curve:
            ax.plot(oracle_curve["roc"]["fpr"], oracle_curve["roc"]["tpr"], "k--",
                    label=f"oracle ({oracle_curve['auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {task}")
        ax.legend(fontsize=8, loc="lower right")
        save(fig, f"roc_{task}.png")

        fig, ax = plt.subplots(figsize=(5, 4.5))
        for model, reports in runs.items():
            if reports and task in reports[0]:
                rel = reports[0][task]["reliability"]
                ax.plot(rel["mean_predicted"], rel["observed_rate"], "o-", ms=3,
                        label=f"{model} (ECE {reports[0][task]['ece']:.4f})")
        if oracle_curve:
            rel = oracle_curve["reliability"]
            ax.plot(rel["mean_predicted"], rel["observed_rate"], "k--", label=f"oracle (ECE {oracle_curve['ece']:.4f})")
        lim = max([1e-3] + [max(r[0][task]["reliability"]["mean_predicted"] + r[0][task]["reliability"]["observed_rate"])
                            for r in runs.values() if r and task in r[0]])
        ax.plot([0, lim], [0, lim], color="0.8", lw=1)
        ax.set(xlabel="mean predicted probability", ylabel="observed rate", title=f"Reliability: {task}")
        ax.legend(fontsize=8, loc="upper left")
        save(fig, f"reliability_{task}.png")

        segments = agg.get("segments", {}).get(task)
        if segments:
            seg_names = segments["names"]
            fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(seg_names) * (len(runs) + 1) / 2), 4))
            width = 0.8 / (len(runs) + 1)
            x = np.arange(len(seg_names))
            for i, (model, per_segment) in enumerate(segments["auc"].items()):
                # a segment holding one class has no AUC: a gap
                ax.bar(x + i * width, [per_segment[s]["mean"] for s in seg_names], width,
                       yerr=[per_segment[s]["std"] for s in seg_names], label=model)
            if segments["oracle"]:
                ax.bar(x + len(runs) * width, [segments["oracle"].get(s, np.nan) for s in seg_names], width,
                       color="0.3", label="oracle")
            ax.set_xticks(x + width * len(runs) / 2, seg_names)
            ax.set_ylim(0.5, 1.0)
            ax.set(ylabel="AUC", title=f"AUC per segment: {task}")
            ax.legend(fontsize=8)
            save(fig, f"segment_auc_{task}.png")

    if any(histories.values()):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for model, hs in histories.items():
            for key, style in (("loss", "-"), ("val_loss", "--")):
                curves = [h[key] for h in hs if key in h]
                if curves:
                    n = min(len(c) for c in curves)
                    mean = np.mean([c[:n] for c in curves], axis=0)
                    ax.plot(np.arange(1, n + 1), mean, style, marker="o", ms=3, label=f"{model} {key}")
        ax.set(xlabel="epoch", ylabel="loss (mean over seeds)", title="Training curves")
        ax.legend(fontsize=8)
        save(fig, "training_curves.png")
    return written


def write_report(result: Dict, runs: Dict[str, List[Dict]], histories: Dict[str, List[Dict]], out_dir: str,
                 plots: bool = True) -> Dict:
    """Writes report.json, report.md and (``plots``) the PNGs; returns the aggregate."""
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(runs, result.get("baseline"))
    written = plot_all(runs, histories, agg, out_dir) if plots else []
    per_seed = {m: [{t: scalars(r[t], t) for t in r} for r in reports] for m, reports in runs.items()}
    payload = dict(result, **agg, per_seed=per_seed, history=histories, plots=written)
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(markdown(result, agg, written))
    return agg


def write_run_report(model: str, dataset: str, eval_report: Dict, history: Optional[Dict], out_dir: str,
                     header: Sequence[str] = ()) -> str:
    """One training run's report (``pipeline.run``): ``out_dir/report.md`` with a summary table (one row per
    task: the scalar metrics of ``scalars``), the per-segment AUC tables of ``segment_tables`` and the plots of
    ``plot_all`` (ROC and reliability per task, AUC per segment, training curves) beside it. ``header``: extra
    markdown lines under the title. Returns the path of report.md."""
    os.makedirs(out_dir, exist_ok=True)
    runs = {model: [eval_report]}
    histories = {model: [history]} if history else {}
    agg = aggregate(runs, None)
    plots = plot_all(runs, histories, agg, out_dir)
    tasks = [t for t in TASK_ORDER if t in eval_report] + sorted(
        t for t in eval_report if t not in TASK_ORDER and t != DIAGNOSTICS)
    per_task = {t: scalars(eval_report[t], t) for t in tasks}
    metrics = [m for m in METRICS if any(m in s for s in per_task.values())]
    oracle = any("oracle_auc" in eval_report[t] for t in tasks)
    out = [f"# Run: {model} on {dataset}", ""] + list(header) + [
        "", "## Summary (eval split)", "",
        "| task | rows | positives | " + " | ".join(metrics) + (" | oracle auc |" if oracle else " |"),
        "|---|---|---|" + "---|" * (len(metrics) + oracle)]
    for t in tasks:
        r = eval_report[t]
        cells = [str(r.get("n", "-")), str(r.get("positives", "-"))] + [
            "-" if m not in per_task[t] or math.isnan(per_task[t][m]) else f"{per_task[t][m]:.4f}" for m in metrics]
        if oracle:
            o = r.get("oracle_auc")
            cells.append("-" if o is None or math.isnan(o) else f"{o:.4f}")
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    out.append("")
    out += segment_tables(agg)
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(out))
    return path
