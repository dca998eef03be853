"""MMEngine writes local files (checkpoints) in place; this backend writes them atomically.

MMEngine's ``LocalBackend.put`` opens the checkpoint file with ``'wb'`` and
writes into it, so a full disk or a kill mid-write leaves a truncated
``iter_N.pth`` where a good one was, and the ``OSError`` surfaces as a
traceback. Registered (through MMEngine's backend registry) as the backend for
local paths, :class:`AtomicLocalBackend` writes through
:func:`retro_transfer.checkpoints.save_atomic` instead: the old file or the
new one, never part of one, and a failed write is a one-line
``CheckpointError``. Importing this module registers it for the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from mmengine.fileio.backends import LocalBackend, register_backend

from retro_transfer.safe_io import save_atomic


class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` whose ``put``/``put_text`` replace the file in one rename, after the data is on disk."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        save_atomic(obj, filepath, dump=lambda data, f: f.write(data))

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        self.put(obj.encode(encoding), filepath)


register_backend("local", AtomicLocalBackend, force=True, prefixes="")
