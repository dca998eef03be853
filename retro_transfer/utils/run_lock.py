"""An exclusive OS lock on a run folder for the whole run, so two processes never write into one folder.

Two runs on one folder (two seeds started together, or two ``resume=auto``)
would overwrite each other's checkpoints and interleave their logs, and both
exit 0. A run therefore holds ``fcntl.flock`` on ``<folder>/.run.lock`` from
before it looks at the folder until it ends. The OS drops the lock when the
process ends, however it ends (even ``kill -9``), so a killed run leaves no
stale lock. The lock file holds the holder's PID and host, for the message
a refused run prints; the holder deletes it when the run ends.

Under ``torchrun`` (or Slurm, or MPI) only the process of global rank 0 takes
the lock: all ranks of one job write into one folder by design, and rank 0's
lock keeps other jobs out. Within one process the lock is re-entrant (a tool
that holds it can run a Trainer that takes it again), since flock would
otherwise refuse the second open of the same file by the same process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Dict, Iterator, Optional

LOCK_FILE = ".run.lock"
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


class RunFolderError(RuntimeError):
    """A folder that cannot hold this run: a file, or in use by another run (named by PID and host)."""


class RunLock:
    """A held lock on one run folder; :meth:`release` (or the end of the process) lets it go."""

    _held: Dict[Path, "RunLock"] = {}  # folder -> this process's lock on it

    def __init__(self, folder: Path, fd: Optional[int], created: bool = False) -> None:
        self.folder, self._fd, self._created, self._depth = folder, fd, created, 1

    def release(self) -> None:
        """Let the folder go once every holder in this process has released it.

        The lock file is deleted while still locked (a process that opened it
        meanwhile sees it was replaced and tries again), and a folder this
        lock created is removed if nothing else was written into it: a run
        refused at its start leaves no trace.
        """
        self._depth -= 1
        if self._depth > 0 or self._fd is None:
            return
        RunLock._held.pop(self.folder, None)
        with contextlib.suppress(OSError):
            (self.folder / LOCK_FILE).unlink()
            if self._created:
                self.folder.rmdir()  # only when empty
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_folder(folder: os.PathLike, what: str = "folder") -> RunLock:
    """Lock ``folder`` (created if absent) for this run, or raise RunFolderError in one line.

    ``what`` names the folder as the user set it (``output_dir``, ``--out``,
    ``OUTPUT_DIR``...). Never blocks: a second run is refused at once.
    Processes other than rank 0 of a distributed job get a lock that holds nothing.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{what} {folder} is a file, not a folder; choose another {what}")
    if not _is_rank_zero():
        return RunLock(folder, None)
    held = RunLock._held.get(folder)
    if held is not None:
        held._depth += 1
        return held
    created = not folder.exists()
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # the folder's creator removed it meanwhile: again
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            if _try_lock(fd, folder, what) and _still_linked(fd, folder / LOCK_FILE):
                break
            os.close(fd)  # its holder deleted it after we opened it: lock the new file
    _write_holder(fd)
    lock = RunLock(folder, fd, created)
    RunLock._held[folder] = lock
    return lock


def _try_lock(fd: int, folder: Path, what: str) -> bool:
    """Take the flock on ``fd`` now or raise RunFolderError naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = _read_holder(fd)
        os.close(fd)
        raise RunFolderError(
            f"{what} {folder} is in use by another run ({holder}); two runs in one folder would overwrite each "
            "other's files: wait for that run to end (or stop it), or choose another folder"
        ) from None


def _still_linked(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` locked (a releasing holder deletes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_folder_locked(folder: os.PathLike, what: str = "folder") -> Iterator[RunLock]:
    """``with run_folder_locked(out, "--out"):`` holds the lock for the block (see :func:`lock_run_folder`)."""
    lock = lock_run_folder(folder, what)
    try:
        yield lock
    finally:
        lock.release()


def _is_rank_zero() -> bool:
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def _write_holder(fd: int) -> None:
    """Record who holds the lock, for the message another run prints."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _read_holder(fd: int) -> str:
    """``PID 1234 on host h``, as the holder recorded it; it may not have written it yet."""
    with contextlib.suppress(OSError, ValueError):
        pid, host = os.pread(fd, 256, 0).decode().split()
        return f"PID {int(pid)} on host {host}"
    return "its PID is not recorded yet"
