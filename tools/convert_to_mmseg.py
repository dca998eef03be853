#!/usr/bin/env python
"""The older name of tools/convert_to_openmmlab.py (same arguments, same output); kept so existing commands work."""

import runpy
import sys
from pathlib import Path

_TOOL = runpy.run_path(str(Path(__file__).with_name("convert_to_openmmlab.py")), run_name="convert_to_openmmlab")
build_parser, main = _TOOL["build_parser"], _TOOL["main"]

if __name__ == "__main__":
    sys.exit(main())
