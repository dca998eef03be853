"""Which modules may import which: boundaries read from the source (its AST), without importing anything.

The teacher-cache builder and the training engine share their data and
precision helpers through ``distill.training_data`` and ``distill.precision``;
the builder must not reach them through the engine (issue 25), or the two
would again depend on each other's internals.
"""

import ast
from pathlib import Path
from typing import Iterator, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
# The repository's own packages: their imports are followed; anything else (torch, timm) is a leaf.
PACKAGES = ("distill", "retro_transfer")


def module_file(module: str) -> Optional[Path]:
    """The source file of a repository module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), or None if not one."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(module: str) -> Iterator[str]:
    """Every module that ``module``'s source imports, anywhere in it (a function's lazy import too), as absolute names.

    ``from X import name`` yields ``X`` and ``X.name`` (``name`` may be a
    submodule: ``from . import engine``); a name that is not a module is
    dropped by :func:`repository_imports`, which looks for its file.
    """
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def repository_imports(module: str) -> Set[str]:
    """The repository modules ``module`` imports directly or through others, with the packages above each."""
    seen: Set[str] = set()
    todo = [module]
    while todo:
        for name in imported_modules(todo.pop()):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:end])
                if prefix.split(".")[0] in PACKAGES and prefix not in seen and module_file(prefix):
                    seen.add(prefix)
                    todo.append(prefix)
    return seen


def test_the_walk_finds_a_known_import():
    """The walk can fail: the engine imports the shared helpers directly, and the methods' losses through them."""
    reached = repository_imports("distill.engine")
    assert {"distill.precision", "distill.training_data", "distill.data"} <= reached
    assert "distill.losses" in reached and "distill.engine" not in reached


def test_cache_builder_does_not_import_the_engine():
    """``distill.cache_builder`` reaches ``distill.engine`` neither directly nor through any module it imports."""
    reached = repository_imports("distill.cache_builder")
    assert "distill.engine" not in reached, sorted(reached)
    assert {"distill.precision", "distill.training_data"} <= reached
