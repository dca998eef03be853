"""DisCo: MoCo v2 on the student plus consistency with the teacher's embeddings."""

from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn

from retro_transfer.models import ProjectionHead, Student, Teacher

from ..config import Config
from ..ema import make_mean_copy
from .base import pooled, unit
from .consistency import MeanStudentConsistency


class DisCo(MeanStudentConsistency):
    """Gao et al., 2022 (ECCV), section 3.

        q = n(H_S(S(x1))),  q2 = n(H_S(S(x2))),  k = n(H_S'(S'(x2))),  t_i = n(H_T(T(x_i)))
        L = InfoNCE(q, k) + w * (MSE(t1, q) + MSE(t2, q2))

    (S', H_S') = EMA(S, H_S; m); the step and the weight w are
    :class:`MeanStudentConsistency`'s. H_S is wide (hidden 2048 by default):
    the paper's fix for the distilling bottleneck.
    """

    name = "disco"
    head_hidden = 2048  # H_S's hidden width when student.head_hidden is not set

    def __init__(
        self,
        student: Student,
        teacher: Teacher,
        head_hidden: int = 2048,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        mse_weight: float = 1.0,
        teacher_bn_train: bool = False,
    ) -> None:
        head = ProjectionHead(student.out_channels, head_hidden, dim)
        super().__init__(student, teacher, dim, queue_size, temperature, momentum, shuffle_bn, bn_splits, mse_weight, teacher_bn_train)
        self.head = head
        self.head_ema = make_mean_copy(head)

    @classmethod
    def own_arguments(cls, cfg: Config, student: Student, teacher: Teacher) -> Dict:
        return {"head_hidden": cfg.student.head_hidden or cls.head_hidden, "dim": teacher.head.out_dim}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return unit(self.head(pooled(self.student(x))))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return unit(self.head_ema(pooled(self.student_ema(x))))

    def averaged(self) -> Iterable[Tuple[nn.Module, nn.Module]]:
        return [(self.student_ema, self.student), (self.head_ema, self.head)]
