"""Read an OpenMMLab (MMEngine) config without letting a data file run code.

MMEngine's ``Config.fromfile`` reads ``.yaml``/``.yml`` configs with
``yaml.Loader``, which runs a tag such as ``!!python/object/apply:os.system``
while reading, and it does so for every ``_base_`` a config names, before any
check. A YAML or JSON config is data that users download and share, so here
every one in the inheritance chain is first read as data (YAML with safe
loading, JSON with ``json``), and a tag is refused in one line naming the file and the
line; then MMEngine reads the chain with its YAML handler replaced, through
its own handler registry, by a safe one.

A ``.py`` config is different: it is Python code and MMEngine runs it, as
MMSegmentation and MMDetection always do. Use only Python configs you trust.
Used by tools/train_seg.py and tools/test_seg.py, and meant for every
OpenMMLab tool of this project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Set

import yaml
from mmengine.config import Config
from mmengine.fileio.handlers import YamlHandler, register_handler

DATA_SUFFIXES = (".yaml", ".yml", ".json")
CODE_NOTE = "a .py config is Python code and is run as such: use only Python configs you trust"
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigFileError(ValueError):
    """A config file that cannot be read as data; the message names the file and says what to change."""


@register_handler(["yaml", "yml"])
class SafeYamlHandler(YamlHandler):
    """MMEngine's YAML handler with safe loading: plain values only, never Python objects.

    Registered in MMEngine's handler registry when this module is imported, so
    ``mmengine.load`` (and with it ``Config.fromfile``) reads YAML safely in
    this process. Writing is unchanged.
    """

    def load_from_fileobj(self, file, **kwargs):
        kwargs["Loader"] = _SafeLoader
        return yaml.load(file, **kwargs)


def read_config(path: os.PathLike) -> Config:
    """``Config.fromfile(path)``, with every YAML/JSON file of its ``_base_`` chain read as data only.

    A tag, a file that is not valid YAML/JSON, a config that is not a mapping,
    a missing ``_base_`` or a ``_base_`` cycle is a one-line ConfigFileError.
    ``.py`` files in the chain are run by MMEngine (see the module docstring).
    """
    path = Path(path)
    check_data_chain(path)
    try:
        return Config.fromfile(str(path))
    except yaml.YAMLError as e:  # the check above read the same files; a change in between lands here
        raise ConfigFileError(f"config {path} cannot be read as data: {getattr(e, 'problem', None) or e}") from None


def check_data_chain(path: Path) -> None:
    """Read ``path`` and the YAML/JSON ``_base_`` files it names, recursively, with safe loading."""
    _check(Path(path), [])


def _check(path: Path, chain: List[Path]) -> None:
    if path.suffix not in DATA_SUFFIXES:
        return  # a .py config: MMEngine runs it, and reads the bases it names itself
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in chain[chain.index(here):] + [here])
        raise ConfigFileError(f"config {path}: _base_ files name each other in a cycle ({cycle}); remove one _base_")
    data = _safe_read(path)
    for base in _bases(path, data):
        _check(base, chain + [here])


def _safe_read(path: Path) -> dict:
    """The mapping a YAML/JSON config holds; JSON cannot name Python objects, and YAML tags that do are refused."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.suffix == ".json" else yaml.load(f, Loader=_SafeLoader)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{path}, line {e.lineno} is not valid JSON: {e.msg}") from None
    except OSError as e:
        raise ConfigFileError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config {path} is not a UTF-8 text file") from None
    except yaml.constructor.ConstructorError as e:
        line = f", line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigFileError(
            f"{path}{line}: {e.problem}; YAML/JSON configs are read with safe loading, and a Python tag "
            "(which would run code) is refused, not executed. Use plain values"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigFileError(f"{path}{line} is not valid YAML/JSON: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config {path} holds a {type(data).__name__}, not a mapping of config entries")
    return data


def _bases(path: Path, data: dict) -> List[Path]:
    """The local files ``_base_`` names, relative to ``path``'s folder as MMEngine resolves them.

    A ``package::file`` base lives in an installed package; MMEngine reads it
    with the safe handler above.
    """
    bases = data.get("_base_", [])
    bases = bases if isinstance(bases, list) else [bases]
    found: List[Path] = []
    seen: Set[str] = set()
    for base in bases:
        if not isinstance(base, str):
            raise ConfigFileError(f"config {path}: _base_ entries are file names, got {base!r}")
        if "::" in base or base in seen:
            continue
        seen.add(base)
        target = Path(os.path.expanduser(base))
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            raise ConfigFileError(f"config {path}: _base_ {base} not found (looked for {target})")
        found.append(target)
    return found
