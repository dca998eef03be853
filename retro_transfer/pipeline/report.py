"""The pipeline's report: ``report.md``, ``summary.json`` and figures, from the stage records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from .upstream import METHODS, read_log

LOSS_FIGURE = "loss_curves.png"
ACCURACY_FIGURE = "accuracy.png"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def loss_figure(out: Path, records: Mapping[str, Dict]) -> Path:
    """Total loss against step for the teacher and each distillation method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ["teacher"] + [f"distill_{m}" for m in METHODS]:
        if name not in records:
            continue
        log = read_log(out / name)
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=name.replace("distill_", ""), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Distillation losses (teacher: MoCo v2 pretraining)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / LOSS_FIGURE
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation_rows(records: Mapping[str, Dict]) -> List[List]:
    rows = []
    for model in ["teacher"] + list(METHODS):
        record = records.get(f"eval_{model}")
        if record is None:
            continue
        for which, m in record["metrics"].items():
            label = f"{model} ({'adapter' if which == 'adapter' else 'backbone'}, {m['dim']}-d)"
            rows.append([label, m["linear_top1"], m["linear_top5"], m["knn_top1"]])
    return rows


def accuracy_figure(out: Path, rows: Sequence[Sequence]) -> Path:
    """Linear-probe and k-NN top-1 side by side for every evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r[0] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [r[1] for r in rows], width, label="linear probe top-1")
    ax.bar([i + width / 2 for i in x], [r[3] for r in rows], width, label="k-NN top-1")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Frozen features on the shapes classification split")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    path = out / ACCURACY_FIGURE
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, preset_name: str, preset: Mapping, records: Mapping[str, Dict], sections: Sequence[str] = ()) -> Path:
    """``report.md`` and ``summary.json`` in ``out``; ``sections`` are extra markdown blocks (downstream stages)."""
    lines = [f"# retro-transfer pipeline report (preset `{preset_name}`)", ""]
    lines.append(f"Seed {preset['seed']}. Every number below comes from the stage records in this folder; "
                 "`DATA` stands for `data/shapes` in this folder. Re-running the pipeline skips stages whose output is up to date.")
    lines += ["", "## Stages", ""]
    lines += markdown_table(["stage", "seconds", "command"], [[name, r["seconds"], f"`{r['command']}`"] for name, r in records.items()])

    distill_rows = []
    for method in METHODS:
        record = records.get(f"distill_{method}")
        if record is None:
            continue
        m = record["metrics"]
        terms = ", ".join(f"{k} {m[k]:.3f}" for k in ("infonce", "seed", "mse1", "mse2") if k in m)
        distill_rows.append([method, m["student"], m["steps"], m.get("loss", float("nan")), terms, m.get("img_per_s", float("nan"))])
    if distill_rows:
        lines += ["", "## Distillation", "", f"Teacher: {records['teacher']['metrics']['arch']} pretrained with MoCo v2 for "
                  f"{records['teacher']['metrics']['steps']} steps. Final training losses:", ""]
        lines += markdown_table(["method", "student", "steps", "loss", "terms", "img/s"], distill_rows)
        lines += ["", f"![losses]({loss_figure(out, records).name})"]

    rows = evaluation_rows(records)
    if rows:
        lines += ["", "## Frozen-feature evaluation", "",
                  f"Linear probe on features computed once (centre crop, {preset['probe_epochs']} epochs, lr {preset['probe_lr']}) "
                  f"and cosine k-NN (k = {preset['knn_k']}, T = 0.07) on the shapes classification split.", ""]
        lines += markdown_table(["model (features)", "linear top-1", "linear top-5", "k-NN top-1"], rows)
        lines += ["", f"![accuracy]({accuracy_figure(out, rows).name})"]
    for section in sections:
        lines += ["", section]

    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    summary = {"preset": preset_name, "settings": dict(preset),
               "stages": {name: {"seconds": r["seconds"], "command": r["command"], "metrics": r["metrics"]} for name, r in records.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return report
