"""Each pipeline stage is one command line of the repository's tools (issue 25): printed as run, parsed as run.

The stages run those calls in the pipeline's process (``ToolCall.parse`` and
``ToolCall.main``); tests/test_pipeline.py runs two recorded commands in a new
process and gets the recorded numbers. Here, without running anything, every
stage of every preset (the full one too: Mask R-CNN and MMDetection, which
the smoke run leaves out) must be a command its tool accepts, and the printed
line must hand the tool exactly the arguments the stage uses.
"""

import shlex
from pathlib import Path

import pytest

from retro_transfer.pipeline import PRESETS
from retro_transfer.pipeline.build import build_stages
from retro_transfer.pipeline.runner import Context, ToolCall, command_text

ROOT = Path(__file__).resolve().parents[1]


def _calls(stage, ctx):
    calls = stage.calls(ctx, ctx.folder(stage.name))
    return (calls,) if isinstance(calls, ToolCall) else calls


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_stage_is_a_command_line_its_tool_parses(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pipeline names tools and configs from the repository root, as its commands do
    ctx = Context(tmp_path, PRESETS[preset])
    stages = build_stages(PRESETS[preset])
    assert {"data", "teacher", "distill_retro", "eval_retro", "det_random", "seg_random"} <= {s.name for s in stages}
    for stage in stages:
        calls = _calls(stage, ctx)
        assert calls, stage.name
        for call in calls:
            call.parse()  # the tool's own parser: an unknown flag or a bad value exits here
        printed = stage.command(ctx, ctx.folder(stage.name))
        assert printed == command_text(calls)
        for part, call in zip(printed.split(" && "), calls):
            assert shlex.split(part, comments=True) == ["python", call.script, *call.args], stage.name


def test_a_given_teacher_is_said_not_run(tmp_path):
    settings = {**PRESETS["smoke"], "teacher_recipe": "user", "teacher_path": "/models/moco_v2_800ep.pth.tar"}
    teacher = {s.name: s for s in build_stages(settings)}["teacher"]
    assert teacher.calls(Context(tmp_path, settings), tmp_path) == "(given with --teacher) /models/moco_v2_800ep.pth.tar"


def test_a_printed_value_with_spaces_or_nothing_stays_one_argument():
    call = ToolCall("tools/train_net.py", ["MODEL.WEIGHTS", "", "SOLVER.STEPS", "(4,)", "OUTPUT_DIR", Path("/a b/c")],
                    note="a remark")
    assert call.args == ("MODEL.WEIGHTS", "", "SOLVER.STEPS", "(4,)", "OUTPUT_DIR", "/a b/c")
    assert shlex.split(call.shell(), comments=True) == ["python", "tools/train_net.py", *call.args]
    assert call.shell().endswith("  # a remark")


def test_a_tool_runs_in_process_and_a_failure_it_returns_stops_its_stage(tmp_path, monkeypatch):
    """What the tool prints goes to the stage's console.txt; a main that returns non-zero (without exiting)
    must not let the stage go on as if it had worked. The tool under test is ToolCall, so the failing tool's
    main is replaced by one that only returns 3."""
    call = ToolCall("tools/make_shapes.py", ["--out", tmp_path / "shapes", "--num-images", "8", "--size", "32"])
    assert call.main(tmp_path) == 0 and (tmp_path / "shapes" / "VOC2007").is_dir()
    assert "shapes data set written" in (tmp_path / "console.txt").read_text()
    monkeypatch.setattr(call.tool(), "main", lambda argv: 3)
    with pytest.raises(SystemExit, match="exited with 3"):
        call.main(tmp_path)
