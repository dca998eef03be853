"""Checkpoints: safe reading, atomic writing, and the one loader for teachers and trained encoders.

Users bring teacher files made elsewhere (METHOD.md, "The teacher"): the
official MoCo v2 release, a torchvision ResNet state dict, or a distillation
checkpoint written by this project. ``load_teacher`` tells them apart by their
key patterns, never by file names, and loads each with no conversion step.
Every user mistake surfaces as a ``CheckpointError`` whose message says what is
wrong and how to fix it.

Files are read with ``weights_only=True`` only: a checkpoint is data, and a
pickle that asks to run code is refused, never retried with the unsafe loader.
"""

import contextlib
import logging
import os
import pickle
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .models.adapters import build_adapter
from .models.students import Student
from .models.teachers import TEACHER_ARCHS, Teacher

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

DISTILL_FORMAT = "retro-transfer/distill"
"""Value of the ``"format"`` entry in checkpoints written by this project's distillation engine."""

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

_ACCEPTED_TEACHER_LAYOUTS = (
    "accepted layouts: (1) a MoCo v2 pretraining checkpoint, {'state_dict': {'module.encoder_q.conv1.weight', ..., "
    "'module.encoder_q.fc.0.weight', ...}} with or without 'module.'; (2) a torchvision ResNet state dict "
    "{'conv1.weight', 'layer1.0.conv1.weight', ...}, optionally under 'state_dict'; (3) a retro-transfer "
    f"distillation checkpoint {{'format': '{DISTILL_FORMAT}', 'model': {{'teacher.backbone.*', 'teacher.head.*'}}}}"
)


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
    power cut. A crash at any point leaves either the old file or the new one.
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
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e}; any previous file there is unchanged") from e
        raise
    _fsync_directory(path.parent)


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

    ``missing`` and ``unexpected`` use the names as they are (or would be) in
    the file, e.g. ``module.encoder_q.layer1.0.bn1.running_mean``. A teacher
    with missing weights is unusable, so ``load_teacher`` raises rather than
    return one, and ``missing`` is empty in every report it returns.
    """

    format: str
    arch: str
    has_head: bool
    loaded: int
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        head = "with its projection head" if self.has_head else "without a projection head"
        lines = [f"teacher {self.arch} ({self.format} layout), {head}: {self.loaded} tensors loaded"]
        if self.ignored:
            groups = ", ".join(f"{name} ({count})" for name, count in self.ignored.items())
            lines.append(f"ignored, not part of the teacher: {groups}")
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected, not loaded ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Layout:
    """Where the teacher's tensors sit in a file, and how their names map onto ``Teacher``'s.

    ``moco_style`` files name the backbone with bare torchvision keys and the
    head ``fc.0``/``fc.2``; ours already use ``backbone.*`` and ``head.*``.
    ``wrapper`` is the ``module.`` that (Distributed)DataParallel puts before
    every key, dropped from the group names a report shows.
    """

    format: str
    prefix: str
    moco_style: bool
    wrapper: str = ""

    def to_teacher(self, file_key: str) -> str:
        key = file_key[len(self.prefix) :]
        if not self.moco_style:
            return key
        return "head." + key[len("fc.") :] if key.startswith(("fc.0.", "fc.2.")) else "backbone." + key

    def to_file(self, teacher_key: str) -> str:
        if not self.moco_style:
            return self.prefix + teacher_key
        if teacher_key.startswith("head."):
            return self.prefix + "fc." + teacher_key[len("head.") :]
        return self.prefix + teacher_key[len("backbone.") :]


def _is_distill(ckpt: Mapping) -> bool:
    return ckpt.get("format") == DISTILL_FORMAT


def _first_keys(d: Mapping, n: int = 6) -> str:
    keys = list(d)
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _detect_layout(ckpt: Mapping, source: str) -> Tuple[_Layout, Mapping]:
    """Find the state dict that holds the teacher and recognise its layout from key patterns."""
    if _is_distill(ckpt):
        model = ckpt.get("model")
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{source} says it is a {DISTILL_FORMAT} checkpoint but has no 'model' state dict")
        return _Layout("retro_transfer_teacher", "teacher.", moco_style=False), model
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), Mapping) else ckpt
    base = "module." if state and all(str(k).startswith("module.") for k in state) else ""
    if any(str(k).startswith(base + "encoder_q.") for k in state):
        return _Layout("moco_v2", base + "encoder_q.", moco_style=True, wrapper=base), state
    if base + "conv1.weight" in state and any(str(k).startswith(base + "layer1.") for k in state):
        return _Layout("torchvision", base, moco_style=True, wrapper=base), state
    raise CheckpointError(
        f"{source} is not a teacher checkpoint this toolkit recognises; its first keys are {_first_keys(state)}. "
        + _ACCEPTED_TEACHER_LAYOUTS
    )


def _group_name(key: str, strip: str) -> str:
    """First component of a key once a common wrapper prefix is gone: the unit a report counts."""
    return (key[len(strip) :] if key.startswith(strip) else key).split(".", 1)[0]


def _split_teacher(layout: _Layout, state: Mapping, source: str) -> Tuple[StateDict, Dict[str, int]]:
    """Teacher tensors under ``Teacher``'s names, and counts of every other group in the file."""
    teacher: StateDict = {}
    ignored: Counter = Counter()
    for key, value in state.items():
        if not key.startswith(layout.prefix):
            ignored[_group_name(key, layout.wrapper)] += 1
            continue
        if layout.moco_style and key[len(layout.prefix) :] in ("fc.weight", "fc.bias"):
            # A single Linear is a classifier (or MoCo v1's linear projection), not H_T.
            ignored[layout.prefix[len(layout.wrapper) :] + "fc (classifier, not a projection head)"] += 1
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        teacher[layout.to_teacher(key)] = value
    if not teacher:
        raise CheckpointError(f"{source} is a {layout.format} checkpoint with no teacher weights under {layout.prefix!r}")
    return teacher, dict(ignored)


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


