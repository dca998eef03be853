"""The distillation methods, one class each, behind one interface (``DistillMethod``)."""

from .base import DistillMethod
from .disco import DisCo
from .moco_v2 import MoCoV2
from .retro import Retro
from .seed import SEED
from .supcon import SupCon

METHODS = {cls.name: cls for cls in (MoCoV2, SEED, DisCo, Retro, SupCon)}

__all__ = ["DistillMethod", "MoCoV2", "SEED", "DisCo", "Retro", "SupCon", "METHODS"]
