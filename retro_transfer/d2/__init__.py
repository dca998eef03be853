"""Detectron2 integration: importing this registers the project's backbones and ROI head.

Registered: ``build_timm_fpn_backbone`` (R-CNN FPN, P6 by max-pooling) and
``build_retinanet_timm_fpn_backbone`` (P6/P7) for any timm ``features_only``
model, and ``Res5ROIHeadsExtraNorm`` for MoCo's C4 recipe. Teachers
(ResNet-50/101/152) use Detectron2's own ``build_resnet_backbone`` and
``build_resnet_fpn_backbone``. Weights come from ``tools/convert_to_d2.py``.
"""

from .backbone import (
    TimmBackbone,
    build_retinanet_timm_fpn_backbone,
    build_timm_fpn_backbone,
    convert_norm,
    feature_levels,
)
from .config import NORMS, ConfigError, add_retro_config, check_config, load_config, use_shapes
from .data import DatasetError, build_evaluator, check_datasets, register_shapes
from .roi_heads import Res5ROIHeadsExtraNorm
from .weights import (
    D2Weights,
    IncompatibleWeightsError,
    RetroCheckpointer,
    check_model_matches,
    choose_target,
    resnet_to_d2,
    save_d2,
    to_detectron2,
)

__all__ = [
    "NORMS",
    "TimmBackbone",
    "build_timm_fpn_backbone",
    "build_retinanet_timm_fpn_backbone",
    "convert_norm",
    "feature_levels",
    "ConfigError",
    "add_retro_config",
    "check_config",
    "load_config",
    "use_shapes",
    "DatasetError",
    "build_evaluator",
    "check_datasets",
    "register_shapes",
    "Res5ROIHeadsExtraNorm",
    "D2Weights",
    "IncompatibleWeightsError",
    "RetroCheckpointer",
    "check_model_matches",
    "choose_target",
    "resnet_to_d2",
    "save_d2",
    "to_detectron2",
]
