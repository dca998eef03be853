"""Any timm convolutional network as a Detectron2 backbone, under Detectron2's own FPN.

The bottom-up network is ``timm.create_model(arch, features_only=True)``: the
same parameter names as the distilled ``Student`` (METHOD.md, "Transfer to
detection and segmentation"), so a converted student loads with exact names.
Levels are named by stride as Detectron2 names ResNet stages: the feature map
at stride 2**k is ``res{k}`` (``res2`` .. ``res5`` at strides 4 .. 32), and the
strides and widths are read from timm's ``feature_info``, never assumed.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence

import timm
import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from timm.layers import BatchNormAct2d, GroupNormAct, convert_sync_batchnorm, freeze_batch_norm_2d

from .config import NORMS, ConfigError

GN_MAX_GROUPS = 32  # Wu & He (2018) use 32 groups; narrow timm stages (16, 24, 40 channels) get fewer


@dataclass(frozen=True)
class Level:
    """One feature map of a timm model: its position in ``feature_info`` and the module that emits it."""

    index: int
    stride: int
    channels: int
    module: str


@lru_cache(maxsize=None)
def feature_levels(arch: str) -> Dict[str, Level]:
    """``res{k}`` -> Level for every feature map timm's ``features_only`` model of ``arch`` offers."""
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(
            f"unknown timm architecture {arch!r} (MODEL.TIMM.ARCH); timm has e.g. {', '.join(close) or 'none alike'}"
        )
    try:
        # Built on a copy of the random state: the probe's initialisation must not move the draws that
        # initialise the real model, or the first model built in a process would differ from the next ones.
        with torch.random.fork_rng(devices=[]):
            probe = timm.create_model(arch, pretrained=False, features_only=True)
    except RuntimeError as e:  # timm's words for "this model has no features_only mode"
        raise ConfigError(f"timm model {arch!r} cannot be a multi-scale backbone: {e}") from e
    info = probe.feature_info
    levels: Dict[str, Level] = {}
    for index, (stride, channels, module) in enumerate(zip(info.reduction(), info.channels(), info.module_name())):
        k = int(round(math.log2(stride)))
        if 2**k != stride or f"res{k}" in levels:
            raise ConfigError(
                f"timm model {arch!r} has feature strides {info.reduction()}; FPN needs distinct powers of two"
            )
        levels[f"res{k}"] = Level(index, stride, channels, module)
    return levels


def _gn_groups(channels: int) -> int:
    return max(g for g in range(1, GN_MAX_GROUPS + 1) if channels % g == 0)


