"""The registry of teacher families: which released file layouts the teacher loader knows.

Each module of this package whose name does not start with ``_`` is one
family (MoCo v2, MoCo v3, SwAV, DINO, SimCLR, BYOL) and defines:

- ``NAME``: the family's name, as ``teacher.family`` takes it;
- ``SIGNATURE``: its key layout and released file names, in one line, for error messages;
- ``recognise(ckpt) -> TeacherLayout | None``: the layout if ``ckpt`` (the
  loaded file) is in this family's layout, else None. It may raise
  ``ValueError`` for a file that is this family's but cannot be a teacher.

Adding a family is adding such a module, whose ``NAME`` is the module's
name: ``distill.common.TEACHER_FAMILIES`` lists the modules without importing
them (so a config is checked without torch), and the loader has no
per-family code. ``recognise`` below picks the
family: the one asked for, or the only one whose layout matches.
"""

import importlib
from types import ModuleType
from typing import Dict, Mapping

from distill.common import TEACHER_FAMILIES

from ._builtin import DISTILL_FORMAT, distillation_checkpoint, torchvision_state
from ._layout import Part, TeacherLayout

__all__ = ["AUTO", "DISTILL_FORMAT", "FAMILIES", "Part", "TeacherLayout", "recognise", "summarise_keys"]

AUTO = "auto"


def _discover() -> Dict[str, ModuleType]:
    modules = {name: importlib.import_module(f"{__name__}.{name}") for name in TEACHER_FAMILIES}
    for name, module in modules.items():
        if module.NAME != name:
            raise ImportError(f"{module.__name__} names its family {module.NAME!r}: a family's NAME is its module's name")
    return modules


FAMILIES: Dict[str, ModuleType] = _discover()

_OTHER_LAYOUTS = (
    "a torchvision ResNet state dict {'conv1.weight', 'layer1.0.conv1.weight', ...} (backbone only, no head); "
    f"a retro-transfer distillation checkpoint {{'format': '{DISTILL_FORMAT}', 'model': {{'teacher.backbone.*', 'teacher.head.*'}}}}"
)


def recognise(ckpt: Mapping, family: str = AUTO) -> TeacherLayout:
    """The layout of ``ckpt``: ``family``'s, or with ``auto`` the only family (or other layout) that matches.

    Raises ``ValueError`` with a one-line message naming what was seen and
    what is known when nothing, or more than one family, matches.
    """
    if family != AUTO:
        if family not in FAMILIES:
            raise ValueError(f"unknown teacher family {family!r}; choose one of {AUTO}, {', '.join(FAMILIES)}")
        layout = FAMILIES[family].recognise(ckpt)
        if layout is None:
            raise ValueError(
                f"teacher.family={family} was asked for, but the file is not in that layout ({FAMILIES[family].SIGNATURE}); "
                f"it holds {summarise_keys(ckpt)}. Set teacher.family={AUTO} to detect the family from the keys"
            )
        return layout
    own = distillation_checkpoint(ckpt)
    if own is not None:
        return own
    found = {name: layout for name, layout in ((n, m.recognise(ckpt)) for n, m in FAMILIES.items()) if layout}
    if len(found) > 1:
        raise ValueError(
            f"the file matches the layouts of several teacher families ({', '.join(found)}); "
            f"set teacher.family to the one that trained it, e.g. teacher.family={next(iter(found))}"
        )
    if found:
        return next(iter(found.values()))
    plain = torchvision_state(ckpt)
    if plain is not None:
        return plain
    known = "; ".join(module.SIGNATURE for module in FAMILIES.values())
    raise ValueError(
        f"not a teacher checkpoint this toolkit recognises: it holds {summarise_keys(ckpt)}; "
        f"accepted layouts: {known}; {_OTHER_LAYOUTS}"
    )


def summarise_keys(ckpt: Mapping, shown: int = 6) -> str:
    """The file's top-level entries and the first keys of each dict among them, in one line."""
    parts = [f"top-level entries {_first(list(ckpt), shown)}"]
    for name, value in ckpt.items():
        if isinstance(value, Mapping) and value:
            parts.append(f"{name!r} with keys {_first(list(value), shown)}")
    return "; ".join(parts)


def _first(keys: list, shown: int) -> str:
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(repr(str(k)) for k in keys[:shown]) + more
