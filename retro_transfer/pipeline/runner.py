"""A small stage runner: each stage owns a folder, and a finished stage is skipped on re-run.

A stage writes its outputs to ``OUT/<stage>/`` and, last of all, a record
``OUT/<stage>/stage.json`` (atomically) with its metrics, the command that
reproduces it, how long it took, and the run ids of the stages it read. A stage
is up to date when its record exists, holds the command the stage would run
now (so a changed setting redoes it), and names the current run ids of its
dependencies: deleting a stage's folder therefore redoes that stage and,
through the changed run id, every stage after it, and nothing else.

A stage's command is one value, a :class:`ToolCall` (or several, run one after
another): the report prints it, and the stage runs it, in this process, through
the tool's own argument parser (``ToolCall.parse``) or its ``main``
(``ToolCall.main``). What the report says reproduces a number is therefore
what made it: tests/test_pipeline.py runs two recorded commands in a fresh
process and compares, tests/test_pipeline_commands.py parses every stage's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

RECORD = "stage.json"
CONSOLE = "console.txt"  # what the tools a stage runs printed


@dataclass(frozen=True)
class ToolCall:
    """One command line of the repository's tools: the stage runs it and the report prints it.

    ``script`` is a path from the repository root (``tools/distill.py``),
    ``args`` its arguments as the shell would pass them. ``note`` is said
    after the command in the report (``# ...``), for what the stage adds to
    the tool's work (a per-image record, a drawing) without changing a number.
    """

    script: str
    args: Tuple[str, ...]
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))

    def shell(self) -> str:
        line = shlex.join(("python", self.script, *self.args))
        return f"{line}  # {self.note}" if self.note else line

    def tool(self):
        from retro_transfer.cli import load_tool

        return load_tool(self.script)

    def parse(self) -> argparse.Namespace:
        """The arguments as the tool reads them (its own parser: a wrong flag fails here as it would there)."""
        return self.tool().build_parser().parse_args(list(self.args))

    def main(self, folder: Path) -> int:
        """Run the tool's ``main`` on these arguments in this process; what it prints goes to ``folder/console.txt``.

        The pipeline's console keeps to a line or two a stage; progress bars (on stderr) still show. The file
        is written once the tool is done (or has failed): a run folder must be empty when a run starts in it.
        """
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                code = self.tool().main(list(self.args))
        finally:
            with open(folder / CONSOLE, "a") as console:
                console.write(printed.getvalue())
        if code:  # a tool that reports failure by its return value stops the pipeline as it would a shell's &&
            raise SystemExit(f"{self.shell()} exited with {code}; its output is in {folder / CONSOLE}")
        return code


Calls = Union[ToolCall, Tuple[ToolCall, ...], str]
"""What a stage runs: one call, several (run in order, printed joined by ``&&``), or,
for a stage with nothing to run (a file the user gave), a sentence for the report."""


def command_text(calls: Calls) -> str:
    if isinstance(calls, str):
        return calls
    calls = (calls,) if isinstance(calls, ToolCall) else calls
    return " && ".join(call.shell() for call in calls)


@dataclass
class Stage:
    """One step of the pipeline.

    ``calls(ctx, folder)`` is what the step runs (:data:`Calls`), recorded as
    the report's command; ``run(ctx, folder, calls)`` does that work, writing
    into ``folder``, and returns the metrics to record (JSON-serialisable).
    """

    name: str
    calls: Callable[["Context", Path], Calls]
    run: Callable[["Context", Path, Calls], Dict]
    deps: Sequence[str] = field(default_factory=tuple)
    title: str = ""

    def command(self, ctx: "Context", folder: Path) -> str:
        """The shell command the report prints for this stage."""
        return command_text(self.calls(ctx, folder))


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
        calls = stage.calls(ctx, folder)
        command = command_text(calls)
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
        metrics = stage.run(ctx, folder, calls)
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
