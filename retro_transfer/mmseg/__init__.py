"""MMSegmentation integration: importing this registers the project's modules.

Configs load it with ``custom_imports = dict(imports=['retro_transfer.mmseg'],
allow_failed_imports=False)``. On import, once per process:

* ``mmcv.ops`` becomes importable on mmcv-lite (see :mod:`retro_transfer.compat.mmcv_ops`);
* torch's ``weights_only`` loader is taught the few globals that MMEngine
  Runner checkpoints hold (see :mod:`retro_transfer.mmseg.safe_globals`), so
  resume, ``load_from`` and testing work without ``weights_only=False``;
* ``StudentBackbone`` (the distilled student, any timm features model),
  ``ShapesVOCDataset`` and ``VOCAugDataset`` are registered in MMSeg's registries.
"""

from retro_transfer.compat import mmcv_ops as _mmcv_ops

_mmcv_ops.install()

from .safe_globals import allow_runner_checkpoints  # noqa: E402

allow_runner_checkpoints()

from .backbones import MMSEG_FORMAT, StudentBackbone, load_pretrained  # noqa: E402  (registers in MODELS)
from .datasets import ShapesVOCDataset, VOCAugDataset  # noqa: E402  (register in DATASETS)

__all__ = [
    "MMSEG_FORMAT",
    "ShapesVOCDataset",
    "StudentBackbone",
    "VOCAugDataset",
    "allow_runner_checkpoints",
    "load_pretrained",
]
