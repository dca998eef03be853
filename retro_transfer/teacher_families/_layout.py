"""What a family module tells the loader about one file: where the teacher's backbone and head are.

A family recognises a file by its keys and answers with a ``TeacherLayout``:
the state dict that holds the teacher, the ``Part`` of it that is the
backbone (its names turned into torchvision's), the ``Part`` that is the
projection head, and how to rebuild that head from its tensors. Everything
else in that state dict is reported as ignored, by name, with the family's
reason where it gives one. The loader (``retro_transfer.checkpoints``) does
the rest the same way for every family.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

HeadBuilder = Callable[[Dict[str, torch.Tensor]], nn.Module]


def _everything(name: str) -> bool:
    return True


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class Part:
    """The keys under ``prefix`` that ``accept`` takes (on the name after the prefix), and their renaming.

    ``rename`` turns a file name (after the prefix) into the teacher module's
    name; ``unrename`` goes back, so that a weight missing from the file is
    named as the file would name it. ``note`` completes the report's
    description, e.g. "without fc (the supervised classifier)".
    """

    prefix: str
    accept: Callable[[str], bool] = _everything
    rename: Callable[[str], str] = _same
    unrename: Callable[[str], str] = _same
    note: str = ""

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix) and self.accept(key[len(self.prefix) :])

    def teacher_name(self, key: str) -> str:
        return self.rename(key[len(self.prefix) :])

    def file_name(self, name: str) -> str:
        return self.prefix + self.unrename(name)

    def describe(self) -> str:
        return f"{self.prefix}*" + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class TeacherLayout:
    """One file's teacher: ``state`` (file names -> tensors), its backbone and head ``Part``s, and the head builder.

    ``head_layers`` are the indices of the layers with weights that the
    family's head always has (MoCo v2: 0 and 2, its two Linears); the loader
    refuses a head without one of them rather than build a shorter head from
    what is left. Families whose head depth varies leave it empty.
    ``entries`` are the file's top-level entries that ``state`` comes from
    (none when the file is the state dict itself, else e.g. ``("state_dict",)``
    or DINO's ``("teacher",)``), ``wrapper`` the DDP ``module.`` left out of
    ignored group names, and ``reasons`` why an ignored group (named as the
    report names it, e.g. "prototypes") is not part of the teacher.
    """

    family: str
    state: Mapping[str, object]
    backbone: Part
    head: Optional[Part] = None
    build_head: Optional[HeadBuilder] = None
    head_layers: Tuple[int, ...] = ()
    entries: Tuple[str, ...] = ()
    wrapper: str = ""
    reasons: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers for family modules


def state_dict_of(ckpt: Mapping) -> Tuple[Mapping, Tuple[str, ...]]:
    """A checkpoint's state dict, kept under ``state_dict`` (training scripts) or the file itself (releases), and its entry."""
    if isinstance(ckpt.get("state_dict"), Mapping):
        return ckpt["state_dict"], ("state_dict",)
    return ckpt, ()


def ddp_wrapper(state: Mapping) -> str:
    """``module.`` when (Distributed)DataParallel prefixed every key, else ``""``."""
    return "module." if state and all(str(k).startswith("module.") for k in state) else ""


def has_prefix(state: Mapping, prefix: str) -> bool:
    return any(str(k).startswith(prefix) for k in state)


def not_under(*names: str) -> Callable[[str], bool]:
    """An ``accept`` that leaves out the sub-modules ``names`` (e.g. ``"fc"``, a classifier or a head)."""
    prefixes = tuple(f"{n}." for n in names)
    return lambda rest: not rest.startswith(prefixes)


def numbered(rest: str) -> bool:
    """An ``accept`` for the layers of an ``nn.Sequential`` head (``0.weight``), not a lone Linear (``weight``)."""
    return rest.split(".", 1)[0].isdigit()
