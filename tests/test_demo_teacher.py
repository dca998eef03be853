"""The demo's teacher choices and presets: --teacher PATH, --teacher-recipe, the provenance line, default vs full."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from retro_transfer.checkpoints import CheckpointError
from retro_transfer.pipeline import PRESETS
from retro_transfer.pipeline.build import build_stages
from retro_transfer.pipeline.report import teacher_provenance
from retro_transfer.pipeline.runner import Context
from retro_transfer.pipeline.upstream import _distill_overrides, teacher_file, use_teacher

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "pipeline.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def _names(preset) -> set:
    return {stage.name for stage in build_stages(preset)}


def test_default_transfers_retro_and_random_and_full_adds_moco_v2_mask_rcnn_and_mmdetection():
    default, full = _names(PRESETS["default"]), _names(PRESETS["full"])
    for task in ("det", "seg"):
        assert {f"{task}_retro", f"{task}_random"} <= default and f"{task}_moco_v2" not in default
        assert {f"{task}_retro", f"{task}_random", f"{task}_moco_v2"} <= full
    assert not any(name.startswith("mrcnn_") for name in default)
    assert {"mrcnn_retro", "mrcnn_moco_v2", "mrcnn_random"} <= full
    assert {"mmdet_retro", "mmdet_random"} <= full and not any(name.startswith("mmdet_") for name in default)
    # What full adds is only the comparisons: every default stage runs there with the same settings.
    assert default < full
    added = ("transfer_from", "mrcnn_iters", "mmdet_iters")
    assert {k: v for k, v in PRESETS["full"].items() if k not in added} == \
        {k: v for k, v in PRESETS["default"].items() if k not in added}


def test_a_given_teacher_replaces_the_teacher_stage_and_feeds_every_student(teacher_ckpt, tmp_path):
    settings = use_teacher(dict(PRESETS["smoke"]), str(teacher_ckpt))
    assert settings["teacher_recipe"] == "user" and settings["teacher_arch"] == "resnet18"
    stages = {stage.name: stage for stage in build_stages(settings)}
    ctx = Context(tmp_path, settings)
    assert stages["teacher"].deps == ()  # nothing to train, so it waits for no data
    assert teacher_file(ctx) == Path(teacher_ckpt).absolute()
    for method in ("seed", "disco", "retro"):
        assert f"teacher.checkpoint={Path(teacher_ckpt).absolute()}" in _distill_overrides(ctx, tmp_path, method)
    record = stages["teacher"].run(ctx, tmp_path, stages["teacher"].calls(ctx, tmp_path))
    assert record == {"arch": "resnet18", "family": "moco_v2", "path": str(Path(teacher_ckpt).absolute()), "recipe": "user"}
    assert str(Path(teacher_ckpt).absolute()) in teacher_provenance(record)


def test_a_file_of_unknown_layout_is_refused_in_one_line(tmp_path):
    odd = tmp_path / "odd.pth"
    torch.save({"weights": {"a.b": torch.zeros(2)}}, odd)
    with pytest.raises(CheckpointError):
        use_teacher(dict(PRESETS["smoke"]), str(odd))
    result = _pipeline("--preset", "smoke", "--out", str(tmp_path / "out"), "--teacher", str(odd))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(odd) in lines[0] or "odd.pth" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_teacher_without_its_projection_head_is_refused(tmp_path):
    """Retro reuses the teacher's head and SEED/DisCo compare with its embeddings: a bare backbone cannot teach."""
    bare = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()
                               if not k.startswith("fc.")}}, bare)
    with pytest.raises(CheckpointError, match="head"):
        use_teacher(dict(PRESETS["smoke"]), str(bare))


def test_teacher_and_teacher_recipe_exclude_each_other(teacher_ckpt, tmp_path):
    result = _pipeline("--preset", "smoke", "--out", str(tmp_path / "out"), "--teacher", str(teacher_ckpt), "--teacher-recipe", "moco_v2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "exclude each other" in lines[0], result.stderr


def test_each_recipe_trains_its_own_teacher_and_says_how():
    supcon_settings = {**PRESETS["default"], "teacher_recipe": "supcon"}
    supcon = {s.name: s for s in build_stages(supcon_settings)}["teacher"]
    moco = {s.name: s for s in build_stages({**PRESETS["default"], "teacher_recipe": "moco_v2"})}["teacher"]
    ctx = Context(Path("/out"), supcon_settings)
    assert "shapes_supcon_r18.yaml" in supcon.command(ctx, Path("/out/teacher"))
    assert "classification/train" in supcon.command(ctx, Path("/out/teacher"))
    moco_ctx = Context(Path("/out"), {**PRESETS["default"], "teacher_recipe": "moco_v2"})
    assert "shapes_moco_v2_r50.yaml" in moco.command(moco_ctx, Path("/out/teacher"))
    assert "classification" not in moco.command(moco_ctx, Path("/out/teacher")).split("data.train_dir=")[1].split()[0]
    said = teacher_provenance({"recipe": "supcon", "arch": "resnet18"})
    assert "with labels" in said and "never see a label" in said
    assert "self-supervised" in teacher_provenance({"recipe": "moco_v2", "arch": "resnet18"})
