"""A pure-PyTorch stand-in for ``mmcv.ops`` when mmcv has no compiled extension.

MMSegmentation 1.2.2 imports ``mmcv.ops`` unguarded in four modules (point
sampling and focal loss), so ``import mmseg.models`` fails with mmcv-lite,
which has no ``mmcv._ext``. Building the full mmcv takes ~45 min on two cores,
and none of the heads this project uses (FCN, DeepLabV3(+), UPerNet) need the
compiled ops. The stand-in provides exactly what those unguarded imports use:

* ``point_sample``: mmcv's own pure-PyTorch implementation, loaded by path
  from ``mmcv/ops/point_sample.py`` (that file does not touch ``_ext``);
* ``sigmoid_focal_loss``: :mod:`retro_transfer.compat.focal_loss`, with the semantics of mmcv's CUDA
  kernel (class-index targets, ``num_classes`` meaning background).

Any other name raises ``ModuleNotFoundError``, which is what mmseg's guarded
imports (``try: from mmcv.ops import X / except ModuleNotFoundError``) expect.
When a compiled mmcv is installed the finder steps aside and the real
``mmcv.ops`` loads.

This module imports nothing heavy: it runs at every interpreter start-up
through the ``.pth`` hook, so torch is imported only when ``mmcv.ops`` is.

Activation: :func:`install` adds a meta-path finder that answers only for
``mmcv.ops``; ``retro_transfer.mmseg`` calls it on import, and ``make setup``
writes a one-line ``.pth`` (``python -m retro_transfer.compat --install-pth``) so that a bare ``import mmseg.models`` works in the venv too.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

MODULE = "mmcv.ops"
PTH_NAME = "retro_transfer_mmcv_ops.pth"


def compiled_mmcv_available() -> bool:
    """True when mmcv ships its compiled ops (then the real ``mmcv.ops`` is used)."""
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:  # no mmcv at all
        return False


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module: ModuleType) -> None:
        mmcv_dir = Path(importlib.util.find_spec("mmcv").origin).parent
        source = mmcv_dir / "ops" / "point_sample.py"
        point_spec = importlib.util.spec_from_file_location(f"{MODULE}.point_sample", source)
        point_module = importlib.util.module_from_spec(point_spec)
        sys.modules[point_spec.name] = point_module
        point_spec.loader.exec_module(point_module)

        module.point_sample = point_module.point_sample
        from retro_transfer.compat.focal_loss import sigmoid_focal_loss

        module.sigmoid_focal_loss = sigmoid_focal_loss
        module.__retro_transfer_stand_in__ = True

        def __getattr__(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError(
                f"mmcv.ops.{name} needs mmcv's compiled extension, which this install (mmcv-lite) "
                "does not have; retro-transfer provides only point_sample and sigmoid_focal_loss. "
                "Install the full mmcv to use it.",
                name=f"{MODULE}.{name}",
            )

        module.__getattr__ = __getattr__


class MmcvOpsStandInFinder(importlib.abc.MetaPathFinder):
    """Answers ``import mmcv.ops`` with the stand-in when mmcv has no compiled ops."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != MODULE or compiled_mmcv_available():
            return None
        return importlib.machinery.ModuleSpec(MODULE, _StandInLoader(), origin=__file__)


def install() -> None:
    """Register the finder once (idempotent); safe to call when mmcv is absent."""
    if any(isinstance(finder, MmcvOpsStandInFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, MmcvOpsStandInFinder())


def _install_pth() -> Path:
    import sysconfig

    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    # One line: site.py executes .pth lines that start with "import". Guarded so
    # that uninstalling retro-transfer leaves the interpreter quiet.
    target.write_text(
        "import sys; exec('try:\\n import retro_transfer.compat.mmcv_ops as m\\n m.install()\\nexcept ImportError:\\n pass')\n"
    )
    return target

