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
