"""retro-transfer: distil a self-supervised teacher into a small backbone, then transfer it.

Stages, in pipeline order: teachers and their checkpoints -> distillation
(the separate ``distill`` package) -> converters -> Detectron2 and MMSegmentation
backbones. Heavy optional integrations (``retro_transfer.d2``,
``retro_transfer.mmseg``) are imported only when asked for.
"""

__version__ = "0.1.0"
