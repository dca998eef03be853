"""MMSegmentation integration: importing this registers the project's modules.

Configs load it with ``custom_imports = dict(imports=['retro_transfer.mmseg'],
allow_failed_imports=False)``. Importing it first makes ``mmcv.ops`` importable
on mmcv-lite (see :mod:`retro_transfer.compat.mmcv_ops`).
"""

from retro_transfer.compat import mmcv_ops as _mmcv_ops

_mmcv_ops.install()

from .datasets import ShapesVOCDataset  # noqa: E402  (registers in mmseg's DATASETS)

__all__ = ["ShapesVOCDataset"]
