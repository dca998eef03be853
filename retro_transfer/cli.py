"""Shared command-line conventions: bad input is one line on stderr and exit code 2."""

import argparse
import sys
from pathlib import Path
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
    here = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if p == "" or Path(p).resolve() != here]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def check_checkpoint_file(checkpoint: str) -> None:
    """Fail in one line on a checkpoint path that is absent or a folder (before seconds of imports)."""
    if not Path(checkpoint).exists():
        fail(f"checkpoint {checkpoint} does not exist")
    if not Path(checkpoint).is_file():
        fail(f"checkpoint {checkpoint} is a folder, not a checkpoint file")


def fail_on_checkpoint(checkpoint: str, message: str) -> NoReturn:
    """Fail with a checkpoint problem, naming the file when the library's message does not."""
    fail(message if str(checkpoint) in message else f"cannot use checkpoint {checkpoint}: {message}")


def add_evaluation_inputs(parser: argparse.ArgumentParser, features: bool = True) -> None:
    """The arguments the evaluation tools share: what to evaluate, on what data, how it is loaded.

    ``features=False`` leaves out ``--features`` for protocols that fine-tune
    the backbone itself (the Retro adapter is a distillation-only module).
    """
    parser.add_argument("checkpoint", help="distillation checkpoint, or a teacher checkpoint (e.g. MoCo v2 .pth.tar)")
    parser.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    if features:
        parser.add_argument(
            "--features",
            choices=("backbone", "adapter"),
            default="backbone",
            help="use the pooled backbone (default) or the Retro adapter output",
        )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="default %(default)s")
    parser.add_argument("--image-size", type=positive_int, default=224, help="crop size in pixels (default %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=4, help="data-loading processes (default %(default)s)")
