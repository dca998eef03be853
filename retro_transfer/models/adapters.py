"""Retro's dimension adapters (Nguyen and Park, 2024, Figure 5).

The adapter maps the student's last feature map (C_s channels) to the
teacher's feature width (C_t) on the spatial map, before pooling, so that the
teacher's frozen projection head can be reused. Widths come from the networks
themselves; nothing here assumes 1280 or 2048.
"""

import torch.nn as nn

from distill.common import ADAPTER_KINDS


def _conv_bn_act(c_in: int, c_out: int, kernel: int, act: type, groups: int = 1) -> list:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), act()]


class InvertedResidualAdapter(nn.Sequential):
    """For EfficientNet/MobileNet students: 1x1 C_s->2C_s, depthwise 3x3, 1x1 2C_s->C_t."""

    def __init__(self, c_student: int, c_teacher: int, act: type = nn.SiLU) -> None:
        hidden = 2 * c_student
        super().__init__(
            *_conv_bn_act(c_student, hidden, 1, act),
            *_conv_bn_act(hidden, hidden, 3, act, groups=hidden),
            *_conv_bn_act(hidden, c_teacher, 1, act),
        )


class BottleneckAdapter(nn.Sequential):
    """For ResNet students: 1x1 C_s->C_t/2, 3x3 C_t/2->C_t/2, 1x1 ->C_t, each BN + ReLU."""

    def __init__(self, c_student: int, c_teacher: int) -> None:
        mid = c_teacher // 2
        super().__init__(
            *_conv_bn_act(c_student, mid, 1, nn.ReLU),
            *_conv_bn_act(mid, mid, 3, nn.ReLU),
            *_conv_bn_act(mid, c_teacher, 1, nn.ReLU),
        )


def build_adapter(student_arch: str, c_student: int, c_teacher: int, kind: str = "auto") -> nn.Module:
    """The paper's adapter for ``student_arch``; ``kind`` overrides the choice."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    if kind == "auto":
        kind = "bottleneck" if "resnet" in student_arch else "inverted_residual"
    if kind == "bottleneck":
        return BottleneckAdapter(c_student, c_teacher)
    act = nn.Hardswish if "mobilenetv3" in student_arch else nn.SiLU
    return InvertedResidualAdapter(c_student, c_teacher, act)
