"""The pipeline's report: ``report.md``, ``summary.json`` and figures, from the stage records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from . import stats
from .runner import read_json
from .upstream import METHODS, PER_IMAGE, PROVENANCE, STUDENT_ARCH, read_log

LOSS_FIGURE = "loss_curves.png"
ACCURACY_FIGURE = "accuracy.png"
KNN_FIGURE = "knn_curves.png"
BASELINE = "moco_v2"  # the student every distilled student is compared with
RANDOM = "random"  # eval_random: randomly initialised networks, keyed by architecture


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _log_curves(out: Path, records: Mapping[str, Dict], key: str, ylabel: str, title: str, filename: str) -> Path:
    """``key`` of each training log against step: the teacher's pretraining and each method's distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ["teacher"] + [f"distill_{m}" for m in METHODS]:
        points = [(r["step"], r[key]) for r in read_log(out / name) if key in r] if name in records else []
        if points:
            ax.plot(*zip(*points), label=name.replace("distill_", ""), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / filename
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_figure(out: Path, records: Mapping[str, Dict]) -> Path:
    recipe = records["teacher"]["metrics"].get("recipe", "moco_v2") if "teacher" in records else "moco_v2"
    teacher = {"supcon": "SupCon pretraining", "moco_v2": "MoCo v2 pretraining", "user": "the user's, not trained here"}[recipe]
    return _log_curves(out, records, "loss", "training loss", f"Distillation losses (teacher: {teacher})", LOSS_FIGURE)


def knn_figure(out: Path, records: Mapping[str, Dict]) -> Path:
    return _log_curves(out, records, "knn_top1", "k-NN top-1 (%)",
                       "Online k-NN monitor on the classification split, while training", KNN_FIGURE)


def frozen_feature_evidence(out: Path, records: Mapping[str, Dict]) -> Dict[str, Dict]:
    """Per evaluated model: linear and k-NN top-1 with intervals, and the linear gap to the baseline student."""
    per_image = {}
    for model in [RANDOM, "teacher"] + list(METHODS):
        if f"eval_{model}" in records and (out / f"eval_{model}" / PER_IMAGE).exists():
            for which, flags in read_json(out / f"eval_{model}" / PER_IMAGE).items():
                per_image[(model, which)] = flags
    if not per_image:
        return {}
    n = len(next(iter(per_image.values()))["linear"])
    baseline = per_image.get((BASELINE, "backbone"))
    evidence = {}
    for (model, which), flags in per_image.items():
        linear = stats.accuracy(flags["linear"])
        entry = {"linear": stats.bootstrap(linear, n), "knn": stats.bootstrap(stats.accuracy(flags["knn"]), n), "vs_baseline": None}
        if baseline is not None and model not in (BASELINE, RANDOM):
            entry["vs_baseline"] = stats.paired_difference(linear, stats.accuracy(baseline["linear"]), n)
        evidence[(model, which)] = entry
    add_floor_comparisons(evidence, per_image, records, n)
    add_semisup_intervals(evidence, out, records)
    return evidence


def add_semisup_intervals(evidence: Dict, out: Path, records: Mapping[str, Dict]) -> None:
    """The 10%-label fine-tune's top-1 with its bootstrap interval, on each model's backbone row."""
    for (model, which), entry in evidence.items():
        path = out / f"semisup_{model}" / PER_IMAGE
        if which == "backbone" and f"semisup_{model}" in records and path.exists():
            flags = read_json(path)["backbone"]["semisup"]
            entry["semisup"] = stats.bootstrap(stats.accuracy(flags), len(flags))


def architecture_of(model: str, records: Mapping[str, Dict]):
    """The network a model's features come from: the teacher's arch, or a student's (from its distillation record)."""
    stage = "teacher" if model == "teacher" else f"distill_{model}"
    metrics = records.get(stage, {}).get("metrics", {})
    return metrics.get("arch") if model == "teacher" else metrics.get("student")


def add_floor_comparisons(evidence: Dict, per_image: Mapping, records: Mapping[str, Dict], n: int) -> None:
    """Each model against the same architecture randomly initialised: paired bootstraps of linear and k-NN top-1.

    ``vs_random`` (linear) and ``vs_random_knn``; the Retro adapter row is
    compared with its student's random backbone (the adapter has no floor of its own).
    """
    for (model, which), entry in evidence.items():
        floor = per_image.get((RANDOM, architecture_of(model, records))) if model != RANDOM else None
        if floor is None:
            continue
        flags = per_image[(model, which)]
        entry["vs_random"] = stats.paired_difference(stats.accuracy(flags["linear"]), stats.accuracy(floor["linear"]), n)
        entry["vs_random_knn"] = stats.paired_difference(stats.accuracy(flags["knn"]), stats.accuracy(floor["knn"]), n)


def floor_text(entry) -> str:
    """Linear and k-NN differences from the architecture's random floor, each with its interval and verdict."""
    if not entry or entry.get("vs_random") is None:
        return "-"
    return f"linear {difference_text(entry['vs_random'])}; k-NN {difference_text(entry['vs_random_knn'])}"


def difference_text(estimate) -> str:
    if estimate is None:
        return "-"
    verdict = "significant" if stats.significant(estimate) else "not significant"
    return f"{estimate.value:+.1f} [{estimate.low:+.1f}, {estimate.high:+.1f}] ({verdict})"


def evaluation_rows(records: Mapping[str, Dict], evidence: Mapping = None) -> List[List]:
    rows = []
    for model in [RANDOM, "teacher"] + list(METHODS):
        record = records.get(f"eval_{model}")
        if record is None:
            continue
        for which, m in record["metrics"].items():
            if model == RANDOM:
                label = f"random init ({which}, {m['dim']}-d)"
            else:
                label = f"{model} ({'adapter' if which == 'adapter' else 'backbone'}, {m['dim']}-d)"
            e = (evidence or {}).get((model, which))
            linear = str(e["linear"]) if e else m["linear_top1"]
            knn = str(e["knn"]) if e else m["knn_top1"]
            semisup = records.get(f"semisup_{model}") if which == "backbone" and model != RANDOM else None
            semisup = semisup_cell(semisup, e)
            rows.append([label, linear, m["linear_top5"], knn, semisup,
                         difference_text(e["vs_baseline"]) if e else "-", floor_text(e)])
    return rows


def semisup_cell(record, entry) -> str:
    """The fine-tune's top-1 (with interval) and, in brackets, where it started: the probe on the labelled images."""
    if record is None:
        return "-"
    value = str(entry["semisup"]) if entry and "semisup" in entry else _fmt(record["metrics"]["top1"])
    start = (record["metrics"].get("head_probe") or {}).get("start_top1")
    return value + (f" (start {start:.1f})" if start is not None else "")


def semisup_recipe_text(preset: Mapping) -> str:
    """The 10%-label column's recipe in words (the stage's settings: upstream.SEMISUP_RECIPE)."""
    from .upstream import SEMISUP_RECIPE as r

    return (f"10%-label column: the whole network fine-tuned on 10% of the training labels per class "
            f"({preset.get('semisup_epochs', '-')} epochs, batch {r['batch_size']}, {r['optimizer_name'].replace('adamw', 'AdamW')}, learning rate "
            f"{r['lr_backbone']:g} for the backbone and {r['lr_classifier']:g} for the head, {r['schedule']} decay; the head "
            f"starts from the standardised linear probe fitted on the labelled images; BatchNorm frozen at its running "
            f"statistics; tools/semisup_eval.py, command in the stage table). \"start\": the top-1 of that probe before "
            f"fine-tuning; it saw a tenth of the labels the linear-probe column saw.")


def accuracy_figure(out: Path, rows: Sequence[Mapping]) -> Path:
    """Linear-probe and k-NN top-1 side by side for every evaluated model, with bootstrap intervals.

    ``rows``: dicts with ``label`` and ``linear`` / ``knn`` :class:`stats.Estimate`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.38
    for offset, column, name in ((-width / 2, "linear", "linear probe top-1"), (width / 2, "knn", "k-NN top-1")):
        values = [r[column].value for r in rows]
        errors = [[r[column].value - r[column].low for r in rows], [r[column].high - r[column].value for r in rows]]
        ax.bar([i + offset for i in x], values, width, yerr=errors, capsize=3, label=f"{name} (95% interval)")
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


def method_settings_lines(records: Mapping[str, Dict]) -> List[str]:
    """What the consistency terms weighed and what Retro's mean student averaged, for the runs that recorded it."""
    lines = []
    for method in ("disco", "retro"):
        m = records.get(f"distill_{method}", {}).get("metrics", {})
        if "mse_weight" in m:
            lines.append(f"{method}: each consistency MSE is a per-image mean weighted {m['mse_weight']:g} "
                         "(`loss.mse_weight`; 32 is the released recipe).")
        if "adapter_ema" in m:
            averaged = "backbone and adapter" if m["adapter_ema"] else "backbone only, keys through the online adapter"
            lines.append(f"retro: the mean student averages the {averaged} (`adapter.ema={str(m['adapter_ema']).lower()}`).")
    return ["", *lines] if lines else []


def teacher_provenance(metrics: Mapping) -> str:
    """The report's first line: how the teacher was made, and that the students never see a label."""
    return PROVENANCE[metrics.get("recipe", "moco_v2")].format(**metrics)


def teacher_summary(metrics: Mapping) -> str:
    """``resnet18 pretrained with SupCon (labels) for 240 steps``, or the user's file."""
    recipe = metrics.get("recipe", "moco_v2")
    if recipe == "user":
        return f"the user's {metrics['arch']} ({metrics['path']})"
    words = {"supcon": "SupCon (with labels)", "moco_v2": "MoCo v2 (self-supervised)"}[recipe]
    return f"{metrics['arch']} pretrained with {words} for {metrics['steps']} steps"


def write_report(
    out: Path, preset_name: str, preset: Mapping, records: Mapping[str, Dict], sections: Sequence[str] = (),
    verdict: Sequence[str] = (), settings_line: str = "",
) -> Path:
    """``report.md`` and ``summary.json`` in ``out``; ``sections`` are extra markdown blocks (downstream stages),
    ``verdict`` the lines of the summary in words that opens the report, ``settings_line`` the run's
    settings in words (preset, seed, changed fields: :func:`.settings.describe`)."""
    lines = [f"# retro-transfer pipeline report (preset `{preset_name}`)", ""]
    if "teacher" in records:
        lines += [teacher_provenance(records["teacher"]["metrics"]), ""]
    settings_line = settings_line or f"preset `{preset_name}`, seed {preset['seed']}"
    lines.append(f"Settings: {settings_line}. Every number below comes from the stage records in this folder; "
                 "`DATA` stands for `data/shapes` in this folder. Re-running the pipeline skips stages whose output is up to date.")
    head = len(lines)  # the verdict goes here: after the title, the teacher's provenance and the settings
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
        lines += ["", "## Distillation", "", f"Teacher: {teacher_summary(records['teacher']['metrics'])}. Final training losses:", ""]
        lines += markdown_table(["method", "student", "steps", "loss", "terms", "img/s"], distill_rows)
        lines += method_settings_lines(records)
        lines += ["", f"![losses]({loss_figure(out, records).name})"]

    evidence = frozen_feature_evidence(out, records)
    rows = evaluation_rows(records, evidence)
    if rows:
        num_val = next(iter(records["eval_teacher"]["metrics"].values())).get("num_val") if "eval_teacher" in records else None
        lines += ["", "## Frozen-feature evaluation", "",
                  "Linear probe: logistic regression (L-BFGS) on centre-crop features standardised with the training split's statistics, "
                  "its L2 strength chosen on a held-out fifth of the training split (never val), "
                  f"and cosine k-NN (k = {preset['knn_k']}, T = 0.07) on the shapes classification split"
                  + (f" ({num_val} validation images: one image is {100 / num_val:.2f} points)" if num_val else "")
                  + f". Brackets: 95% bootstrap intervals over validation images; \"linear vs {BASELINE}\" is the paired "
                  f"bootstrap of the linear top-1 difference from the {BASELINE} (MoCo v2 alone) student, and "
                  "\"vs its own random init\" those of the linear and k-NN top-1 differences from the same architecture "
                  "randomly initialised (the rows that open the table; the Retro adapter is compared with its student's). "
                  + semisup_recipe_text(preset), ""]
        lines += markdown_table(
            ["model (features)", "linear top-1", "linear top-5", "k-NN top-1", "10%-label fine-tune top-1", f"linear vs {BASELINE}",
             "vs its own random init"], rows
        )
        if evidence:
            bars = [{"label": f"{m} ({w})", **e} for (m, w), e in evidence.items()]
            lines += ["", f"![accuracy]({accuracy_figure(out, bars).name})"]
        lines += ["", "k-NN top-1 of the online networks while they trained (the engine's monitor):", "",
                  f"![k-NN curves]({knn_figure(out, records).name})"]
    for section in sections:
        lines += ["", section]
    if verdict:
        lines[head:head] = ["", "## Verdict", "", *verdict]

    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    summary = {"preset": preset_name, "settings": dict(preset),
               "stages": {name: {"seconds": r["seconds"], "command": r["command"], "metrics": r["metrics"]} for name, r in records.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return report


def _said(difference) -> str:
    return "significant" if stats.significant(difference) else "not significant: the interval includes 0"


def _short(d) -> str:
    """``+3.0 [-1.0, +7.0] (n.s.)``: a difference, its interval, and whether it is significant, in few characters."""
    return f"{d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}]{'' if stats.significant(d) else ' (n.s.)'}"


def verdict_lines(records: Mapping[str, Dict], frozen: Mapping, detection: Mapping, segmentation: Mapping) -> List[str]:
    """The report's opening: what beat what, in words, each difference with its interval and significance."""
    lines = []
    teacher = frozen.get(("teacher", "backbone"))
    if teacher:
        arch = records["teacher"]["metrics"]["arch"]
        classes = records["data"]["metrics"]["classes"]
        how = {"supcon": "SupCon, trained with labels", "moco_v2": "MoCo v2, no labels", "user": "the user's checkpoint"}
        line = (f"- **Teacher** ({arch}, {how[records['teacher']['metrics'].get('recipe', 'moco_v2')]}): linear-probe top-1 {teacher['linear']} "
                f"(chance {100 / classes:.1f})")
        d = teacher.get("vs_random")
        if d is not None:
            line += (f"; against the same network randomly initialised {d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}] "
                     f"({_said(d)})")
        lines.append(line + ".")
    baseline = frozen.get((BASELINE, "backbone"))
    if baseline:
        parts = []
        for method in METHODS:
            e = frozen.get((method, "backbone"))
            if method != BASELINE and e and e["vs_baseline"] is not None:
                d = e["vs_baseline"]
                parts.append(f"{method} {e['linear']}, {d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}] ({_said(d)})")
        student_random = frozen.get((RANDOM, STUDENT_ARCH))
        floor = f" A randomly initialised {STUDENT_ARCH} scores {student_random['linear']}." if student_random else ""
        lines.append(f"- **Students** against the MoCo-v2-alone student ({baseline['linear']}): " + "; ".join(parts) + "." + floor)
    floors = [f"{model}: linear {_short(e['vs_random'])}, k-NN {_short(e['vs_random_knn'])}"
              for model in ["teacher"] + list(METHODS) for e in [frozen.get((model, "backbone"))] if e and e.get("vs_random")]
    if floors:
        lines.append("- **Against their own random initialisation** (each the same architecture randomly initialised; "
                     "n.s.: not significant): " + "; ".join(floors) + ".")
    retro = frozen.get(("retro", "backbone"))
    if teacher and retro:
        gap = retro["linear"].value - teacher["linear"].value
        lines.append(f"- **Retro student vs teacher**: {gap:+.1f} points of linear-probe top-1 "
                     f"({retro['linear']} against {teacher['linear']}).")
    for task, metric, evidence in (("Detection", "AP50", detection), ("Segmentation", "mIoU", segmentation)):
        if "retro" in evidence and evidence["retro"]["vs_random"] is not None:
            d = evidence["retro"]["vs_random"]
            lines.append(f"- **{task}** ({metric}): from the Retro student {evidence['retro']['value']}, from random "
                         f"initialisation {evidence['random']['value']}; difference {d.value:+.1f} "
                         f"[{d.low:+.1f}, {d.high:+.1f}] ({_said(d)}).")
    return lines
