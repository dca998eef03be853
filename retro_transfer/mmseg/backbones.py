"""The distilled student as an MMSegmentation backbone: any timm ``features_only`` network.

One registered type serves every student (ResNet-18/34, EfficientNet-B0,
MobileNetV3-Large, a ResNet-50 teacher, any timm CNN with feature levels)::

    backbone=dict(type='StudentBackbone', arch='efficientnet_b0', out_indices=(1, 2, 3, 4),
                  init_cfg=dict(type='Pretrained', checkpoint='student_mmseg.pth'))

Feature levels are timm's ``feature_info`` entries (level 0 is the stride-2
stem for the students above); the segmentation heads read the stride 4..32
levels. Parameters sit under ``body.`` with timm's names, which is exactly the
layout ``tools/convert_to_openmmlab.py`` writes.

Pretrained weights load with every backbone tensor accounted for: MMEngine's
own ``Pretrained`` initialiser loads with ``strict=False`` and only logs what
did not match, so a wrong file would train from random weights unnoticed.
Here a missing, extra or mis-shaped tensor is an error (extra tensors matter:
a ResNet-34 file loads into a ResNet-18 without a single missing key).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from mmengine.dist import get_world_size
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize, update_init_info
from mmseg.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import CheckpointError, safe_load

PREFIX = "body."
"""Where the timm network sits in :class:`StudentBackbone`, and so in converted checkpoints."""

MMSEG_FORMAT = "retro-transfer/mmseg-backbone"
"""``meta["format"]`` of the checkpoints ``tools/convert_to_openmmlab.py`` writes."""

NORM_TYPES = ("BN", "SyncBN")


def build_features(arch: str, output_stride: int = 32, drop_path_rate: float = 0.0) -> nn.Module:
    """``timm.create_model(arch, features_only=True)`` with every feature level, no pretrained download.

    All levels are always built, so the parameter names (and a converted
    checkpoint's keys) do not depend on which levels a config reads.
    """
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm architecture {arch!r}; timm has e.g. {', '.join(close) or 'none alike'}")
    kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(arch, pretrained=False, features_only=True, **kwargs)
    except (RuntimeError, TypeError, AssertionError, ValueError) as e:
        what = f" with output_stride={output_stride}" if output_stride != 32 else ""
        raise ValueError(f"timm cannot build {arch!r} as a multi-scale feature extractor{what}: {e}") from e


def default_out_indices(reductions: Sequence[int]) -> Tuple[int, ...]:
    """The levels at stride 4 and coarser: what FCN, DeepLabV3+ and UPerNet heads expect."""
    return tuple(i for i, r in enumerate(reductions) if r >= 4)


@MODELS.register_module()
class StudentBackbone(BaseModule):
    """A timm CNN's feature pyramid (``features_only``) for MMSeg's ``EncoderDecoder``.

    Args:
        arch: timm model name of the student (``efficientnet_b0``,
            ``mobilenetv3_large_100``, ``resnet18``, ``resnet34``, ``resnet50``...).
        out_indices: feature levels to return, indices into timm's
            ``feature_info``; default: every level of stride 4 or coarser.
        output_stride: 32 (plain), 16 or 8 (later stages dilated instead of
            strided, as DeepLab does); the weights are the same.
        frozen_stages: freeze (no gradients, BN in eval mode) everything up to
            and including the layer that produces level ``frozen_stages``;
            -1 freezes nothing, 0 the stride-2 stem. For ResNets this is the
            meaning MMSeg's ``ResNet`` gives it.
        norm_eval: keep every BatchNorm of the backbone in eval mode while
            training (running statistics frozen; affine weights still train).
        norm_cfg: ``dict(type='BN' | 'SyncBN', requires_grad=True)``. SyncBN is
            applied only when training on several processes (through timm's
            converter, which keeps the activation fused into timm's
            ``BatchNormAct2d``; torch's and MMEngine's converters would drop
            it). On one device MMEngine reverts SyncBN anyway.
        drop_path_rate: stochastic depth of the timm model (0 = off).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=None)``
            for a file written by ``tools/convert_to_openmmlab.py`` (or, with
            ``prefix='backbone.'``, a segmentor checkpoint), loaded strictly;
            ``None`` trains from random initialisation.
        pretrained: a checkpoint path, the older spelling of ``init_cfg``
            (what ``EncoderDecoder(pretrained=...)`` passes on).
    """

    def __init__(
        self,
        arch: str,
        out_indices: Optional[Sequence[int]] = None,
        output_stride: int = 32,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        norm_cfg: Optional[Mapping] = None,
        drop_path_rate: float = 0.0,
        init_cfg: Optional[Mapping] = None,
        pretrained: Optional[str] = None,
    ) -> None:
        if pretrained is not None:
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        super().__init__(init_cfg)
        self.arch = arch
        self.body = build_features(arch, output_stride, drop_path_rate)
        info = self.body.feature_info
        self.level_channels: List[int] = list(info.channels())
        self.level_reductions: List[int] = list(info.reduction())
        levels = len(self.level_channels)
        self.out_indices = tuple(default_out_indices(self.level_reductions) if out_indices is None else out_indices)
        bad = [i for i in self.out_indices if not isinstance(i, int) or not 0 <= i < levels]
        if bad or not self.out_indices:
            raise ValueError(
                f"out_indices {self.out_indices} of {arch} must be feature levels 0..{levels - 1} "
                f"(channels {self.level_channels}, strides {self.level_reductions})"
            )
        if not -1 <= frozen_stages < levels:
            raise ValueError(f"frozen_stages of {arch} must be -1 (none) to {levels - 1}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._setup_norm(dict(norm_cfg or {"type": "BN"}))
        self._frozen_modules = self._modules_up_to_level(frozen_stages)
        self._freeze_stages()

    # ------------------------------------------------------------------ structure

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned levels, in ``out_indices`` order (a head's ``in_channels``)."""
        return [self.level_channels[i] for i in self.out_indices]

    @property
    def out_strides(self) -> List[int]:
        return [self.level_reductions[i] for i in self.out_indices]

    def _setup_norm(self, norm_cfg: Dict) -> None:
        kind = norm_cfg.get("type", "BN")
        if kind not in NORM_TYPES:
            raise ValueError(f"norm_cfg type {kind!r} is not supported by StudentBackbone; use one of {NORM_TYPES}")
        unknown = set(norm_cfg) - {"type", "requires_grad"}
        if unknown:
            raise ValueError(f"norm_cfg keys {sorted(unknown)} are not supported by StudentBackbone (type, requires_grad)")
        if kind == "SyncBN" and get_world_size() > 1:
            self.body = timm.layers.convert_sync_batchnorm(self.body)
        if not norm_cfg.get("requires_grad", True):
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)

    def _module_name(self, timm_name: str) -> str:
        """timm's ``FeatureListNet`` stores ``stages.0`` as ``stages_0``; find either."""
        for name in (timm_name, timm_name.replace(".", "_", 1)):
            try:
                self.body.get_submodule(name)
                return name
            except AttributeError:
                continue
        raise ValueError(f"{self.arch}: cannot find the module {timm_name!r} that produces a feature level")

    def _modules_up_to_level(self, level: int) -> List[str]:
        """Names of the modules that run before feature ``level`` is produced, that level's own included.

        Relies on registration order being execution order, as it is for timm's
        sequential CNNs. Ancestors of the boundary (e.g. ``blocks``) are left
        out, since they also hold later layers. Names, not module objects, so
        that a later module swap (a norm conversion) cannot leave them stale.
        """
        if level < 0:
            return []
        boundary = self._module_name(self.body.feature_info.module_name()[level])
        names, inside = [], False
        for name, _ in self.body.named_modules():
            if name == boundary:
                inside = True
            elif inside and not name.startswith(boundary + "."):
                break
            if name and not boundary.startswith(name + "."):
                names.append(name)
        return names

    def _freeze_stages(self) -> None:
        for name in self._frozen_modules:
            module = self.body.get_submodule(name)
            module.training = False
            for param in module.parameters(recurse=False):
                param.requires_grad = False

    def train(self, mode: bool = True) -> "StudentBackbone":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.body(x)
        return tuple(features[i] for i in self.out_indices)

    # ------------------------------------------------------------------ weights

    def init_weights(self) -> None:
        cfgs = self.init_cfg if isinstance(self.init_cfg, (list, tuple)) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        if not pretrained or self._is_init:
            super().init_weights()
            return
        if len(pretrained) > 1:
            raise ValueError(f"StudentBackbone takes one Pretrained init_cfg, got {len(pretrained)}")
        others = [c for c in cfgs if c.get("type") != "Pretrained"]
        if others:
            initialize(self, others)
        cfg = pretrained[0]
        loaded = load_pretrained(self, cfg.get("checkpoint"), prefix=cfg.get("prefix"),
                                 map_location=cfg.get("map_location", "cpu"))
        if hasattr(self, "_params_init_info"):
            update_init_info(self, init_info=f"StudentBackbone: {loaded} tensors from {cfg.get('checkpoint')}")
        self._is_init = True


