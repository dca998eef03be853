"""The config keys this package adds to Detectron2's, the one way configs are read, and the checks they must pass."""

import os
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data import SHAPES_COCO_PREFIX, SHAPES_PREFIX, register_shapes, shapes_classes, shapes_image_side

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
    # Folder written by tools/make_shapes.py; load_config registers it as shapes_voc_{train,val,trainval,test}
    # and shapes_coco_{train,val,test} (a script that builds its config otherwise calls register_shapes).
    cfg.DATASETS.SHAPES_ROOT = "data/shapes"
    return cfg


CONFIG_SUFFIXES = (".yaml", ".yml")


def check_config_chain(path: os.PathLike) -> None:
    """The config and every ``_BASE_`` it inherits: YAML files of keys, in a chain that ends.

    Detectron2 would run a ``.py`` config as Python (and fail on ours with an
    AttributeError), follow a ``_BASE_`` loop until RecursionError, and read
    any file at all (``/etc/passwd``) as a config. Bases are found as
    Detectron2 finds them: relative to the file that names them.
    """
    chain: List[Path] = []
    current: Optional[Path] = Path(path)
    while current is not None:
        if current.suffix.lower() not in CONFIG_SUFFIXES:
            named = f" (the _BASE_ of {chain[-1]})" if chain else ""
            raise ConfigError(
                f"{current}{named} is not a YAML config (.yaml): detection configs are YAML files such as "
                "configs/detection/voc_frcnn_effb0.yaml; Python (LazyConfig) files are not read"
            )
        if current.resolve() in {p.resolve() for p in chain}:
            loop = " -> ".join(str(p) for p in [*chain, current])
            raise ConfigError(f"_BASE_ loop: {loop}; a config must not inherit itself")
        chain.append(current)
        current = _base_of(current)


def _base_of(path: Path) -> Optional[Path]:
    """The file ``path``'s ``_BASE_`` names (None at the end of the chain, or if ``path`` does not read as YAML).

    YAML errors are left to :func:`load_config`, which reports them with their line.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path} is not a Detectron2 config: its YAML is a {kind}, not a mapping of keys")
    base = data.get("_BASE_")
    if not base:
        return None
    base = os.path.expanduser(str(base))
    if base.startswith(("http://", "https://")):
        return None
    return Path(base) if os.path.isabs(base) else path.parent / base


def load_config(
    path: os.PathLike, opts: Sequence[str] = (), shapes_root: Optional[os.PathLike] = None, register: bool = True
) -> CN:
    """Detectron2's defaults, this package's keys, the YAML at ``path`` (with its ``_BASE_``) and ``opts``.

    With ``shapes_root``, the config is pointed at the shapes data there
    (:func:`use_shapes`) before ``opts``, which still win. The shapes data
    sets are registered from the resulting ``DATASETS.SHAPES_ROOT`` (unless
    ``register`` is False: a config read only to be looked at), so a script
    that reads its config here can build a trainer on them directly.

    YAML is read with safe loading only: Detectron2's ``merge_from_file``
    falls back to ``yaml.unsafe_load`` by default, which runs a tag such as
    ``!!python/object/apply:os.system`` while reading, and a config is a file
    users download and share. Every problem is a one-line ConfigError.
    """
    check_config_chain(path)
    cfg = add_retro_config(get_cfg())
    try:
        cfg.merge_from_file(str(path), allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise ConfigError(
            f"{mark.name if mark else path}, line {mark.line + 1 if mark else '?'}: {e.problem}; configs are read with "
            "safe YAML loading, and a Python tag (which would run code) is refused, not executed. Use plain values"
        ) from None
    except yaml.YAMLError as e:
        where = f"{e.problem_mark.name}, line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else path
        raise ConfigError(f"{where} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"bad config {path}: {e}") from None
    if shapes_root is not None:
        use_shapes(cfg, shapes_root)
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"bad override ({' '.join(opts)}): {e}") from None
    if register:
        register_shapes(cfg.DATASETS.SHAPES_ROOT)
    return cfg


def use_shapes(cfg: CN, root: os.PathLike) -> CN:
    """Point ``cfg`` at the shapes data in ``root``: its data sets, number of classes and image size.

    What makes a recipe (the model, the schedule, the batch) stays, so a VOC
    or COCO config runs as it would on its own data, at the shapes data's
    scale: its images are ``side`` pixels square, and a recipe's 800 px short
    side would upsample them sixfold. Mask R-CNN configs read the COCO
    instance annotations (masks as RLE, hence bitmask), the others VOC boxes.
    """
    side, classes = shapes_image_side(root), shapes_classes(root)
    cfg.DATASETS.SHAPES_ROOT = str(root)
    if cfg.MODEL.MASK_ON:
        cfg.DATASETS.TRAIN = (SHAPES_COCO_PREFIX + "train", SHAPES_COCO_PREFIX + "val")
        cfg.DATASETS.TEST = (SHAPES_COCO_PREFIX + "test",)
        cfg.INPUT.MASK_FORMAT = "bitmask"
    else:
        cfg.DATASETS.TRAIN = (SHAPES_PREFIX + "trainval",)
        cfg.DATASETS.TEST = (SHAPES_PREFIX + "test",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = len(classes)
    cfg.INPUT.MIN_SIZE_TRAIN = (side,)
    cfg.INPUT.MIN_SIZE_TEST = side
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = 2 * side
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
