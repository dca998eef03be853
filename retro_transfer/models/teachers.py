"""Teachers: torchvision ResNets with the MoCo v2 projection head, frozen during distillation."""

from typing import Optional

import torch
import torch.nn as nn
import torchvision

from .heads import ProjectionHead

TEACHER_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class Teacher(nn.Module):
    """``backbone`` (torchvision ResNet, ``fc`` removed) and an optional ``head``.

    The parameter names are torchvision's (``backbone.layer1.0.conv1.weight``)
    and the head's are MoCo's (``head.0.weight`` for ``fc.0.weight``).
    """

    def __init__(self, arch: str = "resnet50", with_head: bool = True, head_hidden: Optional[int] = None, dim: int = 128):
        super().__init__()
        if arch not in TEACHER_ARCHS:
            raise ValueError(f"unknown teacher architecture {arch!r}; choose one of {', '.join(TEACHER_ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.out_channels = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        hidden = head_hidden or self.out_channels
        self.head = ProjectionHead(self.out_channels, hidden, dim) if with_head else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, C_t)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding H_T(T(x)); needs a head."""
        if self.head is None:
            raise RuntimeError(f"teacher {self.arch} has no projection head")
        return self.head(self.backbone(x))


def build_teacher(arch: str = "resnet50", with_head: bool = True) -> Teacher:
    return Teacher(arch, with_head=with_head)
