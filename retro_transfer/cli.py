"""Shared command-line conventions: bad input is one line on stderr and exit code 2."""

import argparse
import sys
from typing import NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``prog: error: message`` and exit; for errors a user can fix."""
    prog = argparse.ArgumentParser().prog
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def keep_tools_dir_off_path(script: str) -> None:
    """Let a script in ``tools/`` import the ``distill`` package.

    Python puts a script's folder first on ``sys.path``, and ``tools/distill.py``
    would then shadow the ``distill`` package for every tool. Call this with
    ``__file__`` before importing ``distill``.
    """
    from pathlib import Path

    here = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if p == "" or Path(p).resolve() != here]
