"""MoCo v2 (Chen et al., 2020), as released by facebookresearch/moco: ``moco_v2_800ep_pretrain.pth.tar``.

``{"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", "module.queue_ptr"}, ...}``.
The query encoder is the teacher: a torchvision ResNet whose ``fc`` is the
projection head ``fc.0`` Linear(C, C) - ReLU - ``fc.2`` Linear(C, 128). A lone
``fc.weight``/``fc.bias`` (MoCo v1, or a linear classifier) is no projection
head and is left out. The key encoder and the queue are not the teacher.
"""

from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix, not_under, numbered, state_dict_of

NAME = "moco_v2"
SIGNATURE = "moco_v2: {'state_dict': {'module.encoder_q.*' with head fc.0/fc.2}} (moco_v2_800ep_pretrain.pth.tar)"


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    wrapper = ddp_wrapper(state)
    encoder = wrapper + "encoder_q."
    if not has_prefix(state, encoder):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(encoder, accept=not_under("fc"), note="without fc"),
        head=Part(encoder + "fc.", accept=numbered),
        build_head=lambda head: MLPHead.from_state(head, nn.ReLU, bias=True),
        head_layers=(0, 2),
        entries=entries,
        wrapper=wrapper,
        reasons={"encoder_q.fc": "classifier, not a projection head"},
    )