def _to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by a GroupNorm (keeping timm's fused activation)."""
    if isinstance(module, BatchNormAct2d):
        gn = GroupNormAct(module.num_features, _gn_groups(module.num_features), eps=module.eps)
        gn.act, gn.drop = module.act, module.drop
        return gn
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.GroupNorm(_gn_groups(module.num_features), module.num_features, eps=module.eps)
    for name, child in module.named_children():
        new = _to_group_norm(child)
        if new is not child:
            module.add_module(name, new)
    return module


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Detectron2's norm choices applied to a timm network built with BatchNorm.

    timm fuses BN and activation in ``BatchNormAct2d``; Detectron2's
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` and torch's
    ``convert_sync_batchnorm`` would drop that activation, so timm's own
    converters are used. SyncBN falls back to plain BN in a single process.
    GN cannot use BN statistics: it is for training from scratch (loading a
    converted BN checkpoint into it is refused, see ``weights``).
    """
    if norm == "BN":
        return module
    if norm == "SyncBN":
        return convert_sync_batchnorm(module)
    if norm == "FrozenBN":
        return freeze_batch_norm_2d(module)
    if norm == "GN":
        return _to_group_norm(module)
    raise ConfigError(f"unknown MODEL.TIMM.NORM {norm!r}; choose one of {', '.join(NORMS)}")


class TimmBackbone(Backbone):
    """Bottom-up features ``res{k}`` of a timm ``features_only`` model, parameters under ``body.``."""

    def __init__(self, arch: str, out_features: Sequence[str], norm: str = "BN", freeze_at: int = 0, in_chans: int = 3):
        super().__init__()
        levels = feature_levels(arch)
        unknown = [f for f in out_features if f not in levels]
        if unknown or not out_features:
            raise ConfigError(
                f"MODEL.TIMM.OUT_FEATURES {list(out_features)}: {arch} offers {', '.join(levels)} "
                f"(strides {', '.join(str(lv.stride) for lv in levels.values())})"
            )
        if not 0 <= freeze_at <= len(levels):
            raise ConfigError(
                f"MODEL.BACKBONE.FREEZE_AT {freeze_at}: {arch} has {len(levels)} levels ({', '.join(levels)}); "
                "use 0 to train everything"
            )
        if norm not in NORMS:
            raise ConfigError(f"unknown MODEL.TIMM.NORM {norm!r}; choose one of {', '.join(NORMS)}")
        self.arch = arch
        self.norm = norm
        self._out_features = sorted(out_features, key=lambda f: levels[f].index)
        self._out_feature_strides = {f: levels[f].stride for f in self._out_features}
        self._out_feature_channels = {f: levels[f].channels for f in self._out_features}
        indices = [levels[f].index for f in self._out_features]
        body = timm.create_model(arch, pretrained=False, features_only=True, out_indices=indices, in_chans=in_chans)
        self.body = convert_norm(body, norm)
        self.freeze(freeze_at, levels)

    def freeze(self, freeze_at: int, levels: Dict[str, Level]) -> None:
        """Freeze the first ``freeze_at`` levels, as Detectron2's ``ResNet.freeze`` does.

        For the usual five levels ``res1`` .. ``res5`` this is ResNet's
        numbering: 1 freezes the stem (everything up to the stride-2 map), 2
        adds the stride-4 stage, and so on. Frozen BatchNorms become FrozenBN.
        Modules are taken in definition order, which is execution order for
        timm's sequential CNNs.
        """
        if freeze_at == 0:
            return
        last = sorted(levels.values(), key=lambda lv: lv.index)[freeze_at - 1].module
        names = [n for n, _ in self.body.named_modules() if n]
        inside = [i for i, n in enumerate(names) if n == last or n.startswith(last + ".")]
        if not inside:
            raise ConfigError(f"{self.arch}: feature module {last!r} not found in the timm model")
        frozen = set(names[: max(inside) + 1])
        # A container that is only partly frozen (EfficientNet's ``blocks``)
        # owns no parameters itself, so freezing what each module owns directly
        # freezes exactly the frozen range.
        for name, module in list(self.body.named_modules()):
            if name not in frozen:
                continue
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                parent_name, _, child = name.rpartition(".")
                parent = self.body.get_submodule(parent_name) if parent_name else self.body
                parent.add_module(child, freeze_batch_norm_2d(module))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.body(x)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


def build_timm_bottom_up(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The timm network named by ``MODEL.TIMM`` (see ``config.add_retro_config``)."""
    return TimmBackbone(
        cfg.MODEL.TIMM.ARCH,
        cfg.MODEL.TIMM.OUT_FEATURES,
        norm=cfg.MODEL.TIMM.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_chans=input_shape.channels,
    )


def _fpn(cfg, bottom_up: TimmBackbone, top_block: nn.Module) -> FPN:
    in_features: List[str] = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES {in_features} asks for {', '.join(missing)}, which MODEL.TIMM.OUT_FEATURES "
            f"{list(bottom_up.output_shape())} does not produce"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """timm bottom-up + FPN with P6 by max-pooling P5: the R-CNN pyramid of Lin et al. (2017)."""
    return _fpn(cfg, build_timm_bottom_up(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """timm bottom-up + FPN with P6/P7 convolved from the last bottom-up level, as RetinaNet (Lin et al., 2017b)."""
    bottom_up = build_timm_bottom_up(cfg, input_shape)
    last = list(cfg.MODEL.FPN.IN_FEATURES)[-1] if cfg.MODEL.FPN.IN_FEATURES else "res5"
    if last not in bottom_up.output_shape():
        raise ConfigError(f"MODEL.FPN.IN_FEATURES ends in {last!r}, which MODEL.TIMM.OUT_FEATURES does not produce")
    top = LastLevelP6P7(bottom_up.output_shape()[last].channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature=last)
    return _fpn(cfg, bottom_up, top)

