#!/usr/bin/env python3
"""Install Detectron2 into the running Python environment.

Upstream Detectron2 is not published on PyPI and GitHub may be unreachable, so
we install ``sal-detectron2==0.7.2`` instead: a repackaging of upstream
Detectron2 (Apache-2.0).  Its only wheel was built for CPython 3.10 and does
not work as shipped on newer interpreters, so this script rewrites it first:

* ``detectron2/_C.cpython-310-*.so`` is dropped.  It was compiled against an
  old torch and cannot load with ours.  Detectron2 imports ``_C`` lazily, only
  for deformable convolution, rotated boxes and the fast COCO evaluator (which
  falls back to pycocotools); Faster/Mask R-CNN run on torchvision ops alone.
* The top-level ``tools`` package is dropped.  It holds Detectron2's example
  scripts, packaged by mistake; installed into site-packages it would shadow
  this project's own ``tools`` package.
* ``detectron2/model_zoo/model_zoo.py`` locates its bundled configs through
  ``pkg_resources``, which is deprecated and removed from recent setuptools;
  the lookup is switched to ``importlib.resources``.
* The ``numpy<2`` pin in METADATA is relaxed: it would make pip downgrade
  numpy under torch, while the pure-Python code we keep runs on numpy 2.
* ``fvcore`` and ``iopath``, which upstream requires and Detectron2 imports
  throughout, are missing from METADATA; they are re-added with upstream's
  version bounds.
* The wheel is re-tagged ``py3-none-any`` (it is pure Python now) and its
  RECORD recomputed, since pip checks both.

Both the original and the patched wheel are cached (default
``$XDG_CACHE_HOME/retro-transfer/wheels``), so reruns neither download nor
rebuild.  A marker file inside the patched package lets a rerun recognise an
existing install through package metadata alone, without importing torch.

Usage: python tools/install_detectron2.py [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DIST_NAME = "sal-detectron2"
VERSION = "0.7.2"
ORIGINAL_WHEEL = f"sal_detectron2-{VERSION}-cp310-none-any.whl"
ORIGINAL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
PATCHED_WHEEL = f"sal_detectron2-{VERSION}-py3-none-any.whl"
DIST_INFO = f"sal_detectron2-{VERSION}.dist-info"

# Bump whenever the patches change: installs and cached wheels carrying an
# older revision are then rebuilt and reinstalled instead of reused.
PATCH_REVISION = "1"
MARKER = "detectron2/_retro_transfer_patched"
MARKER_TEXT = f"retro-transfer patch revision {PATCH_REVISION}\n"

COMPILED_EXTENSION = re.compile(r"detectron2/_C\.cpython-310-[^/]*\.so")
STRAY_PACKAGE = "tools/"

MODEL_ZOO = "detectron2/model_zoo/model_zoo.py"
MODEL_ZOO_EDITS = [
    ("import pkg_resources\n", "import importlib.resources\n"),
    (
        "    cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )\n",
        "    cfg_file = str(\n"
        '        importlib.resources.files("detectron2.model_zoo") / "configs" / config_path\n'
        "    )\n",
    ),
]
METADATA_EDITS = [
    (
        "Requires-Dist: numpy<2\n",
        "Requires-Dist: numpy\n"
        "Requires-Dist: fvcore<0.1.6,>=0.1.5\n"
        "Requires-Dist: iopath<0.1.10,>=0.1.7\n",
    ),
]
WHEEL_EDITS = [
    ("Root-Is-Purelib: false\n", "Root-Is-Purelib: true\n"),
    ("Tag: cp310-cp310-linux_x86_64\n", "Tag: py3-none-any\n"),
]
TOP_LEVEL_EDITS = [("detectron2\ntools\n", "detectron2\n")]

# The wheel is tagged for CPython 3.10 only; these let pip fetch it from any
# interpreter (pip demands --only-binary alongside --python-version).
AS_PYTHON_310 = ["--only-binary=:all:", "--python-version", "3.10"]

# Only a fetch needs these; a cap keeps an offline run from hanging in
# pip's default 5 retries x 15 s timeout per attempt.
PIP_NETWORK_OPTIONS = ["--retries", "2", "--timeout", "20"]


class InstallError(Exception):
    """A failure the user can act on: says what broke and how to fix it."""


def say(message: str) -> None:
    print(message, flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retro-transfer" / "wheels"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- what is installed ----------------------------------------------------


def installed_distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_patched_install(dist: importlib.metadata.Distribution) -> bool:
    """True if ``dist`` came from this script's current patched wheel."""
    if dist.version != VERSION:
        return False
    marker = Path(dist.locate_file(MARKER))
    try:
        return marker.read_text() == MARKER_TEXT
    except OSError:
        return False


# --- running pip ----------------------------------------------------------


