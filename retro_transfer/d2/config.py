"""The config keys this package adds to Detectron2's, and the checks a config must pass."""

from detectron2.config import CfgNode as CN

NORMS = ("BN", "SyncBN", "FrozenBN", "GN")
"""Values of ``MODEL.TIMM.NORM``; they mean what Detectron2's ``get_norm`` means by them."""

TIMM_BACKBONES = ("build_timm_fpn_backbone", "build_retinanet_timm_fpn_backbone")
C4_ROI_HEADS = ("Res5ROIHeads", "Res5ROIHeadsExtraNorm")


class ConfigError(ValueError):
    """A config that would build, but not the model the user meant; the message says what to change."""


def add_retro_config(cfg: CN) -> CN:
    """Add ``MODEL.TIMM`` (the timm backbone) and ``DATASETS.SHAPES_ROOT``; returns ``cfg``.

    Freezing uses Detectron2's own ``MODEL.BACKBONE.FREEZE_AT`` for the timm
    backbone too, counted in the same levels (1 = stem, 2 = stem + res2, ...),
    so one key means one thing whichever backbone a config picks.
    """
    cfg.MODEL.TIMM = CN()
    # Any timm model with a features_only mode; the students are efficientnet_b0,
    # mobilenetv3_large_100, resnet18 and resnet34.
    cfg.MODEL.TIMM.ARCH = "efficientnet_b0"
    # Levels by stride: res{k} is the feature map at stride 2**k.
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # BN, SyncBN (BN when training in one process), FrozenBN, or GN (from scratch only).
    cfg.MODEL.TIMM.NORM = "SyncBN"
    # Folder written by tools/make_shapes.py; registered as shapes_voc_{train,val,trainval,test}.
    cfg.DATASETS.SHAPES_ROOT = "data/shapes"
    return cfg


def check_config(cfg: CN) -> None:
    """Refuse configs that build but silently lose pretrained weights (METHOD.md, "Transfer")."""
    backbone = cfg.MODEL.BACKBONE.NAME
    roi_heads = cfg.MODEL.ROI_HEADS.NAME if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" else ""
    if roi_heads in C4_ROI_HEADS:
        if backbone in TIMM_BACKBONES:
            raise ConfigError(
                f"MODEL.ROI_HEADS.NAME {roi_heads} (C4) builds its own res5 from ResNet Bottleneck blocks, so the "
                f"{cfg.MODEL.TIMM.ARCH} backbone's last stage would never be used; timm students use FPN "
                "(see configs/detection/voc_frcnn_effb0.yaml)"
            )
        if backbone == "build_resnet_backbone" and cfg.MODEL.RESNETS.DEPTH in (18, 34):
            raise ConfigError(
                f"ResNet-{cfg.MODEL.RESNETS.DEPTH} with C4: Detectron2's {roi_heads} always builds res5 from "
                "Bottleneck blocks, so the pretrained BasicBlock res5 would be dropped and a random one trained "
                "instead; use FPN (configs/detection/voc_frcnn_r18.yaml / voc_frcnn_r34.yaml)"
            )
    if backbone in TIMM_BACKBONES and cfg.MODEL.TIMM.NORM not in NORMS:
        raise ConfigError(f"MODEL.TIMM.NORM {cfg.MODEL.TIMM.NORM!r}: choose one of {', '.join(NORMS)}")
