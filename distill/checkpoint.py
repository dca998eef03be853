"""The distillation checkpoint: its format, written and read in one place.

``distill.engine`` writes one every ``checkpoint.every`` steps; resume, the
linear / k-NN / semi-supervised evaluations, the exporters and the
converters read it back. Its layout, all defined here:

- ``format``: :data:`distill.common.DISTILL_FORMAT`; ``version``: :data:`CHECKPOINT_VERSION`;
- ``method``, ``student_arch``, ``teacher_arch`` (None without a teacher), ``config`` (the run's config as a dict);
- ``step``; ``model``: the method's state dict, where the trained student is
  ``student.body.*`` (a timm model's own names) and Retro's adapter ``adapter.*``
  (its kind in ``config["adapter"]["kind"]``); ``optimizer``, ``scheduler``,
  ``scaler`` and ``rng``: what an exact resume needs.

A change to this layout that old readers would misread raises the version.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Tuple

import torch
import torch.nn as nn

from retro_transfer.models.adapters import build_adapter
from retro_transfer.models.students import Student
from retro_transfer.safe_io import CheckpointError, PathLike, safe_load
from retro_transfer.teacher_loading import StateDict, build_checked, freeze, load_checked, teacher_from_checkpoint

from .common import DISTILL_FORMAT

if TYPE_CHECKING:
    from .config import Config

#: The layout version of the checkpoints written here; readers refuse another one.
CHECKPOINT_VERSION = 1

#: What :func:`load_encoder` can read features at.
ENCODER_FEATURES = ("backbone", "adapter")


# --------------------------------------------------------------------------- writing


def rng_state(device: torch.device) -> Dict:
    """The random generators' states, so a resumed run draws what the uninterrupted one would have."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: Mapping, device: torch.device) -> None:
    """Set the generators to the states :func:`rng_state` took (CUDA's only where this run has the GPU)."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def build_checkpoint(cfg: Config, method: nn.Module, step: int, optimizer, scheduler, scaler, rng: Dict) -> Dict:
    """The checkpoint dict of a run of ``cfg`` at ``step``: the layout the readers below parse."""
    return {
        "format": DISTILL_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": cfg.method,
        "student_arch": cfg.student.arch,
        "teacher_arch": cfg.teacher.arch if method.teacher is not None else None,
        "config": cfg.to_dict(),
        "step": step,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
    }


# --------------------------------------------------------------------------- checks


def is_distill_checkpoint(ckpt: Mapping) -> bool:
    """Whether a loaded file says it is a distillation checkpoint (its ``format`` entry)."""
    return ckpt.get("format") == DISTILL_FORMAT


def check_version(ckpt: Mapping, source: str) -> None:
    """Refuse a distillation checkpoint of another layout version, which this code would misread.

    A file without a ``version`` entry is read as the current version.
    """
    version = ckpt.get("version", CHECKPOINT_VERSION)
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source} is a distillation checkpoint of layout version {version!r}, but this retro-transfer reads "
            f"version {CHECKPOINT_VERSION}; use the retro-transfer version that wrote it"
        )


def check_resumable(ckpt: Mapping, path: PathLike, method: str, student_arch: str) -> None:
    """Refuse to resume a run of ``method`` on ``student_arch`` from ``ckpt`` unless it is such a run's checkpoint."""
    if not is_distill_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a distillation checkpoint of this project; cannot resume from it")
    check_version(ckpt, str(path))
    if ckpt["method"] != method or ckpt["student_arch"] != student_arch:
        raise CheckpointError(
            f"{path} is a {ckpt['method']} run of {ckpt['student_arch']}, but this config trains "
            f"{method} on {student_arch}; use another output_dir or resume=null"
        )


def check_model_keys(method: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, in one line, a checkpoint whose tensors are not this config's model (``load_state_dict`` would raise a page).

    The one known case: Retro's averaged adapter (``adapter.ema``). A run
    written with ``adapter.ema=false``, or before that key existed, holds no
    ``adapter_ema.*`` tensors; it resumes exactly with ``adapter.ema=false``.
    """
    expected, held = set(method.state_dict()), set(state)
    missing, unexpected = sorted(expected - held), sorted(held - expected)
    if not missing and not unexpected:
        return
    if {key.split(".", 1)[0] for key in missing + unexpected} == {"adapter_ema"}:
        written = "false (or before that key existed): its mean student averages the backbone only" if missing else (
            "true: its mean student averages the adapter too"
        )
        raise CheckpointError(
            f"{path} was written with adapter.ema={written}; resume it with adapter.ema={'false' if missing else 'true'}, "
            "or start a new run in another output_dir"
        )
    shown = ", ".join([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]])
    raise CheckpointError(
        f"{path} does not hold this config's model ({len(missing)} tensors missing, {len(unexpected)} unexpected: {shown}); "
        "resume it with the config it was written with, or start a new run in another output_dir"
    )


# --------------------------------------------------------------------------- reading the trained student


def _first_keys(d: Mapping, n: int = 6) -> str:
    """The first ``n`` keys of ``d``, quoted, for an error message about what a file holds instead."""
    keys = list(d)
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def extract_student_state(ckpt: dict, source: str = "this checkpoint") -> Tuple[str, StateDict, Dict[str, int]]:
    """The trained student of a distillation checkpoint: ``(arch, timm state dict, dropped groups)``.

    Only ``student.body.*`` is the student (names returned without that
    prefix, as timm has them); EMA copies, heads, adapter, teacher and queue are
    counted per group so a converter can say what it left out. ``source``
    names the file in the refusal of another layout version.
    """
    check_version(ckpt, source)
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


def _trained_student(ckpt: Mapping, source: str) -> Student:
    """The ``Student`` of a distillation checkpoint with its trained weights, every tensor accounted for."""
    arch, body, _ = extract_student_state(ckpt, source)
    student = build_checked(Student, arch, source=source)
    load_checked(student.body, body, lambda k: "student.body." + k, source)
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
    adapter = build_checked(build_adapter, arch, student.out_channels, width, kind=kind, source=source)
    load_checked(adapter, adapter_state, lambda k: "adapter." + k, source)
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
    if is_distill_checkpoint(ckpt):
        encoder, info = _student_encoder(ckpt, which, source)
        return freeze(encoder), info
    if which == "adapter":
        raise CheckpointError(
            f"{source} is not a retro-transfer distillation checkpoint: only Retro checkpoints have an adapter; "
            "use which='backbone'"
        )
    teacher, _ = teacher_from_checkpoint(ckpt, source)
    info = {"source": "teacher", "arch": teacher.arch, "features": "backbone", "dim": teacher.out_channels}
    return freeze(_PooledFeatures(teacher)), info


def load_student(path: PathLike) -> Tuple[Student, dict]:
    """The trained student of a distillation checkpoint, frozen: what the exporters write out.

    Unlike :func:`load_encoder` this refuses teacher checkpoints: exporting a
    file that holds no student would hand the user the wrong network.
    """
    ckpt = safe_load(path)
    source = str(path)
    if not is_distill_checkpoint(ckpt):
        raise CheckpointError(
            f"no student in {source}: it is not a retro-transfer distillation checkpoint (no 'format': "
            f"'{DISTILL_FORMAT}' entry); pass the checkpoint_last.pth that tools/distill.py writes"
        )
    student = _trained_student(ckpt, source)
    info = {"source": "student", "arch": student.arch, "method": ckpt.get("method"), "step": ckpt.get("step"),
            "dim": student.out_channels}
    return freeze(student), info
