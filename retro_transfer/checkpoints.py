"""Checkpoints: safe reading, atomic writing, and the one loader for teachers and trained encoders.

Users bring teacher files made elsewhere (METHOD.md, "The teacher"): the
official releases of MoCo v2, MoCo v3, SwAV, DINO, the common PyTorch layouts
of SimCLR and BYOL, a torchvision ResNet state dict, or a distillation
checkpoint written by this project. ``load_teacher`` tells them apart by their
key patterns, never by file names (``retro_transfer.teacher_families``), and
loads each with no conversion step. Every user mistake surfaces as a
``CheckpointError`` whose message says what is wrong and how to fix it.

Files are read with ``weights_only=True`` only: a checkpoint is data, and a
pickle that asks to run code is refused, never retried with the unsafe loader.
"""

import argparse
import contextlib
import errno
import logging
import os
import pickle
import re
import secrets
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from distill.common import TEACHER_ARCHS

from .models.adapters import build_adapter
from .models.students import Student
from .models.teachers import Teacher, join_arch
from .teacher_families import AUTO, DISTILL_FORMAT, TeacherLayout, recognise

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

ENCODER_FEATURES = ("backbone", "adapter")

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

# Plain data containers that released checkpoints hold besides tensors, allowed
# on top of weights_only's own list: DINO's full checkpoints keep the training
# arguments as an argparse.Namespace. Rebuilding one only sets attributes
# (no __init__, no __setstate__ runs), and its values go through the same
# restricted unpickler, so no code from the file can run.
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- reading and writing


