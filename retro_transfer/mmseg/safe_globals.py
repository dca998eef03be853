"""Let ``weights_only`` loading read MMEngine Runner checkpoints, without turning it off.

torch >= 2.6 loads with ``weights_only=True``. A checkpoint the Runner writes
(``iter_N.pth``: resume, ``load_from``, ``tools/test_seg.py``) also holds its
message hub, whose ``HistoryBuffer`` objects carry numpy arrays, and numpy
scalars from the metrics. Those are refused as they stand. Rather than load
them with ``weights_only=False`` (which runs whatever code a file asks for),
:func:`allow_runner_checkpoints` adds exactly the globals such a file names:

* ``mmengine.logging.HistoryBuffer`` (restored through its own ``__setstate__``);
* numpy's array and scalar constructors (``_reconstruct``, ``ndarray``,
  ``dtype``, ``scalar``) under their numpy 2 and numpy 1 module paths, the
  classes of the plain numeric dtypes (a dtype is rebuilt through its class),
  and ``bytes`` (an empty array's data);
* ``getattr``, but a restricted one: a HistoryBuffer pickles its statistics
  methods as ``getattr(HistoryBuffer, 'mean')``, and the real ``getattr`` would
  let a file reach any attribute of any allowed object (and from there the
  interpreter). The stand-in answers only those four look-ups.

Everything else stays refused, so a file that asks for more still fails with
torch's own message naming the global.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch

_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")
# Booleans, signed and unsigned integers, floats: what logged scalars and counts are.
_NUMERIC_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """``getattr`` as a HistoryBuffer pickle uses it, and for nothing else."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"refused getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) while loading a checkpoint: "
        "retro-transfer allows getattr only for MMEngine HistoryBuffer statistics methods"
    )


def _numpy_multiarray():
    core = getattr(np, "_core", None)  # numpy >= 2
    return core.multiarray if core is not None else np.core.multiarray


def runner_checkpoint_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals a Runner checkpoint needs, in ``torch.serialization.add_safe_globals`` form."""
    from mmengine.logging import HistoryBuffer

    multiarray = _numpy_multiarray()
    allowed: List[Union[Callable, Tuple[Callable, str]]] = [HistoryBuffer, np.ndarray, np.dtype, bytes]
    allowed += [type(np.dtype(code)) for code in _NUMERIC_DTYPES]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # written by numpy 2 / numpy 1
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
        allowed.append((multiarray.scalar, f"{module}.scalar"))
    allowed.append((history_buffer_getattr, "builtins.getattr"))
    return allowed


def allow_runner_checkpoints() -> None:
    """Add :func:`runner_checkpoint_globals` to torch's allow-list; calling it again changes nothing."""
    present = set(torch.serialization.get_safe_globals())
    missing = [g for g in runner_checkpoint_globals() if g not in present]
    if missing:
        torch.serialization.add_safe_globals(missing)
