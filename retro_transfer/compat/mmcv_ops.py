"""A pure-PyTorch stand-in for ``mmcv.ops`` when mmcv has no compiled extension.

MMSegmentation 1.2.2 imports ``mmcv.ops`` unguarded in four modules (point
sampling and focal loss), so ``import mmseg.models`` fails with mmcv-lite,
which has no ``mmcv._ext``. Building the full mmcv takes ~45 min on two cores,
and none of the heads this project uses (FCN, DeepLabV3(+), UPerNet) need the
compiled ops. MMDetection 3.3 goes further: ``import mmdet.models`` imports
about twenty ``mmcv.ops`` names, and Faster/Mask R-CNN run four of them. The
stand-in is a package (``mmcv.ops`` and any ``mmcv.ops.X``) that provides:

* ``point_sample`` and its helpers: mmcv's own pure-PyTorch implementation,
  loaded by path from ``mmcv/ops/point_sample.py`` (that file does not touch ``_ext``);
* ``sigmoid_focal_loss``: :mod:`retro_transfer.compat.focal_loss`, with the semantics of mmcv's CUDA
  kernel (class-index targets, ``num_classes`` meaning background);
* ``nms``, ``batched_nms``, ``RoIAlign``/``roi_align``, ``RoIPool``/``roi_pool``:
  :mod:`retro_transfer.compat.detection_ops`, on torchvision's kernels.

Any other name (``DeformConv2d``, ``MultiScaleDeformableAttention``,
``mmcv.ops.carafe.CARAFEPack``...) imports as a class that can be subclassed
(mmcv and MMDetection do so at import time) but raises one line naming the
compiled mmcv when it is built or called. When a compiled mmcv is installed
the finder steps aside and the real ``mmcv.ops`` loads.

This module imports nothing heavy: it runs at every interpreter start-up
through the ``.pth`` hook, so torch is imported only when ``mmcv.ops`` is.

Activation: :func:`install` adds a meta-path finder that answers only for
``mmcv.ops`` and its submodules; ``retro_transfer.mmseg`` calls it on import, and ``make setup``
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


# Submodules mmdet/mmseg import by path (``from mmcv.ops.nms import batched_nms``),
# served by the stand-in; ``mmcv.ops.point_sample`` is mmcv's own file, and any
# other ``mmcv.ops.X`` is a module of unavailable ops.
_PROVIDED = {
    "nms": ("nms", "batched_nms"),
    "roi_align": ("roi_align", "RoIAlign"),
    "roi_pool": ("roi_pool", "RoIPool"),
    "focal_loss": ("sigmoid_focal_loss",),
}


def _unavailable_getattr(module: ModuleType):
    """A module ``__getattr__`` that hands out (and caches) stand-ins raising when used."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        from retro_transfer.compat.detection_ops import unavailable

        stand_in = unavailable(name)
        setattr(module, name, stand_in)
        return stand_in

    return __getattr__


def _provided() -> dict:
    """Name -> the stand-in's implementation, for every op it runs."""
    from retro_transfer.compat import detection_ops as ops
    from retro_transfer.compat.focal_loss import sigmoid_focal_loss

    return {"nms": ops.nms, "batched_nms": ops.batched_nms, "roi_align": ops.roi_align, "RoIAlign": ops.RoIAlign,
            "roi_pool": ops.roi_pool, "RoIPool": ops.RoIPool, "sigmoid_focal_loss": sigmoid_focal_loss}


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module: ModuleType) -> None:
        provided = _provided()
        sub = module.__name__[len(MODULE) + 1:]
        if sub:  # mmcv.ops.X: its provided names, stand-ins for the rest
            names = _PROVIDED.get(sub, ())
        else:  # the package: every provided op, and mmcv's pure-PyTorch point sampling
            names = tuple(provided)
            # Load the submodules first, as mmcv's __init__ does: importing one
            # later would rebind e.g. ``mmcv.ops.nms`` from the function to the module.
            for submodule in _PROVIDED:
                importlib.import_module(f"{MODULE}.{submodule}")
            point_sample = importlib.import_module(f"{MODULE}.point_sample")  # mmcv's own file, by path
            for name in dir(point_sample):
                value = getattr(point_sample, name)
                if callable(value) and getattr(value, "__module__", None) == point_sample.__name__:
                    setattr(module, name, value)
        for name in names:
            setattr(module, name, provided[name])
        module.__retro_transfer_stand_in__ = True
        module.__getattr__ = _unavailable_getattr(module)


class MmcvOpsStandInFinder(importlib.abc.MetaPathFinder):
    """Answers ``import mmcv.ops`` (and ``mmcv.ops.X``) with the stand-in when mmcv has no compiled ops."""

    def find_spec(self, fullname, path=None, target=None):
        if not (fullname == MODULE or fullname.startswith(MODULE + ".")) or compiled_mmcv_available():
            return None
        if fullname == f"{MODULE}.point_sample":
            return importlib.util.spec_from_file_location(
                fullname, Path(importlib.util.find_spec("mmcv").origin).parent / "ops" / "point_sample.py")
        is_package = fullname == MODULE
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin=__file__, is_package=is_package)


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

