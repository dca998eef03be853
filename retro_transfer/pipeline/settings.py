"""A run's settings: a preset, re-seeded with ``--seed N`` and changed with ``--set KEY=VALUE``.

The settings a folder was made with are written to ``OUT/settings.json``
before any stage runs. A later run into the same folder with other settings
is refused (one line naming what differs), since the stages recorded there
mix data, initialisations and numbers of the first settings; ``--force all``
redoes every stage under the new settings instead. (A folder from before
this file existed is adopted: its stages are redone where their recorded
commands differ, as always.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .runner import read_json, save_json

SETTINGS_FILE = "settings.json"
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


class SettingsError(ValueError):
    """Settings that cannot be used, with a one-line reason and the fix."""


def _parse(key: str, text: str, current):
    """``text`` as the type of the preset's ``current`` value for ``key``."""
    kind = type(current)
    try:
        if kind is bool:
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise SettingsError(f"--set {key}={text}: {key} takes {kind.__name__} values (the preset has {current!r})") from None
    return text


def resolve_settings(preset: Mapping, seed: Optional[int] = None, sets: Sequence[str] = ()) -> Dict:
    """The preset's fields with ``seed`` and each ``KEY=VALUE`` of ``sets`` applied (values typed as the preset's)."""
    settings = dict(preset)
    if seed is not None:
        settings["seed"] = seed
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--set {item}: write KEY=VALUE, e.g. --set distill_steps=60")
        if key not in settings:
            raise SettingsError(f"--set {item}: no preset field {key!r}; fields: {', '.join(sorted(settings))}")
        settings[key] = _parse(key, text, settings[key])
    return settings


def describe(preset_name: str, settings: Mapping, preset: Mapping) -> str:
    """``preset `quick`, seed 1, with distill_steps=60``: the fields that differ from the named preset."""
    changed = [f"{k}={settings[k]}" for k in sorted(settings) if k != "seed" and settings[k] != preset.get(k)]
    return f"preset `{preset_name}`, seed {settings['seed']}" + (f", with {', '.join(changed)}" if changed else "")


def _differences(old: Mapping, new: Mapping) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys if old.get(k) != new.get(k)]


def claim_folder(out: Path, preset_name: str, settings: Mapping, force_all: bool = False) -> None:
    """Refuse ``out`` if an earlier run made it with other settings (unless everything is redone); record ours."""
    path = Path(out) / SETTINGS_FILE
    record = {"preset": preset_name, "settings": dict(settings)}
    if path.exists() and not force_all:
        old = read_json(path)
        differences = _differences({"preset": old.get("preset"), **old.get("settings", {})}, {"preset": preset_name, **settings})
        if differences:
            raise SettingsError(
                f"{out} was made with other settings ({'; '.join(differences)}); give another --out, "
                "or add --force all to redo every stage there with these settings"
            )
    save_json(record, path)