def safe_load(path: PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` onto the CPU.

    The unsafe loader is never tried, not even as a fallback: a file that needs
    it could run arbitrary code, and a downloaded teacher is untrusted input.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    try:
        # torch warns about any pickle protocol above 2 (plain pickles use 4-5) before it reads or refuses the
        # file: noise on stderr above the one line a user gets either way.
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or _starts_like_a_pickle(path):
            raise CheckpointError(_refused_message(path, e)) from e
        raise CheckpointError(_damaged_message(path, e)) from e
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied") from e
    # torch.load reports damaged files with many exception types (RuntimeError
    # from the zip reader, EOFError, OSError, KeyError, struct.error...); all of
    # them mean the same thing to a user.
    except Exception as e:
        raise CheckpointError(_damaged_message(path, e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict of tensors")
    return obj


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether a file opens with a pickle protocol header (2-5), as legacy torch files and plain pickles do.

    torch calls a JPEG or random bytes "Unsupported operand", and says the same
    of a plain pickle it cannot follow; only the latter may be asking for code.
    """
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(2)
        return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    return False


def _damaged_message(path: Path, error: Exception) -> str:
    """One line for a file that is damaged or not a checkpoint, quoting the reader's reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch wraps its unpickler's reason in paragraphs of advice; the reason is the line that says it.
    detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0] if lines else "")
    reason = type(error).__name__ + (": " + detail[:200] if detail else "")
    return (
        f"{path} is truncated or not a PyTorch checkpoint ({reason}); "
        "if it was downloaded or copied, fetch it again and compare its size or checksum with the source"
    )


def _refused_message(path: Path, error: Exception) -> str:
    """Explain a weights-only refusal, naming the Python object the file asked for when torch says."""
    match = re.search(r"GLOBAL (\S+)", str(error))
    asked = f" (it asks for the Python object {match.group(1)})" if match else ""
    return (
        f"{path} contains code or Python objects that weights-only loading refuses{asked}; the file was NOT executed. "
        "A checkpoint must hold only tensors, numbers, strings and lists/dicts of them. If you trust its source, "
        "load it yourself with torch.load(..., weights_only=False) in a separate session and re-save just its "
        "state_dict; this toolkit never does that. (An old-format file cut short can also end this way: if you "
        "expected a plain checkpoint, copy it again.)"
    )


def save_atomic(obj: object, path: PathLike, dump: Optional[Callable[[object, BinaryIO], None]] = None) -> None:
    """``torch.save`` (or another ``dump(obj, file)``) that never leaves a partial file at ``path``.

    The data goes to a temporary file in the same directory (so the rename
    stays on one file system), is flushed to disk, and then replaces ``path``
    in one ``os.replace``; the directory is synced so the rename survives a
    power cut. A crash at any point leaves either the old file or the new one
    (and, after a kill, a temporary file that :func:`remove_stale_temporaries`
    deletes). A failed write is a ``CheckpointError`` that says so in one line.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with an explicit mode lets the umask apply, as for a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if _in_chain(e, KeyboardInterrupt) is not None:
            # Ctrl-C inside torch.save surfaces as torch's RuntimeError("unexpected pos") raised while its
            # zip writer closes; the user pressed Ctrl-C, and the tools answer that in one line.
            raise KeyboardInterrupt from None
        os_error = _os_error_in(e)
        if os_error is not None:
            raise CheckpointError(_write_failed_message(path, os_error)) from e
        raise
    _fsync_directory(path.parent)


_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # save_atomic's ``.NAME.PID.HEX.tmp``


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files that a killed :func:`save_atomic` left in ``directory``; return them.

    Only safe when nothing is writing there: call it when a run starts.
    """
    directory = Path(directory)
    stale = [p for p in directory.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file()] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_failure(path: PathLike, error: BaseException) -> Optional[str]:
    """One line for a write of ``path`` that failed on an OSError (a full disk, a read-only folder...), else None.

    For writers other than :func:`save_atomic` that also stage their file
    beside ``path`` and so leave the previous one unchanged.
    """
    os_error = _os_error_in(error)
    return None if os_error is None else _write_failed_message(Path(path), os_error)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write, also when torch wraps it.

    ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected
    pos`` and leaves the OSError (e.g. ENOSPC) only in ``__context__``.
    """
    return _in_chain(error, OSError)


def _in_chain(error: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``error`` or the exceptions it was raised from or during."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_failed_message(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left to write {path} ({error.strerror}); the previous {path.name} there (if any) is "
            "unchanged and the partial file was removed: free disk space or write to another folder, then run again"
        )
    return f"cannot write {path}: {error}; any previous file there is unchanged"


def _fsync_directory(directory: Path) -> None:
    """Persist a rename; file systems that cannot sync a directory are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- teacher layouts


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


def _is_distill(ckpt: Mapping) -> bool:
    return ckpt.get("format") == DISTILL_FORMAT


def _first_keys(d: Mapping, n: int = 6) -> str:
    keys = list(d)
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


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


def _load_checked(module: nn.Module, state: StateDict, file_name, source: str) -> Tuple[int, List[str]]:
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


def _freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics, METHOD.md "The teacher") and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


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

    ``_load_checked`` refuses a file that lacks any weight, so no uninitialised
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


def _teacher_from_checkpoint(
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
    head = _build(layout.build_head, head_state, source=source) if head_state else None
    teacher = _uninitialised_teacher(arch, head)
    file_name = _file_namer(layout)
    _check_head_input(teacher, file_name, source)
    state = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head_state.items()}}
    loaded, unexpected = _load_checked(teacher, state, file_name, source)
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
    return _freeze(teacher), report


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
    return _teacher_from_checkpoint(safe_load(path), str(path), arch, require_head, family)


# --------------------------------------------------------------------------- trained students


def extract_student_state(ckpt: dict) -> Tuple[str, StateDict, Dict[str, int]]:
    """The trained student of a distillation checkpoint: ``(arch, timm state dict, dropped groups)``.

    Only ``student.body.*`` is the student (names returned without that
    prefix, as timm has them); EMA copies, heads, adapter, teacher and queue are
    counted per group so a converter can say what it left out.
    """
    has_model = isinstance(ckpt.get("model"), Mapping)
    model = ckpt["model"] if has_model else {}
    prefix = "student.body."
    body = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if not body:
        seen = f"'model' keys {_first_keys(model)}" if has_model else f"top-level keys {_first_keys(ckpt)}"
        raise CheckpointError(
            f"no student in this checkpoint (no 'student.body.*' weights; found {seen}); pass a distillation "
            f"checkpoint written by retro-transfer (format {DISTILL_FORMAT!r}), not a teacher checkpoint"
        )
    arch = ckpt.get("student_arch")
    if not isinstance(arch, str):
        raise CheckpointError("the checkpoint has student weights but no 'student_arch' entry naming the timm model")
    dropped = Counter(k.split(".", 1)[0] for k in model if not k.startswith(prefix))
    return arch, body, dict(dropped)


class _PooledFeatures(nn.Module):
    """Images -> ``net.features(x)``: the same call for a Student and a Teacher."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class _AdapterFeatures(nn.Module):
    """Images -> pool(A(S(x))): Retro's released linear probe reads the adapter output (METHOD.md, Retro)."""

    def __init__(self, student: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.student(x)).mean(dim=(2, 3))


def _natural_key(key: str) -> tuple:
    """Sort ``6.weight`` after ``3.weight`` and before ``10.weight``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _adapter_width(adapter_state: StateDict, source: str) -> int:
    """C_t: output channels of the adapter's last convolution, so no width is assumed."""
    convs = sorted((k for k, v in adapter_state.items() if v.ndim == 4), key=_natural_key)
    if not convs:
        raise CheckpointError(f"{source}: the adapter weights hold no convolution, so its output width is unknown")
    return int(adapter_state[convs[-1]].shape[0])


def _build(factory, *args, source: str, **kwargs):
    """Turn a constructor's ValueError (unknown arch, adapter kind) into a CheckpointError naming the file."""
    try:
        return factory(*args, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _trained_student(ckpt: Mapping, source: str) -> Student:
    """The ``Student`` of a distillation checkpoint with its trained weights, every tensor accounted for."""
    arch, body, _ = extract_student_state(ckpt)
    student = _build(Student, arch, source=source)
    _load_checked(student.body, body, lambda k: "student.body." + k, source)
    return student


def _student_encoder(ckpt: Mapping, which: str, source: str) -> Tuple[nn.Module, dict]:
    """The trained student of a distillation checkpoint, read at its last feature map or after the adapter."""
    student = _trained_student(ckpt, source)
    arch, model = student.arch, ckpt["model"]
    adapter_state = {k[len("adapter.") :]: v for k, v in model.items() if k.startswith("adapter.")}
    if which == "adapter" and not adapter_state:
        raise CheckpointError(
            f"{source} is a {ckpt.get('method', 'non-Retro')} checkpoint: only Retro checkpoints have an adapter; "
            "use which='backbone'"
        )
    if which == "backbone":
        info = {"source": "student", "arch": arch, "features": "backbone", "dim": student.out_channels}
        return _PooledFeatures(student), info
    config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    adapter_cfg = config.get("adapter") if isinstance(config.get("adapter"), Mapping) else {}
    width = _adapter_width(adapter_state, source)
    kind = adapter_cfg.get("kind", "auto")
    adapter = _build(build_adapter, arch, student.out_channels, width, kind=kind, source=source)
    _load_checked(adapter, adapter_state, lambda k: "adapter." + k, source)
    info = {"source": "student", "arch": arch, "features": "adapter", "dim": width}
    return _AdapterFeatures(student, adapter), info


def load_encoder(path: PathLike, which: str = "backbone") -> Tuple[nn.Module, dict]:
    """A frozen image encoder (B, 3, H, W) -> pooled features (B, D) for linear probes and k-NN.

    A distillation checkpoint gives its student: ``which="backbone"`` pools the
    student's last feature map, ``which="adapter"`` (Retro only) pools the
    adapter's output, the two linear-probe variants METHOD.md asks to offer.
    Any teacher checkpoint gives the teacher backbone's pooled features. The
    module is in eval mode with gradients off; call ``requires_grad_(True)`` to
    fine-tune it. ``info`` says what the features are.
    """
    if which not in ENCODER_FEATURES:
        raise CheckpointError(f"unknown feature source {which!r}; choose one of {', '.join(ENCODER_FEATURES)}")
    ckpt = safe_load(path)
    source = str(path)
    if _is_distill(ckpt):
        encoder, info = _student_encoder(ckpt, which, source)
        return _freeze(encoder), info
    if which == "adapter":
        raise CheckpointError(
            f"{source} is not a retro-transfer distillation checkpoint: only Retro checkpoints have an adapter; "
            "use which='backbone'"
        )
    teacher, _ = _teacher_from_checkpoint(ckpt, source)
    info = {"source": "teacher", "arch": teacher.arch, "features": "backbone", "dim": teacher.out_channels}
    return _freeze(_PooledFeatures(teacher)), info


def load_student(path: PathLike) -> Tuple[Student, dict]:
    """The trained student of a distillation checkpoint, frozen: what the exporters write out.

    Unlike :func:`load_encoder` this refuses teacher checkpoints: exporting a
    file that holds no student would hand the user the wrong network.
    """
    ckpt = safe_load(path)
    source = str(path)
    if not _is_distill(ckpt):
        raise CheckpointError(
            f"no student in {source}: it is not a retro-transfer distillation checkpoint (no 'format': "
            f"'{DISTILL_FORMAT}' entry); pass the checkpoint_last.pth that tools/distill.py writes"
        )
    student = _trained_student(ckpt, source)
    info = {"source": "student", "arch": student.arch, "method": ckpt.get("method"), "step": ckpt.get("step"),
            "dim": student.out_channels}
    return _freeze(student), info
