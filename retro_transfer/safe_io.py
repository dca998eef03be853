"""Checkpoint files read safely and written atomically: the I/O every stage of the toolkit shares.

Files are read with ``weights_only=True`` only: a checkpoint is data, and a
pickle that asks to run code is refused, never retried with the unsafe loader.
Files are written so that a crash or a full disk leaves the previous file or
the new one, never a partial one. Every failure is a ``CheckpointError``
whose message says, in one line, what is wrong and how to fix it.
"""

import argparse
import contextlib
import errno
import os
import pickle
import re
import secrets
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# Plain data containers that released checkpoints hold besides tensors, allowed
# on top of weights_only's own list: DINO's full checkpoints keep the training
# arguments as an argparse.Namespace. Rebuilding one only sets attributes
# (no __init__, no __setstate__ runs), and its values go through the same
# restricted unpickler, so no code from the file can run.
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""


def safe_load(path: PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` onto the CPU.

    The unsafe loader is never tried, not even as a fallback: a file that needs
    it could run arbitrary code, and a downloaded teacher is untrusted input.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    try:
        # torch warns about any pickle protocol above 2 (plain pickles use 4-5) before it reads or refuses the
        # file: noise on stderr above the one line a user gets either way.
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or _starts_like_a_pickle(path):
            raise CheckpointError(_refused_message(path, e)) from e
        raise CheckpointError(_damaged_message(path, e)) from e
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied") from e
    # torch.load reports damaged files with many exception types (RuntimeError
    # from the zip reader, EOFError, OSError, KeyError, struct.error...); all of
    # them mean the same thing to a user.
    except Exception as e:
        raise CheckpointError(_damaged_message(path, e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict of tensors")
    return obj


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether a file opens with a pickle protocol header (2-5), as legacy torch files and plain pickles do.

    torch calls a JPEG or random bytes "Unsupported operand", and says the same
    of a plain pickle it cannot follow; only the latter may be asking for code.
    """
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(2)
        return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    return False


def _damaged_message(path: Path, error: Exception) -> str:
    """One line for a file that is damaged or not a checkpoint, quoting the reader's reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch wraps its unpickler's reason in paragraphs of advice; the reason is the line that says it.
    detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0] if lines else "")
    reason = type(error).__name__ + (": " + detail[:200] if detail else "")
    return (
        f"{path} is truncated or not a PyTorch checkpoint ({reason}); "
        "if it was downloaded or copied, fetch it again and compare its size or checksum with the source"
    )


def _refused_message(path: Path, error: Exception) -> str:
    """Explain a weights-only refusal, naming the Python object the file asked for when torch says."""
    match = re.search(r"GLOBAL (\S+)", str(error))
    asked = f" (it asks for the Python object {match.group(1)})" if match else ""
    return (
        f"{path} contains code or Python objects that weights-only loading refuses{asked}; the file was NOT executed. "
        "A checkpoint must hold only tensors, numbers, strings and lists/dicts of them. If you trust its source, "
        "load it yourself with torch.load(..., weights_only=False) in a separate session and re-save just its "
        "state_dict; this toolkit never does that. (An old-format file cut short can also end this way: if you "
        "expected a plain checkpoint, copy it again.)"
    )


def save_atomic(obj: object, path: PathLike, dump: Optional[Callable[[object, BinaryIO], None]] = None) -> None:
    """``torch.save`` (or another ``dump(obj, file)``) that never leaves a partial file at ``path``.

    The data goes to a temporary file in the same directory (so the rename
    stays on one file system), is flushed to disk, and then replaces ``path``
    in one ``os.replace``; the directory is synced so the rename survives a
    power cut. A crash at any point leaves either the old file or the new one
    (and, after a kill, a temporary file that :func:`remove_stale_temporaries`
    deletes). A failed write is a ``CheckpointError`` that says so in one line.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with an explicit mode lets the umask apply, as for a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if _in_chain(e, KeyboardInterrupt) is not None:
            # Ctrl-C inside torch.save surfaces as torch's RuntimeError("unexpected pos") raised while its
            # zip writer closes; the user pressed Ctrl-C, and the tools answer that in one line.
            raise KeyboardInterrupt from None
        os_error = _os_error_in(e)
        if os_error is not None:
            raise CheckpointError(_write_failed_message(path, os_error)) from e
        raise
    _fsync_directory(path.parent)


_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # save_atomic's ``.NAME.PID.HEX.tmp``


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files that a killed :func:`save_atomic` left in ``directory``; return them.

    Only safe when nothing is writing there: call it when a run starts.
    """
    directory = Path(directory)
    stale = [p for p in directory.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file()] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_failure(path: PathLike, error: BaseException) -> Optional[str]:
    """One line for a write of ``path`` that failed on an OSError (a full disk, a read-only folder...), else None.

    For writers other than :func:`save_atomic` that also stage their file
    beside ``path`` and so leave the previous one unchanged.
    """
    os_error = _os_error_in(error)
    return None if os_error is None else _write_failed_message(Path(path), os_error)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write, also when torch wraps it.

    ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected
    pos`` and leaves the OSError (e.g. ENOSPC) only in ``__context__``.
    """
    return _in_chain(error, OSError)


def _in_chain(error: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``error`` or the exceptions it was raised from or during."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_failed_message(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left to write {path} ({error.strerror}); the previous {path.name} there (if any) is "
            "unchanged and the partial file was removed: free disk space or write to another folder, then run again"
        )
    return f"cannot write {path}: {error}; any previous file there is unchanged"


def _fsync_directory(directory: Path) -> None:
    """Persist a rename; file systems that cannot sync a directory are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