# ---------------------------------------------------------------------- strict loading


def _read(checkpoint: str, map_location: str) -> dict:
    if "://" in str(checkpoint):
        from mmengine.runner.checkpoint import CheckpointLoader

        return CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
    return safe_load(checkpoint)


def not_converted_message(checkpoint: str, ckpt: Mapping) -> Optional[str]:
    """Name the fix when the file is a distillation, MoCo or timm checkpoint rather than a converted one."""
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    keys = [k for k in state if isinstance(k, str)]
    if ckpt.get("format") == DISTILL_FORMAT or any(k.startswith(("encoder_q.", "module.encoder_q.")) for k in keys) \
            or ("conv1.weight" in keys or "conv_stem.weight" in keys):
        return (
            f"{checkpoint} is not an OpenMMLab backbone checkpoint (it looks like a distillation, MoCo v2 or "
            f"timm/torchvision file); convert it first: python tools/convert_to_openmmlab.py {checkpoint} OUT.pth, "
            "then set model.backbone.init_cfg.checkpoint=OUT.pth"
        )
    return None


def _names(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(
    backbone: StudentBackbone, checkpoint: Optional[str], prefix: Optional[str] = None, map_location: str = "cpu"
) -> int:
    """Load ``checkpoint`` into ``backbone``; any missing, extra or mis-shaped tensor raises CheckpointError.

    Returns the number of tensors loaded. ``prefix`` (e.g. ``'backbone.'``)
    selects the backbone of a whole-segmentor checkpoint.
    """
    if not checkpoint:
        raise CheckpointError(
            "StudentBackbone init_cfg has no checkpoint; pass --cfg-options "
            "model.backbone.init_cfg.checkpoint=STUDENT_OPENMMLAB.pth (written by tools/convert_to_openmmlab.py), "
            "or model.backbone.init_cfg=None to train from random initialisation"
        )
    ckpt = _read(checkpoint, map_location)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        state = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{checkpoint} has no tensors under the prefix {prefix!r}")
    elif meta.get("format") != MMSEG_FORMAT:
        hint = not_converted_message(checkpoint, ckpt)
        if hint:
            raise CheckpointError(hint)
    arch = meta.get("arch") if meta.get("format") == MMSEG_FORMAT else None
    if arch is not None and arch != backbone.arch:
        raise CheckpointError(
            f"{checkpoint} holds a {arch} backbone but the config builds {backbone.arch}; "
            f"use a config for {arch} or set model.backbone.arch={arch}"
        )
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if missing or extra or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone tensor(s) missing ({_names(missing)})")
        if extra:
            problems.append(f"{len(extra)} tensor(s) the {backbone.arch} backbone does not have ({_names(extra)})")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:3])})")
        if any(k.startswith("backbone." + PREFIX) for k in extra):
            hint = " It is a whole-segmentor checkpoint: add prefix='backbone.' to init_cfg, or use load_from."
        else:
            hint = " Is the file for this architecture, written by tools/convert_to_openmmlab.py?"
        raise CheckpointError(
            f"{checkpoint} does not fit StudentBackbone({backbone.arch}): " + "; ".join(problems) + "." + hint
        )
    backbone.load_state_dict(tensors, strict=True)
    print_log(f"StudentBackbone({backbone.arch}): loaded all {len(tensors)} tensors from {checkpoint}",
              logger="current", level=logging.INFO)
    return len(tensors)
