"""BYOL (Grill et al., 2020) trained with byol-pytorch (lucidrains), the common PyTorch port.

DeepMind's release is a JAX pickle; its PyTorch conversions keep the backbone
only (a torchvision state dict, which has no head). byol-pytorch's ``BYOL``
learner keeps the online network with its projector: its ``state_dict()`` is
``{"net.*", "online_encoder.net.*", "online_encoder.projector.*",
"target_encoder.*", "online_predictor.*"}`` (under ``state_dict`` and a
prefix such as ``learner.`` in a Lightning checkpoint). The teacher is the
online encoder: ``online_encoder.net``, a torchvision ResNet read at its
pooled features (its ``fc`` is unused), and the projector MLP Linear(C, 4096) -
BN - ReLU - Linear(4096, 256), named ``projector.0..3`` (``projector.net.0..3``
before byol-pytorch 0.6). ``net`` is the same network stored a second time.

From byol-pytorch 0.9 (``use_simplicial_embeddings=True`` by default) the
projector is ``Sequential(Sequential(Linear(C, 256), BN), SEM, MLP(256, 4096, 256))``,
named ``projector.0.0``, ``projector.0.1`` and ``projector.2.0..3``, where SEM
is a softmax over groups of 8 features at temperature 0.1 (its defaults, which
the file does not store). That head is rebuilt as a ``SimplicialMLPHead``.
"""

from typing import Mapping, Optional

import torch.nn as nn

from ..models.heads import MLPHead, SimplicialMLPHead
from ._layout import Part, TeacherLayout, has_prefix, not_under, state_dict_of

NAME = "byol"
SIGNATURE = (
    "byol: byol-pytorch learner {'online_encoder.net.*', 'online_encoder.projector.*', 'target_encoder.*', "
    "'online_predictor.*'}"
)
_ANCHOR = "online_encoder.net.conv1.weight"


def recognise(ckpt: Mapping) -> Optional[TeacherLayout]:
    state, entries = state_dict_of(ckpt)
    anchors = [k for k in state if str(k).endswith(_ANCHOR)]
    if len(anchors) != 1:
        return None
    outer = anchors[0][: -len(_ANCHOR)]  # "" or a wrapper such as "learner." or "module."
    projector = outer + "online_encoder.projector."
    if has_prefix(state, projector + "net."):
        projector += "net."
    if not has_prefix(state, projector):
        return None
    return TeacherLayout(
        NAME,
        state,
        backbone=Part(outer + "online_encoder.net.", accept=not_under("fc"), note="without fc (unused by BYOL)"),
        head=Part(projector),
        build_head=_projector,
        head_layers=_projector_layers({k[len(projector) :]: v for k, v in state.items() if str(k).startswith(projector)}),
        entries=entries,
        wrapper=outer,
        reasons={
            "net": "the online network again (byol-pytorch stores it twice)",
            "online_encoder.net.fc": "classifier of the wrapped network, unused by BYOL",
            "target_encoder": "target network",
            "online_predictor": "predictor, applied after the embedding",
        },
    )


def _projector_layers(head_state) -> tuple:
    """The projector's top-level layers with weights: Linear, BN, Linear; or the simplicial head's two blocks."""
    return (0, 2) if SimplicialMLPHead.holds(head_state) else (0, 1, 3)


def _projector(state):
    """The projector MLP, with the simplicial embedding in front when the file has one (byol-pytorch >= 0.9)."""
    layout = SimplicialMLPHead if SimplicialMLPHead.holds(state) else MLPHead
    return layout.from_state(state, nn.ReLU, bias=True)