def run_pip(args: list[str], failure: str) -> None:
    """Run pip in this interpreter; on failure show its output and raise."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return
    output = (result.stdout + result.stderr).strip()
    if "No module named pip" in output:
        raise InstallError(
            f"pip is not available in {sys.executable}; "
            "run `python -m ensurepip --upgrade` and retry"
        )
    tail = "\n".join(output.splitlines()[-20:])
    print(f"--- pip {args[0]} output (last lines) ---\n{tail}\n---", file=sys.stderr)
    raise InstallError(failure)


# --- the original wheel ---------------------------------------------------


def fetch_original(cache_dir: Path) -> Path:
    """Return the verified original wheel, downloading it only if missing."""
    wheel = cache_dir / ORIGINAL_WHEEL
    if wheel.exists():
        say(f"using cached {wheel}")
    else:
        download_original(cache_dir)
    verify_original(wheel)
    return wheel


def download_original(cache_dir: Path) -> None:
    say(f"downloading {DIST_NAME}=={VERSION} from PyPI into {cache_dir}")
    # Download to a scratch dir so an interrupted or odd download never sits
    # in the cache under the name we later trust.
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        run_pip(
            ["download", f"{DIST_NAME}=={VERSION}", "--no-deps", "--dest", scratch]
            + AS_PYTHON_310
            + PIP_NETWORK_OPTIONS,
            failure=(
                f"could not download {DIST_NAME}=={VERSION}; check network access "
                f"to PyPI (proxy / PIP_INDEX_URL), or copy {ORIGINAL_WHEEL} "
                f"into {cache_dir} by hand"
            ),
        )
        fetched = Path(scratch) / ORIGINAL_WHEEL
        if not fetched.exists():
            found = ", ".join(sorted(os.listdir(scratch))) or "nothing"
            raise InstallError(
                f"pip downloaded {found} instead of {ORIGINAL_WHEEL}; the "
                f"package index may serve a different build; fetch "
                f"{ORIGINAL_WHEEL} from pypi.org into {cache_dir} by hand"
            )
        os.replace(fetched, cache_dir / ORIGINAL_WHEEL)


def verify_original(wheel: Path) -> None:
    actual = sha256_of(wheel)
    if actual != ORIGINAL_SHA256:
        wheel.unlink()
        raise InstallError(
            f"sha256 mismatch for {wheel} (got {actual}, expected "
            f"{ORIGINAL_SHA256}); the file was deleted, rerun to download it again"
        )
    say(f"verified sha256 of {wheel.name}")


# --- building the patched wheel -------------------------------------------


def patched_wheel(original: Path, cache_dir: Path, force: bool) -> Path:
    """Return the patched wheel, rebuilding it unless a valid one is cached."""
    target = cache_dir / PATCHED_WHEEL
    if not force and cached_patched_is_valid(target):
        say(f"using cached {target}")
        return target
    say(f"patching {original.name} -> {target.name}")
    build_patched(original, target)
    hash_file(target).write_text(sha256_of(target) + "\n")
    return target


def hash_file(wheel: Path) -> Path:
    return wheel.with_name(wheel.name + ".sha256")


def cached_patched_is_valid(wheel: Path) -> bool:
    """A cached build is reused only if intact and from the current patches."""
    try:
        recorded = hash_file(wheel).read_text().strip()
        if recorded != sha256_of(wheel):
            return False
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(MARKER).decode() == MARKER_TEXT
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return False


def build_patched(original: Path, target: Path) -> None:
    with zipfile.ZipFile(original) as source:
        members = patched_members(source)
    # Write beside the target and rename, so a crash never leaves a
    # half-written wheel that a later run could pick up.
    scratch = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(scratch, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in members:
            out.writestr(info, data)
        record = fresh_info(f"{DIST_INFO}/RECORD", members[0][0])
        out.writestr(record, record_for(members))
    os.replace(scratch, target)


def patched_members(source: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, bytes]]:
    """Every member of the patched wheel except RECORD, in archive order."""
    check_expected_files(source)
    edits = {
        MODEL_ZOO: MODEL_ZOO_EDITS,
        f"{DIST_INFO}/METADATA": METADATA_EDITS,
        f"{DIST_INFO}/WHEEL": WHEEL_EDITS,
        f"{DIST_INFO}/top_level.txt": TOP_LEVEL_EDITS,
    }
    members = []
    for info in source.infolist():
        name = info.filename
        if is_dropped(name):
            continue
        data = source.read(name)
        if name in edits:
            data = apply_edits(name, data, edits[name])
        members.append((fresh_info(name, info), data))
    template = source.getinfo(MODEL_ZOO)
    members.append((fresh_info(MARKER, template), MARKER_TEXT.encode()))
    return members


def check_expected_files(source: zipfile.ZipFile) -> None:
    """Refuse to patch a wheel that is not the one these patches were made for."""
    names = source.namelist()
    missing = [
        what
        for what, present in [
            ("detectron2/_C.cpython-310-*.so", any(COMPILED_EXTENSION.fullmatch(n) for n in names)),
            (f"{STRAY_PACKAGE}__init__.py", f"{STRAY_PACKAGE}__init__.py" in names),
            (MODEL_ZOO, MODEL_ZOO in names),
            (f"{DIST_INFO}/METADATA", f"{DIST_INFO}/METADATA" in names),
            (f"{DIST_INFO}/WHEEL", f"{DIST_INFO}/WHEEL" in names),
        ]
        if not present
    ]
    if missing:
        raise InstallError(
            f"the {DIST_NAME} wheel lacks {', '.join(missing)}; the patches in "
            f"{__file__} no longer match it and must be updated with ORIGINAL_SHA256"
        )


def is_dropped(name: str) -> bool:
    return (
        bool(COMPILED_EXTENSION.fullmatch(name))
        or name.startswith(STRAY_PACKAGE)
        or name == f"{DIST_INFO}/RECORD"
    )


def apply_edits(name: str, data: bytes, edits: list[tuple[str, str]]) -> bytes:
    """Replace each snippet exactly once, so upstream drift fails loudly."""
    text = data.decode("utf-8")
    for old, new in edits:
        if text.count(old) != 1:
            raise InstallError(
                f"cannot patch {name}: expected text {old.splitlines()[0].strip()!r} "
                f"not found exactly once; the patches in {__file__} no longer "
                "match the wheel and must be updated with ORIGINAL_SHA256"
            )
        text = text.replace(old, new)
    return text.encode("utf-8")


def fresh_info(name: str, template: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A clean ZipInfo for ``name`` carrying ``template``'s timestamp and mode.

    Fixed timestamps keep the build reproducible; fresh objects keep flags and
    extra fields of the source archive from leaking into ours.
    """
    info = zipfile.ZipInfo(name, date_time=template.date_time)
    info.external_attr = template.external_attr
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def record_for(members: list[tuple[zipfile.ZipInfo, bytes]]) -> str:
    """RECORD in the wheel spec's format: path,sha256=<urlsafe b64>,size."""
    lines = []
    for info, data in members:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
        lines.append(f"{info.filename},sha256={digest.rstrip(b'=').decode()},{len(data)}")
    lines.append(f"{DIST_INFO}/RECORD,,")
    return "\n".join(lines) + "\n"


