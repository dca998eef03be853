"""SwAV (Caron et al., 2020), as released by facebookresearch/swav: ``swav_800ep_pretrain.pth.tar`` and the wide ones.

A flat state dict, ``{"module.conv1.weight", ..., "module.projection_head.*", "module.prototypes.weight"}``
(training checkpoints keep it under ``state_dict``). The backbone is
src/resnet50.py's ResNet, whose names are torchvision's; its extra input
padding (ConstantPad2d(1) before a padding-2 conv1) equals torchvision's
padding 3. ResNet-50-w2/w4/w5 widen every channel and load as ``resnet50w2``
etc. The head is ``projection_head``: Linear(C, hidden) - BN - ReLU -
Linear(hidden, 128); the prototypes score the L2-normalised embedding and are
not part of it. DeepCluster-v2 and SeLa-v2 from the same repository share
this layout (their prototypes are ``prototypes.prototypes<i>``).
"""

from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix, not_under, state_dict_of

NAME = "swav"
SIGNATURE = (
    "swav: {'module.conv1.weight', ..., 'module.projection_head.*', 'module.prototypes.*'} "
    "(swav_800ep_pretrain.pth.tar, swav_RN50w2_400ep_pretrain.pth.tar)"
)


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    wrapper = ddp_wrapper(state)
    if wrapper + "conv1.weight" not in state or not has_prefix(state, wrapper + "projection_head."):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(
            wrapper, accept=not_under("projection_head", "prototypes"), note="without projection_head and prototypes"
        ),
        head=Part(wrapper + "projection_head."),
        build_head=lambda head: MLPHead.from_state(head, nn.ReLU, bias=True),
        entries=entries,
        wrapper=wrapper,
        reasons={"prototypes": "SwAV's prototypes, which score the embedding"},
    )
