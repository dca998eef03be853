"""What the converters share: read a backbone from any accepted file, account for every tensor.

Both ``tools/convert_to_d2.py`` and ``tools/convert_to_mmseg.py`` start here.
:func:`read_backbone` returns the backbone tensors under timm's names (for a
ResNet they are also torchvision's), and says which groups it left out on
purpose; the framework-specific converter then renames them, checks that every
one lands on a key of the target backbone with the right shape, and writes.

Accepted inputs:

* a distillation checkpoint of this project: the trained student
  (``student.body.*``); its EMA copy, adapter, heads, teacher and queue are
  dropped and counted, and so is the 1x1 ``conv_head`` that widens the last
  stage for distillation but is not part of a multi-scale backbone;
* an official MoCo v2 checkpoint: ``encoder_q`` without its ``fc`` head;
* a torchvision or timm state dict (``--arch`` names it unless it is a
  ResNet, whose depth is read from the tensors); a classifier is dropped.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from distill.checkpoint import extract_student_state

from .models.students import HEAD_ONLY_PREFIXES
from .safe_io import CheckpointError, safe_load
from .teacher_loading import infer_resnet_arch

StateDict = Dict[str, torch.Tensor]

# Names a classifier goes by in torchvision and timm models: not part of a backbone.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "last_linear.")


class ConversionError(Exception):
    """A conversion that cannot be done as asked; the message says why and what to do."""


@dataclass
class BackboneSource:
    """Backbone tensors read from ``path``, and everything that was left out."""

    arch: str
    state: StateDict
    source_format: str
    path: str
    dropped: Dict[str, int] = field(default_factory=dict)


def _count(keys, strip: str = "") -> Dict[str, int]:
    return dict(Counter((k[len(strip) :] if k.startswith(strip) else k).split(".", 1)[0] for k in keys))


def _split(state: Mapping[str, torch.Tensor], prefixes) -> tuple:
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    left = [k for k in state if k.startswith(prefixes)]
    return kept, left


def _from_distill(ckpt: Dict, path: str) -> BackboneSource:
    arch, state, dropped = extract_student_state(ckpt, path)
    state, head_only = _split(state, HEAD_ONLY_PREFIXES)
    if head_only:
        dropped["student conv_head (distillation width, not a backbone stage)"] = len(head_only)
    return BackboneSource(arch, state, "distill student", path, dropped)


def _from_moco(state: Mapping[str, torch.Tensor], path: str, arch: Optional[str]) -> BackboneSource:
    wrapper = "module." if all(k.startswith("module.") for k in state) else ""
    prefix = wrapper + "encoder_q."
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    others = [k for k in state if not k.startswith(prefix)]
    encoder, head = _split(encoder, ("fc.",))
    dropped = _count(others, wrapper)
    if head:
        dropped["encoder_q.fc (projection head)"] = len(head)
    return BackboneSource(_resnet_arch(encoder, arch, path), encoder, "moco_v2 teacher", path, dropped)


def _resnet_arch(state: Mapping[str, torch.Tensor], arch: Optional[str], path: str) -> str:
    inferred = infer_resnet_arch(state)
    if arch and inferred and arch != inferred:
        raise ConversionError(f"{path} holds a {inferred}, but --arch says {arch}")
    if not (arch or inferred):
        raise ConversionError(f"cannot tell the architecture of {path}; pass --arch (a timm model name)")
    return arch or inferred


def _from_state_dict(state: Mapping[str, torch.Tensor], path: str, arch: Optional[str]) -> BackboneSource:
    wrapper = "module." if state and all(k.startswith("module.") for k in state) else ""
    state = {k[len(wrapper) :]: v for k, v in state.items()}
    is_resnet = "conv1.weight" in state and any(k.startswith("layer1.") for k in state)
    backbone, classifier = _split(state, CLASSIFIER_PREFIXES)
    backbone, head_only = _split(backbone, HEAD_ONLY_PREFIXES)
    dropped = {}
    if classifier:
        dropped["classifier"] = len(classifier)
    if head_only:
        dropped["conv_head (not a backbone stage)"] = len(head_only)
    if is_resnet:
        return BackboneSource(_resnet_arch(backbone, arch, path), backbone, "torchvision", path, dropped)
    if not arch:
        raise ConversionError(f"{path} is a plain state dict of an unknown model; pass --arch (its timm model name)")
    return BackboneSource(arch, backbone, "timm", path, dropped)


def read_backbone(path: os.PathLike, arch: Optional[str] = None) -> BackboneSource:
    """The backbone in ``path`` (any accepted layout), with counts of what was left out.

    ``arch`` names the model for plain state dicts; for other layouts it must
    agree with the file or a :class:`ConversionError` says which differs.
    """
    try:
        ckpt = safe_load(path)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    path = str(path)
    if ckpt.get("format") == "retro-transfer/distill":
        try:
            source = _from_distill(ckpt, path)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        if arch and arch != source.arch:
            raise ConversionError(f"{path} holds a distilled {source.arch}, but --arch says {arch}")
        return source
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors: it is not a checkpoint of a network")
    if any(k.startswith(("encoder_q.", "module.encoder_q.")) for k in tensors):
        return _from_moco(tensors, path, arch)
    if any(k.startswith(("student.", "model.")) for k in tensors) and "conv1.weight" not in tensors:
        raise ConversionError(
            f"no student in {path}: it has no 'format': 'retro-transfer/distill' entry; "
            "pass a checkpoint written by tools/distill.py"
        )
    return _from_state_dict(tensors, path, arch)


def check_complete(source: BackboneSource, renamed: Mapping[str, str], target: Mapping[str, torch.Tensor]) -> None:
    """Every source tensor must land on a target key of the same shape; nothing is dropped silently.

    ``renamed`` maps source names to target names; ``target`` is the state
    dict of the freshly built target backbone.
    """
    unmapped = [k for k in source.state if k not in renamed]
    absent = [renamed[k] for k in source.state if k in renamed and renamed[k] not in target]
    shapes = [
        f"{k}: {tuple(source.state[k].shape)} vs {tuple(target[renamed[k]].shape)}"
        for k in source.state
        if k in renamed and renamed[k] in target and target[renamed[k]].shape != source.state[k].shape
    ]
    if unmapped or absent or shapes:
        lines = [f"converting {source.path} ({source.arch}) would drop or misplace backbone tensors:"]
        if unmapped:
            lines.append(f"  no target name for {len(unmapped)}: {', '.join(unmapped[:8])}")
        if absent:
            lines.append(f"  not in the target backbone ({len(absent)}): {', '.join(absent[:8])}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}), so the architecture differs: {'; '.join(shapes[:4])}")
        raise ConversionError("\n".join(lines))
    missing = sorted(set(target) - set(renamed.values()))
    if missing:
        raise ConversionError(
            f"the target {source.arch} backbone has {len(missing)} tensors the file does not provide "
            f"(e.g. {', '.join(missing[:6])}); is --arch right?"
        )


def check_output(out: os.PathLike, force: bool, source: Optional[os.PathLike] = None) -> Path:
    """Refuse to overwrite an existing ``out`` unless ``force``, and ever to overwrite ``source``.

    ``source`` is the file the output is made from: writing over it (the
    same path, or a link or another path to the same file) would destroy the
    only copy of the input, ``--force`` or not.
    """
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"{out} is a folder; give the output file's path")
    if source is not None and _same_file(out, Path(source)):
        raise ConversionError(
            f"the output {out} is the input file {source}; writing it would destroy the input "
            "(--force or not): give the output another name"
        )
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the folder {out.parent} for {out.name}: {e.strerror}") from None
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path after resolving links, or hard links to one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def report(source: BackboneSource, converted: Mapping[str, int]) -> str:
    """A human summary: tensors converted and dropped, by group."""
    lines = [f"read {source.path}: {source.arch} ({source.source_format})"]
    lines.append(f"converted {sum(converted.values())} tensors:")
    lines += [f"  {group:<40} {count}" for group, count in converted.items()]
    if source.dropped:
        lines.append(f"dropped {sum(source.dropped.values())} tensors (not part of the backbone):")
        lines += [f"  {group:<40} {count}" for group, count in sorted(source.dropped.items())]
    return "\n".join(lines)