def _resolve_arch(teacher_state: StateDict, arch: Optional[str], source: str) -> str:
    """The checkpoint's architecture; a config that names another one is a user mistake to report."""
    found = infer_resnet_arch(teacher_state, "backbone.")
    if arch is not None and arch not in TEACHER_ARCHS:
        raise CheckpointError(f"unknown teacher architecture {arch!r}; choose one of {', '.join(TEACHER_ARCHS)}")
    if found is not None and arch is not None and found != arch:
        raise CheckpointError(
            f"{source}: checkpoint holds a {found} but the config asks for {arch}; "
            f"set the teacher arch to {found}, or leave it unset to infer it from the checkpoint"
        )
    if found is None and arch is None:
        kind, blocks = _resnet_signature([k[len("backbone.") :] for k in teacher_state if k.startswith("backbone.")])
        known = ", ".join(f"{name} {b}" for (_, b), name in RESNET_LAYOUTS.items())
        raise CheckpointError(
            f"{source}: cannot tell which ResNet this is: {kind} blocks per stage {blocks} match no torchvision "
            f"ResNet ({known}); the teacher must be a torchvision ResNet. If it is one with blocks missing, set the "
            "teacher arch explicitly to get the list of missing weights"
        )
    return arch or found


def _head_dims(teacher_state: StateDict) -> Tuple[Optional[int], int]:
    """Hidden and output widths of H_T, from fc.0 (hidden x C_t) and fc.2 (out x hidden)."""
    first, last = teacher_state.get("head.0.weight"), teacher_state.get("head.2.weight")
    hidden = int(first.shape[0]) if first is not None and first.ndim == 2 else None
    out = int(last.shape[0]) if last is not None and last.ndim == 2 else 128
    return hidden, out


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


def _require_head_message(source: str, layout: _Layout, arch: str) -> str:
    return (
        f"{source} ({layout.format} layout, {arch}) has no projection head: no fc.0/fc.2 weights as in a MoCo v2 "
        "checkpoint. Retro reuses the teacher's projection head H_T, and all distillation methods here "
        "(SEED, DisCo, Retro) use the teacher's projection head, so a checkpoint without one (e.g. a supervised "
        "torchvision classifier) cannot be the teacher. Pass a MoCo v2 pretraining checkpoint such as "
        "moco_v2_800ep_pretrain.pth.tar."
    )


def _teacher_from_checkpoint(
    ckpt: Mapping, source: str, arch: Optional[str] = None, require_head: bool = False
) -> Tuple[Teacher, LoadReport]:
    """``load_teacher`` on an already-read checkpoint dict."""
    layout, state = _detect_layout(ckpt, source)
    teacher_state, ignored = _split_teacher(layout, state, source)
    arch = _resolve_arch(teacher_state, arch, source)
    has_head = any(k.startswith("head.") for k in teacher_state)
    if require_head and not has_head:
        raise CheckpointError(_require_head_message(source, layout, arch))
    hidden, dim = _head_dims(teacher_state)
    teacher = Teacher(arch, with_head=has_head, head_hidden=hidden, dim=dim)
    loaded, unexpected = _load_checked(teacher, teacher_state, layout.to_file, source)
    report = LoadReport(layout.format, arch, has_head, loaded, unexpected=unexpected, ignored=ignored)
    return _freeze(teacher), report


def load_teacher(path: PathLike, arch: Optional[str] = None, require_head: bool = False) -> Tuple[Teacher, LoadReport]:
    """Load a frozen teacher from any accepted layout, with a report of what was (not) loaded.

    The layout (MoCo v2 release, torchvision, retro-transfer distillation) and
    the architecture are read from the keys and shapes; ``arch``, when given,
    must agree. ``require_head`` is for distillation, which needs H_T.
    """
    return _teacher_from_checkpoint(safe_load(path), str(path), arch, require_head)


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


def _student_encoder(ckpt: Mapping, which: str, source: str) -> Tuple[nn.Module, dict]:
    """The trained student of a distillation checkpoint, read at its last feature map or after the adapter."""
    arch, body, _ = extract_student_state(ckpt)
    model = ckpt["model"]
    adapter_state = {k[len("adapter.") :]: v for k, v in model.items() if k.startswith("adapter.")}
    if which == "adapter" and not adapter_state:
        raise CheckpointError(
            f"{source} is a {ckpt.get('method', 'non-Retro')} checkpoint: only Retro checkpoints have an adapter; "
            "use which='backbone'"
        )
    student = _build(Student, arch, source=source)
    _load_checked(student.body, body, lambda k: "student.body." + k, source)
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
