"""Shared fixtures: one small shapes data set per test session (tiny images keep CI fast)."""

import pytest
import torch
import torch.nn as nn
import torchvision

from retro_transfer.data.shapes import ShapesConfig, generate

SMALL = ShapesConfig(num_images=24, size=64, seed=0)


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
