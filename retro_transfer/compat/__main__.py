"""``python -m retro_transfer.compat --install-pth``: register the mmcv.ops stand-in in this environment.

A module of its own: the hook itself imports ``retro_transfer.compat.mmcv_ops``
at start-up, so running that module with ``-m`` would execute it twice.
"""

import sys

from .mmcv_ops import _install_pth

if sys.argv[1:] == ["--install-pth"]:
    print(f"mmcv.ops stand-in hook written to {_install_pth()}")
else:
    sys.exit("usage: python -m retro_transfer.compat --install-pth")
