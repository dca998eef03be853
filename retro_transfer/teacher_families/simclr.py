"""SimCLR v1/v2 (Chen et al., 2020a/b) in PyTorch; Google released TensorFlow checkpoints only.

Two layouts are in common use:

- v2 (and v1) converted by Separius/SimCLRv2-Pytorch, ``r50_1x_sk0.pth`` etc.:
  ``{"resnet": {"net.*", "fc.*"}, "head": {"layers.*"}}``. ``resnet.net`` is
  the stem (``net.0``: conv ``0``, BN ``1.0``) and four stages
  (``net.<s>.blocks.<b>``: ``projection.shortcut`` and ``projection.bn.0``
  for the shortcut, ``net.0/2/4`` convolutions and ``net.1.0/3.0/5.0`` BNs),
  the same computation as a torchvision ResNet, renamed here; ``resnet.fc`` is
  the supervised classifier. ``head.layers`` is the contrastive head: Linear
  (no bias) - BN - ReLU, twice, then Linear (no bias) - BN, 128-d out.
  Selective-kernel models (``_sk1``) are not ResNets and are refused.
- v1 trained in PyTorch with Spijkervet/SimCLR: ``{"encoder.*", "projector.*"}``,
  a torchvision ResNet and Linear(C, C, no bias) - ReLU - Linear(C, d, no bias).

tonylins/simclr-converter's ``resnet50-1x.pth`` holds the backbone and the
supervised classifier only, no projection head: it loads as a torchvision
backbone (``resnet50w2``/``w4`` for the wide ones) but cannot be a teacher.
"""

import re
from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix, not_under, state_dict_of

NAME = "simclr"
SIGNATURE = (
    "simclr: {'resnet': {'net.*'}, 'head': {'layers.*'}} (SimCLRv2-Pytorch's r50_1x_sk0.pth) "
    "or {'encoder.*', 'projector.*'} (Spijkervet/SimCLR)"
)

# SimCLRv2-Pytorch name -> torchvision name, inside one block of ``net.<stage>.blocks.<block>``.
_BLOCK = {
    "projection.shortcut.weight": "downsample.0.weight",
    "net.0.weight": "conv1.weight",
    "net.2.weight": "conv2.weight",
    "net.4.weight": "conv3.weight",
}
_BLOCK_BN = {"projection.bn.0": "downsample.1", "net.1.0": "bn1", "net.3.0": "bn2", "net.5.0": "bn3"}
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BLOCK.update({f"{ours}.{p}": f"{tv}.{p}" for ours, tv in _BLOCK_BN.items() for p in _BN_PARAMS})
_STEM = {"net.0.0.weight": "conv1.weight", **{f"net.0.1.0.{p}": f"bn1.{p}" for p in _BN_PARAMS}}
_BLOCK_KEY = re.compile(r"net\.([1-4])\.blocks\.(\d+)\.(.+)")
_TV_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.(.+)")
_BLOCK_BACK = {tv: ours for ours, tv in _BLOCK.items()}
_STEM_BACK = {tv: ours for ours, tv in _STEM.items()}


def _to_torchvision(name: str) -> str:
    """A SimCLRv2-Pytorch backbone name in torchvision's terms; unknown names pass through (and load as unexpected)."""
    if name in _STEM:
        return _STEM[name]
    match = _BLOCK_KEY.fullmatch(name)
    if match and match.group(3) in _BLOCK:
        return f"layer{match.group(1)}.{match.group(2)}.{_BLOCK[match.group(3)]}"
    return name


def _from_torchvision(name: str) -> str:
    if name in _STEM_BACK:
        return _STEM_BACK[name]
    match = _TV_BLOCK_KEY.fullmatch(name)
    if match and match.group(3) in _BLOCK_BACK:
        return f"net.{match.group(1)}.blocks.{match.group(2)}.{_BLOCK_BACK[match.group(3)]}"
    return name


def _converted(ckpt: Mapping) -> Optional[TeacherLayout]:
    resnet, head = ckpt.get("resnet"), ckpt.get("head")
    if not (isinstance(resnet, Mapping) and isinstance(head, Mapping) and "net.0.0.weight" in resnet):
        return None
    if any("mixing_conv" in str(k) for k in resnet):
        raise ValueError(
            "this SimCLR v2 model uses selective kernels (an _sk1 file), which is not a ResNet; "
            "convert and use the _sk0 model of the same depth and width instead"
        )
    state = {**{f"resnet.{k}": v for k, v in resnet.items()}, **{f"head.{k}": v for k, v in head.items()}}
    return TeacherLayout(
        NAME,
        state,
        backbone=Part("resnet.", accept=not_under("fc"), rename=_to_torchvision, unrename=_from_torchvision,
                      note="without fc, renamed to torchvision's ResNet"),
        head=Part("head.layers."),
        build_head=lambda h: MLPHead.from_state(h, nn.ReLU, bias=False),
        entries=("resnet", "head"),
        reasons={"resnet.fc": "supervised classifier"},
    )


def _pytorch(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    wrapper = ddp_wrapper(state)
    if wrapper + "encoder.conv1.weight" not in state or not has_prefix(state, wrapper + "projector."):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(wrapper + "encoder.", accept=not_under("fc"), note="without fc"),
        head=Part(wrapper + "projector."),
        build_head=lambda h: MLPHead.from_state(h, nn.ReLU, bias=False),
        entries=entries,
        wrapper=wrapper,
        reasons={"encoder.fc": "classifier"},
    )


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    return _converted(ckpt) or _pytorch(ckpt)
