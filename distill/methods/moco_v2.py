"""MoCo v2 on the student alone: the baseline every distillation method is compared with."""

from typing import Dict, Optional

import torch

from retro_transfer.models import ProjectionHead, Student, Teacher

from ..config import Config
from ..ema import ema_update, make_mean_copy
from ..losses import info_nce
from ..queue import EmbeddingQueue
from .base import DistillMethod, pooled, unit


class MoCoV2(DistillMethod):
    """Chen et al., 2020 ("Improved baselines with momentum contrastive learning").

        q = n(H_S(S(x1))),  k = n(H_S'(S'(x2))),  (S', H_S') = EMA(S, H_S; m)
        L = InfoNCE(q, k; queue, tau)

    The key encoder sees a batch shuffled across processes (shuffling BN).
    """

    name = "moco_v2"
    needs_teacher = False

    def __init__(
        self,
        student: Student,
        head_hidden: Optional[int] = None,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__(student, shuffle_bn=shuffle_bn, bn_splits=bn_splits)
        self.head = ProjectionHead(student.out_channels, head_hidden or student.out_channels, dim)
        self.student_ema = make_mean_copy(student)
        self.head_ema = make_mean_copy(self.head)
        self.queue = EmbeddingQueue(queue_size, dim)
        self.temperature, self.momentum = temperature, momentum

    @classmethod
    def from_config(cls, cfg: Config, student: Student, teacher: Optional[Teacher] = None, bn_splits: int = 1) -> "MoCoV2":
        return cls(
            student,
            head_hidden=cfg.student.head_hidden,
            dim=cfg.student.head_dim,
            queue_size=cfg.loss.queue_size,
            temperature=cfg.loss.temperature,
            momentum=cfg.loss.momentum,
            shuffle_bn=cfg.train.shuffle_bn,
            bn_splits=bn_splits,
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Dict[str, torch.Tensor]:
        q = unit(self.head(pooled(self.student(x1))))
        with torch.no_grad():
            ema_update(self.student_ema, self.student, self.momentum)
            ema_update(self.head_ema, self.head, self.momentum)
            k = self.keys(lambda x: unit(self.head_ema(pooled(self.student_ema(x)))), x2)
        loss = info_nce(q, k, self.queue.negatives(), self.temperature)
        self.queue.enqueue(k)
        return {"loss": loss, "infonce": loss.detach()}
