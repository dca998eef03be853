"""Read Detectron2's ``.pkl`` weight files without letting them run code.

Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` with plain ``pickle``,
which calls whatever function a file names: a downloaded or shared ``.pkl``
could run any command. What a weights file legitimately holds is data: dicts,
lists, tuples, strings, numbers, and numpy arrays with their dtypes (model-zoo
files keep tensors as numpy arrays under ``model`` or ``blobs``). The
unpickler here admits exactly the Python objects needed to rebuild those and
refuses every other one before it is called.

The numpy entries are listed under every module path that numpy 1 and 2 (and
Python 2 era Detectron/Caffe2 files) write, mapped onto the objects of the
installed numpy, so no module is imported on a file's say-so.
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Dict, Tuple

import numpy as np

from ..safe_io import CheckpointError

_MULTIARRAY = getattr(np, "_core", None) or np.core  # numpy >= 2 names it _core
_NUMERIC = _MULTIARRAY.numeric


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) as written in a pickle -> the object it may stand for."""
    allowed: Dict[Tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        allowed[(f"{core}.multiarray", "_reconstruct")] = _MULTIARRAY.multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _MULTIARRAY.multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _NUMERIC._frombuffer  # protocol 5 arrays
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for builtins in ("builtins", "__builtin__"):  # protocol 2 files name Python 2's module
        allowed[(builtins, "bytes")] = bytes  # an empty array's data
    allowed[("_codecs", "encode")] = _latin1_bytes  # how protocol 2 writes bytes from Python 3
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it (str -> bytes), and for nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler whose globals are limited to :func:`_allowed_globals`."""

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list; ``args[0]`` is its dotted name."""


def load_weights_pickle(path: os.PathLike) -> dict:
    """The dict in a Detectron2 ``.pkl`` weights file; anything else is a one-line CheckpointError.

    Python 2 era files (Detectron, Caffe2) hold byte strings; ``latin1`` reads
    them as Detectron2 itself does.
    """
    try:
        with open(path, "rb") as f:
            data = _WeightsUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory; pass the .pkl file inside it") from None
    except _Refused as e:
        raise CheckpointError(
            f"{path} asks for the Python object {e.args[0]}, which a weights file never holds; it was refused and "
            "NOT executed. A Detectron2 .pkl must hold only dicts, lists, strings, numbers and numpy arrays: "
            "convert the checkpoint again with tools/convert_to_d2.py, or get the file from its original source"
        ) from None
    except Exception as e:  # pickle reports damaged files as many exception types
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is truncated or not a Detectron2 .pkl weights file ({type(e).__name__}"
            f"{': ' + detail if detail else ''}); if it was downloaded or copied, fetch it again"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    return data
