"""Hostile and unlucky inputs, second pass (issue 23, points 1, 2, 3, 13, 15 and the smaller items).

Each test runs the real tool (in this process through its ``main``, or as a
process where the case is about processes: locks, signals) and checks the one
line it prints and that nothing was run, mixed, lost or left half-written.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tool_helpers import ROOT, fresh_detectron2_logging, load_tool, one_thread  # noqa: F401

SEG_CONFIGS = ROOT / "configs" / "segmentation"


def run_main(tool, argv, capsys):
    """``(exit code, stdout, stderr)`` of a tool's ``main``; errors exit through ``fail``."""
    try:
        code = tool.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 1: a YAML config runs code


@pytest.mark.parametrize("tool_name", ["train_seg", "test_seg"])
@pytest.mark.parametrize("where", ["config", "base"])
def test_a_python_tag_in_a_yaml_segmentation_config_is_refused_not_run(tool_name, where, tmp_path, capsys):
    """The probe's case: ``work_dir: !!python/object/apply:os.system [...]`` in a YAML config (or its YAML base)."""
    marker = tmp_path / "ran"
    hostile = f"work_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    base = tmp_path / "base.yaml"
    if where == "base":
        base.write_text(f"_base_: {SEG_CONFIGS / 'shapes_fcn_r18.py'}\n{hostile}")
        config_text = "_base_: base.yaml\n"
    else:
        config_text = f"_base_: {SEG_CONFIGS / 'shapes_fcn_r18.py'}\n{hostile}"
    config = tmp_path / "seg.yaml"
    config.write_text(config_text)
    checkpoint = [tmp_path / "absent.pth"] if tool_name == "test_seg" else []  # refused before it is looked for
    argv = [config, *checkpoint, "--work-dir", tmp_path / "work"]
    code, _, err = run_main(load_tool(tool_name), argv, capsys)
    line = one_line(err)
    assert code == 2 and not marker.exists(), line
    named = base if where == "base" else config
    assert f"{named}, line 2" in line and "python/object/apply:os.system" in line and "refused, not executed" in line, line


def test_yaml_and_json_configs_with_their_bases_are_read_as_data(tmp_path):
    """A legitimate YAML config inheriting a JSON one and a .py one reads as MMEngine would merge them."""
    from retro_transfer.openmmlab_config import read_config

    (tmp_path / "data.json").write_text(json.dumps({"probe": {"max_iters": 7}}))
    config = tmp_path / "seg.yml"
    config.write_text(f"_base_: ['{SEG_CONFIGS / 'shapes_fcn_r18.py'}', data.json]\nwork_dir: runs/x\n"
                      "model: {decode_head: {num_classes: 5}}\n")
    cfg = read_config(config)
    assert cfg.work_dir == "runs/x" and cfg.probe.max_iters == 7
    assert cfg.model.decode_head.num_classes == 5 and cfg.model.backbone.arch == "resnet18"


def test_a_base_cycle_and_a_missing_base_are_one_line(tmp_path):
    from retro_transfer.openmmlab_config import ConfigFileError, read_config

    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigFileError, match="cycle"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "c.json").write_text('{"_base_": "nowhere.yaml"}')
    with pytest.raises(ConfigFileError, match="_base_ nowhere.yaml not found"):
        read_config(tmp_path / "c.json")


def test_seg_tools_say_a_python_config_is_code(capsys):
    for name in ("train_seg", "test_seg"):
        with pytest.raises(SystemExit):
            load_tool(name).main(["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "a .py config is Python code and is run as such" in help_text, help_text
