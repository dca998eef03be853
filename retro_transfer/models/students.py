"""Students: any timm convolutional network, used up to its last spatial feature map."""

from typing import List

import timm
import torch
import torch.nn as nn

# Parameters of the full timm model that a ``features_only`` model does not
# have: the 1x1 "conv_head" that widens the last stage (EfficientNet-B0:
# 320 -> 1280, MobileNetV3-Large: 960 -> 1280). They belong to the distillation
# student (its C_s is the widened width, as in the Retro paper) but not to the
# multi-scale backbone transferred to detection and segmentation.
HEAD_ONLY_PREFIXES = ("conv_head.", "bn2.")


class Student(nn.Module):
    """A timm model without classifier or pooling: ``forward`` returns (B, C_s, H, W).

    Parameters keep timm's names under ``body.`` so the same names load into
    ``timm.create_model(arch, features_only=True)`` downstream.
    """

    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in timm.list_models():
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise ValueError(f"unknown student architecture {arch!r}; timm has e.g. {', '.join(close) or 'none alike'}")
        self.arch = arch
        self.body = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        self.out_channels = self._probe_channels()

    def _probe_channels(self) -> int:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.body(torch.zeros(1, 3, 64, 64))
        self.train(was_training)
        if out.ndim != 4:
            raise ValueError(
                f"student {self.arch!r} does not end in a spatial feature map (got shape {tuple(out.shape)}); "
                "use a convolutional timm model"
            )
        return int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features (B, C_s): what a linear probe sees."""
        return self.forward(x).mean(dim=(2, 3))

    def backbone_keys(self) -> List[str]:
        """Names (without ``body.``) that a ``features_only`` model of the same arch holds."""
        return [k for k in self.body.state_dict() if not k.startswith(HEAD_ONLY_PREFIXES)]


def build_student(arch: str) -> Student:
    return Student(arch)
