"""Teachers: torchvision ResNets (optionally widened) and their projection heads, frozen during distillation."""

import re
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck

from distill.common import TEACHER_ARCHS

from .heads import ProjectionHead

# TEACHER_ARCHS (distill.common): what ``resnet50w2`` means and why it is not torchvision's wide ResNet.
_ARCH = re.compile(r"(resnet\d+)(?:w(\d+))?")


def split_arch(arch: str) -> Tuple[str, int]:
    """``"resnet50w2"`` -> ``("resnet50", 2)``; ``"resnet18"`` -> ``("resnet18", 1)``."""
    match = _ARCH.fullmatch(arch)
    if arch not in TEACHER_ARCHS or match is None:
        raise ValueError(f"unknown teacher architecture {arch!r}; choose one of {', '.join(TEACHER_ARCHS)}")
    return match.group(1), int(match.group(2) or 1)


def join_arch(depth: str, width: int) -> str:
    """``("resnet50", 2)`` -> ``"resnet50w2"``: the inverse of ``split_arch`` (the name may not be supported)."""
    return depth if width == 1 else f"{depth}w{width}"


def resnet_backbone(arch: str) -> Tuple[nn.Module, int]:
    """A torchvision ResNet with ``fc`` removed, and its feature width; parameter names are torchvision's at every width."""
    depth, width = split_arch(arch)
    net = getattr(torchvision.models, depth)(weights=None)
    channels = net.fc.in_features * width
    if width > 1:
        _widen(net, width)
    net.fc = nn.Identity()
    return net, channels


def _widen(net: torchvision.models.ResNet, width: int) -> None:
    """Multiply every channel count of a bottleneck ResNet by ``width`` (stem, inner and output widths)."""
    stem = 64 * width
    net.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(stem)
    inplanes = stem
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        blocks = len(getattr(net, f"layer{stage}"))
        planes *= width
        stride = 1 if stage == 1 else 2
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
        layers = [Bottleneck(inplanes, planes, stride, downsample)]
        inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
        setattr(net, f"layer{stage}", nn.Sequential(*layers))


class Teacher(nn.Module):
    """``backbone`` (torchvision ResNet, ``fc`` removed) and an optional ``head``.

    The backbone's parameter names are torchvision's (``backbone.layer1.0.conv1.weight``).
    ``head`` is the teacher's own projection head, rebuilt from its checkpoint
    (``retro_transfer.teacher_families``); without it, ``with_head`` builds a
    MoCo v2 head of the given widths (random weights, for tests and benchmarks).
    Every head exposes ``in_dim`` and ``out_dim``.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        with_head: bool = True,
        head_hidden: Optional[int] = None,
        dim: int = 128,
        head: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.backbone, self.out_channels = resnet_backbone(arch)
        self.arch = arch
        if head is None and with_head:
            head = ProjectionHead(self.out_channels, head_hidden or self.out_channels, dim)
        self.head = head

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
