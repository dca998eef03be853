"""The public import path for checkpoints: ``from retro_transfer.checkpoints import load_teacher, load_student, ...``.

The code lives in three modules, one concern each:

- :mod:`retro_transfer.safe_io`: reading with ``weights_only=True`` (``safe_load``)
  and atomic writing (``save_atomic``); ``CheckpointError``;
- :mod:`retro_transfer.teacher_loading`: recognising a teacher file's layout
  (the released families, torchvision, this project) and loading the teacher;
- :mod:`distill.checkpoint`: the distillation checkpoint's format, its writer
  and its readers (the trained student, the linear-probe encoders).

Users' scripts keep importing from here; the project's own modules import
from the module that defines a name.
"""

from distill.checkpoint import CHECKPOINT_VERSION, ENCODER_FEATURES, extract_student_state, load_encoder, load_student
from distill.common import DISTILL_FORMAT

from .safe_io import CheckpointError, remove_stale_temporaries, safe_load, save_atomic, write_failure
from .teacher_loading import RESNET_LAYOUTS, LoadReport, infer_resnet_arch, load_teacher

__all__ = [
    "CHECKPOINT_VERSION",
    "DISTILL_FORMAT",
    "ENCODER_FEATURES",
    "RESNET_LAYOUTS",
    "CheckpointError",
    "LoadReport",
    "extract_student_state",
    "infer_resnet_arch",
    "load_encoder",
    "load_student",
    "load_teacher",
    "remove_stale_temporaries",
    "safe_load",
    "save_atomic",
    "write_failure",
]
