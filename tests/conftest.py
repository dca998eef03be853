"""Shared fixtures: one small shapes data set per test session (tiny images keep CI fast), and real students."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from retro_transfer.data.shapes import ShapesConfig, generate

SMALL = ShapesConfig(num_images=24, size=64, seed=0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A generated shapes data set; tests must treat it as read-only."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", SMALL)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A seeded ResNet-18 with a MoCo v2 head, in the official MoCo v2 release layout.

    Untrained: the engine cannot tell it from a pretrained one, and building
    it takes a second instead of a pretraining run.
    """
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("teacher") / "moco_v2_r18.pth.tar"
    torch.save({"arch": "resnet18", "epoch": 0, "state_dict": state}, path)
    return path


@pytest.fixture(scope="session")
def distilled(shapes_root, tmp_path_factory):
    """``distilled(arch)``: the checkpoint of a real 2-step MoCo v2 distillation of that timm student.

    The engine's own run (32-px crops of the shapes images, batch 2, fp32),
    in this process and once per session and architecture: the file has
    exactly the layout ``tools/distill.py`` writes, for tools that read students.
    """
    from distill.config import load_config
    from distill.engine import Trainer

    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"distill_{arch}")
            overrides = [
                f"student.arch={arch}", f"data.train_dir={shapes_root / 'unlabeled'}", "data.image_size=32",
                "data.num_workers=0", "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=0",
                "train.precision=fp32", "loss.queue_size=4", "log.tensorboard=false", "checkpoint.every=2",
                "checkpoint.keep=0", f"output_dir={out}",
            ]
            made[arch] = Trainer(load_config(REPO / "configs/distill/shapes_moco_v2_effb0.yaml", overrides)).fit()
        return made[arch]

    return make
