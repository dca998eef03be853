"""MMDetection 3.x integration: importing this registers the distilled students as MMDetection backbones.

Configs load it with ``custom_imports = dict(imports=['retro_transfer.mmdet'],
allow_failed_imports=False)``. On import, once per process:

* ``mmcv.ops`` becomes importable on mmcv-lite, with ``nms``, ``batched_nms``,
  ``RoIAlign`` and ``RoIPool`` on torchvision's kernels (see
  :mod:`retro_transfer.compat.detection_ops`): what Faster and Mask R-CNN run;
* Runner checkpoints load with ``weights_only`` (as for MMSeg);
* ``StudentBackbone`` is registered in MMDetection's ``MODELS``. It is the
  same class MMSeg uses (:mod:`retro_transfer.mmseg.backbones`): one
  OpenMMLab backbone returning the stride 4..32 feature levels, which is what
  an FPN neck reads, and one converted file
  (``tools/convert_to_openmmlab.py``) for both toolboxes.
"""

from retro_transfer.compat import mmcv_ops as _mmcv_ops

_mmcv_ops.install()

from mmdet.registry import MODELS  # noqa: E402

from retro_transfer.mmseg import StudentBackbone, allow_runner_checkpoints  # noqa: E402

allow_runner_checkpoints()
if "StudentBackbone" not in MODELS.module_dict:
    MODELS.register_module(name="StudentBackbone", module=StudentBackbone)

__all__ = ["StudentBackbone"]
