"""SEED: self-supervised distillation by matching similarity distributions."""

from typing import Dict, Optional

import torch

from retro_transfer.models import ProjectionHead, Student, Teacher

from ..config import Config
from ..losses import seed_loss
from ..queue import EmbeddingQueue
from .base import DistillMethod, pooled, unit


class SEED(DistillMethod):
    """Fang et al., 2021 (ICLR), section 3.

        s = n(H_S(S(x))),  t = n(H_T(T(x)))
        L = -sum_j softmax([t.t, t.queue] / tau_T)_j * log_softmax([s.t, s.queue] / tau_S)_j

    One view per image (the second view passed in is not used); the queue
    holds teacher embeddings.
    """

    name = "seed"
    num_views = 1

    def __init__(
        self,
        student: Student,
        teacher: Teacher,
        head_hidden: Optional[int] = None,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        teacher_temperature: float = 0.01,
        teacher_bn_train: bool = False,
    ) -> None:
        super().__init__(student, teacher, teacher_bn_train)
        self.head = ProjectionHead(student.out_channels, head_hidden or student.out_channels, dim)
        self.queue = EmbeddingQueue(queue_size, dim)
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    @classmethod
    def from_config(cls, cfg: Config, student: Student, teacher: Optional[Teacher], bn_splits: int = 1) -> "SEED":
        return cls(
            student,
            teacher,
            head_hidden=cfg.student.head_hidden,
            dim=teacher.head.out_dim,
            queue_size=cfg.loss.queue_size,
            temperature=cfg.loss.temperature,
            teacher_temperature=cfg.loss.teacher_temperature,
            teacher_bn_train=cfg.teacher.bn_train_mode,
        )

    def forward(self, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, teacher=None) -> Dict[str, torch.Tensor]:
        """``teacher``: the teacher's embeddings of the views, read from a teacher cache (None: run the teacher)."""
        (t,) = self.teacher_embeddings(x1, cached=teacher)
        s = unit(self.head(pooled(self.student(x1))))
        loss = seed_loss(s, t, self.queue.negatives(), self.temperature, self.teacher_temperature)
        self.queue.enqueue(t)
        return {"loss": loss, "seed": loss.detach()}
