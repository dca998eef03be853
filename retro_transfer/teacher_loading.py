"""Teacher checkpoints: recognise a file's layout and load the frozen teacher it holds.

Users bring teacher files made elsewhere (METHOD.md, "The teacher"): the
official releases of MoCo v2, MoCo v3, SwAV, DINO, the common PyTorch layouts
of SimCLR and BYOL, a torchvision ResNet state dict, or a distillation
checkpoint written by this project. ``load_teacher`` tells them apart by their
key patterns, never by file names (``retro_transfer.teacher_families``), and
loads each with no conversion step. Every user mistake surfaces as a
``CheckpointError`` whose message says what is wrong and how to fix it.

The checked loading (:func:`load_checked`), freezing and constructor helpers
here are also what :mod:`distill.checkpoint` loads trained students with.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from distill.common import TEACHER_ARCHS

from .models.teachers import Teacher, join_arch
from .safe_io import CheckpointError, PathLike, safe_load
from .teacher_families import AUTO, TeacherLayout, recognise

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# Blocks per stage (layer1..layer4) and block type of torchvision's ResNets
# (He et al., 2016, Table 1). Depth alone separates them, so tensors, not a
# config entry, decide what a checkpoint holds.
RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


@dataclass
class LoadReport:
    """What ``load_teacher`` found and did, key by key, so nothing is dropped silently.

    ``format`` is the family (``moco_v2``, ``moco_v3``, ``swav``, ``dino``,
    ``simclr``, ``byol``) or other layout (``torchvision``,
    ``retro_transfer_teacher``) the file was read as; ``backbone`` and ``head``
    say which keys became the backbone and the head, and what the head is.
    ``missing`` and ``unexpected`` use the names as they are (or would be) in
    the file, e.g. ``module.encoder_q.layer1.0.bn1.running_mean``. A teacher
    with missing weights is unusable, so ``load_teacher`` raises rather than
    return one, and ``missing`` is empty in every report it returns.
    ``ignored`` counts the tensors of the teacher's state dict that are not
    the teacher, by group; ``other_entries`` are the file's top-level entries
    that were not read at all (e.g. DINO's ``student``).
    """

    format: str
    arch: str
    has_head: bool
    loaded: int
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: Dict[str, int] = field(default_factory=dict)
    backbone: str = ""
    head: str = ""
    entry: str = ""
    other_entries: List[str] = field(default_factory=list)

    def summary(self) -> str:
        head = "with its projection head" if self.has_head else "without a projection head"
        where = f", from the file's {self.entry}" if self.entry else ""
        lines = [f"teacher {self.arch} ({self.format} layout{where}), {head}: {self.loaded} tensors loaded"]
        if self.backbone:
            lines.append(f"backbone: {self.backbone}")
        if self.head:
            lines.append(f"head: {self.head}")
        if self.ignored:
            groups = ", ".join(f"{name} ({count})" for name, count in self.ignored.items())
            lines.append(f"ignored, not part of the teacher: {groups}")
        if self.other_entries:
            lines.append(f"other entries of the file, not read: {', '.join(self.other_entries)}")
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected, not loaded ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)



def _detect_layout(ckpt: Mapping, family: str, source: str) -> TeacherLayout:
    """The family's layout of ``ckpt`` (``teacher_families.recognise``), its refusals naming the file."""
    try:
        return recognise(ckpt, family)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _split_teacher(layout: TeacherLayout, source: str) -> Tuple[StateDict, StateDict, Dict[str, int]]:
    """Backbone and head tensors under the teacher module's names, and counts of every other group."""
    backbone: StateDict = {}
    head: StateDict = {}
    used = []
    for key, value in layout.state.items():
        if layout.head is not None and layout.head.owns(key):
            part, target = layout.head, head
        elif layout.backbone.owns(key):
            part, target = layout.backbone, backbone
        else:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        target[part.teacher_name(key)] = value
        used.append(key)
    if not backbone:
        raise CheckpointError(
            f"{source} is a {layout.family} checkpoint with no backbone weights under {layout.backbone.prefix!r}"
        )
    return backbone, head, _ignored_groups(layout, used)


def _ignored_groups(layout: TeacherLayout, used: List[str]) -> Dict[str, int]:
    """Counts of the keys that are not the teacher, per group: the shortest name that covers none of the teacher.

    The DDP wrapper is left out of the names, so MoCo v2's key encoder reads
    ``encoder_k`` and DINO's output layer ``head.last_layer`` (``head`` alone
    would also cover the embedding's MLP). The family's reason follows a name.
    """
    def parts(key: str) -> List[str]:
        return (key[len(layout.wrapper) :] if key.startswith(layout.wrapper) else key).split(".")

    taken = {tuple(p[:n]) for p in map(parts, used) for n in range(1, len(p) + 1)}
    used_set = set(used)
    groups: Counter = Counter()
    for key in layout.state:
        if key in used_set:
            continue
        p = parts(str(key))
        n = next((n for n in range(1, len(p) + 1) if tuple(p[:n]) not in taken), len(p))
        name = ".".join(p[:n])
        groups[f"{name} ({layout.reasons[name]})" if name in layout.reasons else name] += 1
    return dict(groups)


def _resnet_signature(backbone_keys: List[str]) -> Tuple[str, Tuple[int, ...]]:
    """Block type and blocks per stage, read from torchvision key names (``layer3.22.conv1.weight``)."""
    blocks = {stage: set() for stage in range(1, 5)}
    bottleneck = False
    for key in backbone_keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit():
            blocks[int(parts[0][-1])].add(int(parts[1]))
            bottleneck = bottleneck or parts[2] == "conv3"
    return ("bottleneck" if bottleneck else "basic"), tuple(len(blocks[s]) for s in range(1, 5))


def infer_resnet_arch(state: Mapping[str, torch.Tensor], prefix: str = "") -> Optional[str]:
    """The torchvision ResNet whose key layout ``state`` has (keys under ``prefix``), or None.

    ResNet-18/34 use BasicBlocks (no ``conv3``) and differ by depth; ResNet-50,
    101 and 152 use Bottlenecks and differ by the blocks in layer2/layer3.
    """
    keys = [k[len(prefix) :] for k in state if k.startswith(prefix)]
    return RESNET_LAYOUTS.get(_resnet_signature(keys))


def _infer_teacher_arch(backbone: StateDict) -> Tuple[Optional[str], int]:
    """Depth from the block layout, width from the stem: SwAV's and SimCLR's ResNet-50-w2 have 128 stem channels."""
    depth = infer_resnet_arch(backbone)
    stem = backbone.get("conv1.weight")
    channels = int(stem.shape[0]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else 64
    width = channels // 64 if channels % 64 == 0 and channels >= 64 else 0
    if depth is None or width == 0 or (width > 1 and depth in ("resnet18", "resnet34")):
        return None, width
    return join_arch(depth, width), width


def _resolve_arch(backbone: StateDict, arch: Optional[str], source: str) -> str:
    """The checkpoint's architecture; a config that names another one is a user mistake to report."""
    found, width = _infer_teacher_arch(backbone)
    if arch is not None and arch not in TEACHER_ARCHS:
        raise CheckpointError(f"unknown teacher architecture {arch!r}; choose one of {', '.join(TEACHER_ARCHS)}")
    if found is not None and found not in TEACHER_ARCHS:
        raise CheckpointError(
            f"{source} holds a {found} (a {width}x wide ResNet), which is not supported; supported: {', '.join(TEACHER_ARCHS)}"
        )
    if found is not None and arch is not None and found != arch:
        raise CheckpointError(
            f"{source}: checkpoint holds a {found} but the config asks for {arch}; "
            f"set the teacher arch to {found}, or leave it unset to infer it from the checkpoint"
        )
    if found is None and arch is None:
        kind, blocks = _resnet_signature(list(backbone))
        known = ", ".join(f"{name} {b}" for (_, b), name in RESNET_LAYOUTS.items())
        raise CheckpointError(
            f"{source}: cannot tell which ResNet this is: {kind} blocks per stage {blocks} and a stem of "
            f"{width * 64 or 'an unknown number of'} channels match no torchvision ResNet ({known}; bottleneck ones "
            "also 2x/4x/5x wide); the teacher must be a torchvision ResNet. If it is one with blocks missing, set the "
            "teacher arch explicitly to get the list of missing weights"
        )
    return arch or found


def load_checked(module: nn.Module, state: StateDict, file_name, source: str) -> Tuple[int, List[str]]:
    """Load with every problem named: shape mismatches and missing keys raise, extra keys are returned.

    ``file_name`` maps a module key to its name in the file, so messages quote
    the names a user can find with ``torch.load(...).keys()``.
    """
    expected = module.state_dict()
    wrong = [
        f"{file_name(k)}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not match the model: " + "; ".join(wrong))
    offered = len(state)  # counted first: BatchNorm fills absent num_batches_tracked entries into ``state``
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        names = [file_name(k) for k in result.missing_keys]
        raise CheckpointError(
            f"{source} lacks {len(names)} weight(s) the model needs, so it cannot be used: {', '.join(names)}"
        )
    unexpected = [file_name(k) for k in result.unexpected_keys]
    if unexpected:
        log.warning("%s: %d tensor(s) match nothing in the model and were not loaded: %s",
                    source, len(unexpected), ", ".join(unexpected))
    return offered - len(unexpected), unexpected


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics, METHOD.md "The teacher") and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def build_checked(factory, *args, source: str, **kwargs):
    """Turn a constructor's ValueError (unknown arch, adapter kind) into a CheckpointError naming the file."""
    try:
        return factory(*args, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _require_head_message(source: str, layout: TeacherLayout, arch: str) -> str:
    return (
        f"{source} ({layout.family} layout, {arch}) has no projection head. Retro reuses the teacher's projection "
        "head H_T, and all distillation methods here (SEED, DisCo, Retro) use the teacher's projection head, so a "
        "checkpoint without one (e.g. a supervised torchvision classifier, or a backbone-only release) cannot be the "
        "teacher. Pass a self-supervised pretraining checkpoint that keeps its head, such as "
        "moco_v2_800ep_pretrain.pth.tar, r-50-1000ep.pth.tar (MoCo v3), swav_800ep_pretrain.pth.tar or "
        "dino_resnet50_pretrain_full_checkpoint.pth (README, 'Teachers')."
    )


def _file_namer(layout: TeacherLayout):
    """Teacher module key -> the key the file has (or would have) for it."""
    def file_name(key: str) -> str:
        part_name, _, name = key.partition(".")
        part = layout.head if part_name == "head" and layout.head is not None else layout.backbone
        return part.file_name(name)

    return file_name


def _uninitialised_teacher(arch: str, head: Optional[nn.Module]) -> Teacher:
    """A teacher whose tensors are allocated but not initialised, since the file overwrites every one of them.

    ``load_checked`` refuses a file that lacks any weight, so no uninitialised
    value survives; skipping torchvision's initialisation saves seconds per
    ResNet-50 and much more for the wide ones. BatchNorm statistics are reset
    so that a file older than ``num_batches_tracked`` gets a zero count there.
    """
    with torch.device("meta"):
        teacher = Teacher(arch, with_head=False)
    teacher.to_empty(device="cpu")
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
    teacher.head = head
    return teacher


def _check_head_input(teacher: Teacher, file_name, source: str) -> None:
    """The head, whose widths come from its own tensors, must take the backbone's feature width."""
    if teacher.head is None or teacher.head.in_dim == teacher.out_channels:
        return
    first = next(name for name, m in teacher.head.named_modules() if isinstance(m, nn.Linear))
    weight = teacher.head.get_submodule(first).weight
    raise CheckpointError(
        f"{source}: tensor shapes do not match the model: {file_name(f'head.{first}.weight')}: file {tuple(weight.shape)} "
        f"vs model ({weight.shape[0]}, {teacher.out_channels}); the projection head takes {teacher.head.in_dim} features "
        f"but the {teacher.arch} backbone gives {teacher.out_channels}"
    )


def _check_head_complete(layout: TeacherLayout, head_state: StateDict, source: str) -> None:
    """Refuse a head missing one of its family's layers: the rest would build a shorter head that loads cleanly."""
    present = {int(name.split(".", 1)[0]) for name in head_state if name.split(".", 1)[0].isdigit()}
    missing = [index for index in layout.head_layers if index not in present]
    if missing:
        names = ", ".join(layout.head.file_name(str(index)) for index in missing)
        raise CheckpointError(
            f"{source}: the {layout.family} projection head has no {names} (its layers are "
            f"{', '.join(layout.head.file_name(str(i)) for i in layout.head_layers)}): the file is damaged; "
            "use the complete release file"
        )


def _describe_head(layout: TeacherLayout, head: Optional[nn.Module]) -> str:
    if head is None:
        return ""
    return f"{layout.head.describe()} = {head.describe()} (in {head.in_dim}, out {head.out_dim})"


def _describe_entries(layout: TeacherLayout) -> str:
    """Where the teacher was in the file, e.g. "'teacher' entry"; empty when the file is its state dict."""
    if not layout.entries:
        return ""
    return " and ".join(map(repr, layout.entries)) + (" entry" if len(layout.entries) == 1 else " entries")


def teacher_from_checkpoint(
    ckpt: Mapping, source: str, arch: Optional[str] = None, require_head: bool = False, family: str = AUTO
) -> Tuple[Teacher, LoadReport]:
    """``load_teacher`` on an already-read checkpoint dict."""
    layout = _detect_layout(ckpt, family, source)
    backbone, head_state, ignored = _split_teacher(layout, source)
    arch = _resolve_arch(backbone, arch, source)
    if require_head and not head_state:
        raise CheckpointError(_require_head_message(source, layout, arch))
    if head_state:
        _check_head_complete(layout, head_state, source)
    head = build_checked(layout.build_head, head_state, source=source) if head_state else None
    teacher = _uninitialised_teacher(arch, head)
    file_name = _file_namer(layout)
    _check_head_input(teacher, file_name, source)
    state = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head_state.items()}}
    loaded, unexpected = load_checked(teacher, state, file_name, source)
    report = LoadReport(
        layout.family,
        arch,
        head is not None,
        loaded,
        unexpected=unexpected,
        ignored=ignored,
        backbone=f"{layout.backbone.describe()}, as a torchvision {arch}",
        head=_describe_head(layout, head),
        entry=_describe_entries(layout),
        other_entries=[str(k) for k in ckpt if layout.entries and k not in layout.entries],
    )
    return freeze(teacher), report


def load_teacher(
    path: PathLike, arch: Optional[str] = None, require_head: bool = False, family: str = AUTO
) -> Tuple[Teacher, LoadReport]:
    """Load a frozen teacher from any accepted layout, with a report of what was (not) loaded.

    The layout (a family's release, torchvision, retro-transfer distillation)
    is recognised from the keys (``retro_transfer.teacher_families``) unless
    ``family`` names one; the architecture is read from the keys and shapes,
    and ``arch``, when given, must agree. The head is the family's own,
    rebuilt from its tensors. ``require_head`` is for distillation, which needs H_T.
    """
    return teacher_from_checkpoint(safe_load(path), str(path), arch, require_head, family)
