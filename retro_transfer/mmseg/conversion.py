"""A backbone read by :func:`retro_transfer.convert.read_backbone`, as an MMSeg ``Pretrained`` checkpoint.

The file is ``{"state_dict": {"body.<timm name>": tensor}, "meta": {...}}``:
the keys are :class:`~retro_transfer.mmseg.backbones.StudentBackbone`'s own,
so ``init_cfg=dict(type='Pretrained', checkpoint=FILE)`` on that backbone
loads every tensor, and ``meta["arch"]`` lets it refuse a file made for
another architecture.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, Tuple

import timm
import torch

from retro_transfer.convert import BackboneSource, ConversionError, check_complete

from .backbones import MMSEG_FORMAT, PREFIX, build_features


def _flattened(key: str) -> str:
    """timm's ``FeatureListNet`` renames ``stages.0.x`` to ``stages_0.x`` when it flattens a model."""
    parts = key.split(".")
    return "_".join(parts[:2]) + "." + ".".join(parts[2:]) if len(parts) > 2 else key


def _architecture_head(source: BackboneSource, unmapped) -> Dict[str, int]:
    """Source keys that the full timm model has but its ``features_only`` form does not build.

    For the project's students ``read_backbone`` has already moved these out
    (``conv_head``); for other timm models it is e.g. ConvNeXt's ``head.norm``.
    They are dropped on purpose and reported; any other unmapped key is an error.
    """
    with torch.random.fork_rng(devices=[]):  # a converter leaves the caller's random draws as they were
        full = timm.create_model(source.arch, pretrained=False, num_classes=0, global_pool="").state_dict()
    return dict(Counter(k.split(".", 1)[0] for k in unmapped if k in full and full[k].shape == source.state[k].shape))


def to_mmseg(source: BackboneSource) -> Tuple[dict, Dict[str, int], BackboneSource]:
    """``(checkpoint, converted counts by group, source with the final dropped counts)``.

    Raises ConversionError if the architecture is unknown, if a backbone
    tensor would be dropped or misplaced, or if the backbone would lack one.
    """
    try:
        features = build_features(source.arch)
    except ValueError as e:
        raise ConversionError(f"{source.path}: {e}") from None
    target = {PREFIX + k: v for k, v in features.state_dict().items()}
    renamed = {}
    for key in source.state:
        for name in (key, _flattened(key)):
            if PREFIX + name in target:
                renamed[key] = PREFIX + name
                break
    unmapped = [k for k in source.state if k not in renamed]
    if unmapped:
        head = _architecture_head(source, unmapped)
        if head:
            head_keys = [k for k in unmapped if k.split(".", 1)[0] in head]
            dropped = dict(source.dropped)
            for group, count in head.items():
                dropped[f"{group} (after the last feature level)"] = count
            state = {k: v for k, v in source.state.items() if k not in head_keys}
            source = dataclasses.replace(source, state=state, dropped=dropped)
    check_complete(source, renamed, target)
    state = {renamed[k]: v for k, v in source.state.items()}
    converted = dict(Counter(k.split(".", 1)[0] for k in source.state))
    info = features.feature_info
    checkpoint = {
        "state_dict": state,
        "meta": {
            "format": MMSEG_FORMAT,
            "arch": source.arch,
            "source": source.path,
            "source_format": source.source_format,
            "dropped": dict(source.dropped),
            "channels": list(info.channels()),
            "strides": list(info.reduction()),
        },
    }
    return checkpoint, converted, source
