"""A small stage runner: each stage owns a folder, and a finished stage is skipped on re-run.

A stage writes its outputs to ``OUT/<stage>/`` and, last of all, a record
``OUT/<stage>/stage.json`` (atomically) with its metrics, the command that
reproduces it, how long it took, and the run ids of the stages it read. A stage
is up to date when its record exists, holds the command the stage would run
now (so a changed setting redoes it), and names the current run ids of its
dependencies: deleting a stage's folder therefore redoes that stage and,
through the changed run id, every stage after it, and nothing else.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

RECORD = "stage.json"


@dataclass
class Stage:
    """One step of the pipeline.

    ``run(ctx, folder)`` does the work, writing into ``folder``, and returns the
    metrics to record (JSON-serialisable). ``command(ctx, folder)`` is the shell
    command a person would type to do the same, recorded for the report.
    """

    name: str
    run: Callable[["Context", Path], Dict]
    command: Callable[["Context", Path], str]
    deps: Sequence[str] = field(default_factory=tuple)
    title: str = ""


@dataclass
class Context:
    """What stages share: the output root, the preset, and the records of finished stages."""

    out: Path
    preset: Mapping
    records: Dict[str, Dict] = field(default_factory=dict)

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def metrics(self, stage: str) -> Dict:
        return self.records[stage]["metrics"]


def read_record(folder: Path) -> Optional[Dict]:
    try:
        return json.loads((folder / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save_json(obj, path: Path) -> None:
    """Write JSON atomically (a crash leaves the old file or the new one, never half of one)."""
    from retro_transfer.safe_io import save_atomic

    save_atomic(obj, path, dump=lambda o, f: f.write((json.dumps(o, indent=2, sort_keys=True) + "\n").encode()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _write_record(folder: Path, record: Dict) -> None:
    save_json(record, folder / RECORD)


def _check_graph(stages: Sequence[Stage]) -> None:
    seen = set()
    for stage in stages:
        unknown = [d for d in stage.deps if d not in seen]
        if unknown:
            raise ValueError(f"stage {stage.name} depends on {unknown}, which do not come before it")
        seen.add(stage.name)


def run_pipeline(
    stages: Sequence[Stage], ctx: Context, force: Sequence[str] = (), log: Callable[[str], None] = print
) -> Dict[str, Dict]:
    """Run ``stages`` in order, skipping those that are up to date; returns every record.

    ``force`` names stages to redo (``"all"`` for every one); stages after a
    redone stage are redone too, since the run id they recorded changes.
    """
    _check_graph(stages)
    ctx.out.mkdir(parents=True, exist_ok=True)
    total = len(stages)
    for index, stage in enumerate(stages, start=1):
        folder = ctx.folder(stage.name)
        record = read_record(folder)
        inputs = {dep: ctx.records[dep]["run_id"] for dep in stage.deps}
        command = stage.command(ctx, folder)
        forced = "all" in force or stage.name in force
        # Up to date: same inputs and same command (a changed setting changes the command).
        if record is not None and record.get("inputs") == inputs and record.get("command") == command and not forced:
            ctx.records[stage.name] = record
            log(f"[{index}/{total}] {stage.name}: up to date ({record['seconds']:.1f} s when it ran), skipped")
            continue
        if folder.exists():
            shutil.rmtree(folder)  # never mix a stale stage's files with a new run's
        folder.mkdir(parents=True)
        log(f"[{index}/{total}] {stage.name}: {stage.title or stage.name}")
        start = time.perf_counter()
        metrics = stage.run(ctx, folder)
        seconds = time.perf_counter() - start
        record = {
            "stage": stage.name,
            "run_id": uuid.uuid4().hex,
            "inputs": inputs,
            "command": command,
            "seconds": round(seconds, 2),
            "metrics": metrics,
        }
        _write_record(folder, record)
        ctx.records[stage.name] = record
        log(f"[{index}/{total}] {stage.name}: done in {seconds:.1f} s")
    return ctx.records
