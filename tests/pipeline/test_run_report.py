"""pipeline.run leaves WORK_DIR/report.md: a summary table whose AUCs are the evaluation's, per-segment AUC, and
the ROC / reliability / training-curve plots it links; the printed summary ends with the report's path."""
import json
import os
import re

from pipeline import run as run_mod
from pipeline.evaluation.report import TASK_ORDER
from transforms.schema import SCHEMA_DIR


def _table(lines, first_header_cell):
    """{row name: {column: cell}} of the markdown table whose header starts with ``first_header_cell``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_run_writes_a_report_with_the_evaluation_figures_and_its_plots(tmp_path, capsys):
    work = tmp_path / "w"
    # a shared dataset with a segment column (cms_segid), small and without per-user features: quick
    summary = run_mod.run(["--schema", os.path.join(SCHEMA_DIR, "taobao-ad-tiny.yaml"), "--epochs", "2",
                           "--early-stopping-patience", "0", "--batch-size", "32", "--score-rows", "1",
                           "--no-tensorboard", "--work-dir", str(work)])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    path = os.path.join(str(work), "report.md")
    assert printed[-1] == f"report: {path}"
    with open(os.path.join(str(work), "summary.json")) as fh:
        evaluation = json.load(fh)["eval"]
    tasks = [t for t in TASK_ORDER if t in evaluation and "auc" in evaluation[t]]
    assert tasks, evaluation.keys()

    with open(path) as fh:
        lines = fh.read().splitlines()
    table = _table(lines, "task")
    for task in tasks:
        auc = evaluation[task]["auc"]
        cell = table[task]["auc"]
        assert (cell == "-") if auc is None or auc != auc else float(cell) == round(auc, 4), (task, cell, auc)
        assert int(table[task]["rows"]) == evaluation[task]["n"]

    # per-segment AUC of the click task, as evaluated
    seg = evaluation["ctr"]["segment_auc"]
    assert seg
    start = lines.index("## AUC per segment: ctr")
    model_row = _table(lines[start:], "model")[summary["model"]]
    for name, auc in seg.items():
        cell = model_row[name]
        assert (cell == "-") if auc != auc else float(cell.split(" ± ")[0]) == round(auc, 4), (name, cell)

    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "\n".join(lines))
    want = {f"roc_{t}.png" for t in tasks} | {f"reliability_{t}.png" for t in tasks} | {"training_curves.png"}
    assert want <= set(linked), (want, linked)
    for name in linked:
        png = os.path.join(str(work), name)
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
