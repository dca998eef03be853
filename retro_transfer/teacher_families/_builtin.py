"""The two layouts that are not a self-supervised family: this project's checkpoints and plain torchvision ResNets.

A distillation checkpoint written by ``distill.engine`` holds the teacher it
used under ``model``/``teacher.*``, with the head as the loader built it:
DINO's under ``mlp.`` (GELU, L2-normalised output), byol-pytorch 0.9's with
its simplicial embedding under ``0.0.``/``2.0.`` (modules inside modules),
every other family's a ReLU MLP, so the names alone say how to rebuild it. A torchvision state dict
(a supervised classifier, or a backbone-only release such as
``dino_resnet50_pretrain.pth``) has no projection head; ``fc`` is its classifier.
"""

from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from distill.common import DISTILL_FORMAT

from ..models.heads import MLPHead, NormalizedMLPHead, SimplicialMLPHead
from ._layout import Part, TeacherLayout, ddp_wrapper, has_prefix, not_under, state_dict_of



def _saved_head(state: Dict[str, torch.Tensor]) -> nn.Module:
    if SimplicialMLPHead.holds(state):  # byol-pytorch >= 0.9's projector
        return SimplicialMLPHead.from_state(state, nn.ReLU, bias=None, last_bn_affine=None)
    if any(k.startswith("mlp.") for k in state):
        mlp = {k[len("mlp.") :]: v for k, v in state.items()}
        return NormalizedMLPHead(MLPHead.from_state(mlp, nn.GELU, bias=None, last_bn_affine=None))
    return MLPHead.from_state(state, nn.ReLU, bias=None, last_bn_affine=None)


def distillation_checkpoint(ckpt: Mapping) -> Optional[TeacherLayout]:
    if ckpt.get("format") != DISTILL_FORMAT:
        return None
    model = ckpt.get("model")
    if not isinstance(model, Mapping):
        raise ValueError(f"it says it is a {DISTILL_FORMAT} checkpoint but has no 'model' state dict")
    return TeacherLayout(
        "retro_transfer_teacher",
        model,
        backbone=Part("teacher.backbone."),
        head=Part("teacher.head."),
        build_head=_saved_head,
        entries=("model",),
    )


def torchvision_state(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    wrapper = ddp_wrapper(state)
    if wrapper + "conv1.weight" not in state or not has_prefix(state, wrapper + "layer1."):
        return None
    return TeacherLayout(
        "torchvision",
        state,
        backbone=Part(wrapper, accept=not_under("fc"), note="without fc"),
        entries=entries,
        wrapper=wrapper,
        reasons={"fc": "classifier, not a projection head"},
    )
