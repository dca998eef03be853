"""MoCo v3 ResNets (Chen, Xie and He, 2021), as released by facebookresearch/moco-v3: ``r-50-1000ep.pth.tar``.

``{"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*", "module.predictor.*"}, ...}``.
The base encoder is the teacher; its ``fc`` is the projector (moco/builder.py,
``_build_mlp(2, ...)``): ``fc.0`` Linear(C, 4096, no bias) - ``fc.1`` BN -
ReLU - ``fc.3`` Linear(4096, 256, no bias) - ``fc.4`` BN without affine. The
momentum encoder and the predictor are not part of the teacher's embedding.
"""

from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix, not_under, state_dict_of

NAME = "moco_v3"
SIGNATURE = (
    "moco_v3: {'state_dict': {'module.base_encoder.*' with head fc.0-fc.4, 'module.momentum_encoder.*', "
    "'module.predictor.*'}} (r-50-1000ep.pth.tar)"
)


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    wrapper = ddp_wrapper(state)
    encoder = wrapper + "base_encoder."
    if not has_prefix(state, encoder):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(encoder, accept=not_under("fc"), note="without fc"),
        head=Part(encoder + "fc."),
        build_head=lambda head: MLPHead.from_state(head, nn.ReLU, bias=False, last_bn_affine=False),
        head_layers=(0, 1, 3, 4),
        entries=entries,
        wrapper=wrapper,
        reasons={
            "momentum_encoder": "momentum copy of the base encoder",
            "predictor": "predictor, applied after the embedding",
        },
    )
