"""DINO ResNet-50 (Caron et al., 2021), as released by facebookresearch/dino: ``dino_resnet50_pretrain_full_checkpoint.pth``.

``{"teacher": {...}, "student": {...}, "optimizer", "epoch", "args", "dino_loss"}``;
the teacher entry (``module.``-prefixed when it was trained under DDP) is a
MultiCropWrapper: ``backbone.*``, a torchvision ResNet with ``fc`` replaced by
an identity, and ``head.*``, DINOHead: ``head.mlp`` (Linear - [BN] - GELU,
repeated, then Linear to the 256-d bottleneck; BN when ``use_bn_in_head``, as
for the released ResNet-50), whose output is L2-normalised, then the
weight-normalised ``head.last_layer`` to the prototype scores, which is not
part of the embedding. The teacher, not the student, is the network DINO
evaluates. A bare teacher state dict (the ``teacher`` entry saved alone) loads too.
The ``dino_resnet50_pretrain.pth`` release has no head: it loads as a torchvision backbone.
"""

from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead, NormalizedMLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix

NAME = "dino"
SIGNATURE = (
    "dino: {'teacher': {'backbone.*', 'head.mlp.*', 'head.last_layer.*'}, 'student': ...} "
    "(dino_resnet50_pretrain_full_checkpoint.pth)"
)


def _head(state) -> NormalizedMLPHead:
    return NormalizedMLPHead(MLPHead.from_state(state, nn.GELU, bias=True))


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    full = isinstance(ckpt.get("teacher"), Mapping)
    state = ckpt["teacher"] if full else ckpt
    wrapper = ddp_wrapper(state)
    if not (has_prefix(state, wrapper + "backbone.") and has_prefix(state, wrapper + "head.mlp.")):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(wrapper + "backbone."),
        head=Part(wrapper + "head.mlp.", rename=lambda n: "mlp." + n, unrename=lambda n: n[len("mlp.") :]),
        build_head=lambda head: _head({k[len("mlp.") :]: v for k, v in head.items()}),
        entries=("teacher",) if full else (),
        wrapper=wrapper,
        reasons={"head.last_layer": "weight-normalised layer to the prototype scores, after the embedding"},
    )