# --- installing -----------------------------------------------------------


def remove_previous() -> None:
    """Uninstall anything that owns ``detectron2`` before installing ours.

    pip treats a same-version reinstall as already satisfied, so an unpatched
    sal-detectron2 0.7.2 would otherwise stay in place.
    """
    stale = [name for name in (DIST_NAME, "detectron2") if installed_distribution(name) is not None]
    if stale:
        say(f"uninstalling previous {', '.join(stale)}")
        run_pip(
            ["uninstall", "--yes", *stale],
            failure=f"could not uninstall {', '.join(stale)}; remove it by hand and rerun",
        )


def install(wheel: Path) -> None:
    say(f"installing {wheel.name} and its dependencies with pip (may take a minute)")
    # Nothing here may upgrade torch: no --upgrade, and the wheel does not
    # declare torch, so pip keeps whatever torch is installed.
    run_pip(
        ["install", "--quiet", str(wheel), *PIP_NETWORK_OPTIONS],
        failure=(
            f"pip could not install {wheel.name}; see pip's output above "
            "(usually a dependency that could not be fetched from PyPI)"
        ),
    )


# --- entry point ----------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Install Detectron2 from a patched sal-detectron2 wheel.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where the original and patched wheels are kept (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the patched wheel and reinstall even if already installed",
    )
    return parser.parse_args(argv)


def already_installed() -> str | None:
    """Describe an install that makes this run unnecessary, or None."""
    ours = installed_distribution(DIST_NAME)
    if ours is not None and is_patched_install(ours):
        return f"detectron2 already installed (patched {DIST_NAME} {VERSION})"
    upstream = installed_distribution("detectron2")
    if upstream is not None:
        # A from-source upstream build works as is; replacing it is opt-in.
        return (
            f"detectron2 already installed (upstream detectron2 {upstream.version}); "
            "pass --force to replace it with patched sal-detectron2"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.force:
        existing = already_installed()
        if existing:
            say(existing)
            return 0
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        original = fetch_original(args.cache_dir)
        wheel = patched_wheel(original, args.cache_dir, args.force)
        remove_previous()
        install(wheel)
    except InstallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"error: {error}; check that the cache dir {args.cache_dir} is writable "
            "or pass --cache-dir",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    say(f"installed patched {DIST_NAME} {VERSION} into {sys.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
