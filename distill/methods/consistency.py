"""What DisCo and Retro share: MoCo v2's contrast against a mean student, plus consistency with the teacher."""

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from retro_transfer.models import Student, Teacher

from ..config import Config
from ..ema import ema_update, make_mean_copy
from ..losses import consistency_mse, info_nce
from ..queue import EmbeddingQueue
from .base import DistillMethod


class MeanStudentConsistency(DistillMethod):
    """The step DisCo and Retro share (their papers' section 3):

        q = f(x1),  q2 = f(x2),  k = f'(x2),  t_i = n(H_T(T(x_i)))
        L = InfoNCE(q, k; queue) + w * (MSE(t1, q) + MSE(t2, q2))

    f is the student's embedding (:meth:`query`), f' the mean student's
    (:meth:`key`), whose parts follow the online ones by EMA with momentum m
    (:meth:`averaged`) before the keys are computed. MSE is the squared
    distance summed over embedding dimensions and averaged over the images,
    so w does not depend on the batch or the process count; the released
    code sums over each GPU's 32 images (``MSELoss(reduction='sum')``) and
    averages the gradients over GPUs, which is w = 32 here, on any number of
    processes. A subclass says what f and f' are.

    Construction order keeps each run's random draws: a subclass builds its
    trainable head (or adapter) first, then calls this ``__init__``, which
    draws the queue's initial vectors.
    """

    def __init__(
        self,
        student: Student,
        teacher: Teacher,
        dim: int,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        mse_weight: float = 1.0,
        teacher_bn_train: bool = False,
    ) -> None:
        super().__init__(student, teacher, teacher_bn_train, shuffle_bn, bn_splits)
        self.student_ema = make_mean_copy(student)
        self.queue = EmbeddingQueue(queue_size, dim)
        self.temperature, self.momentum = temperature, momentum
        self.mse_weight = mse_weight

    @classmethod
    def from_config(cls, cfg: Config, student: Student, teacher: Optional[Teacher], bn_splits: int) -> "MeanStudentConsistency":
        return cls(
            student,
            teacher,
            queue_size=cfg.loss.queue_size,
            temperature=cfg.loss.temperature,
            momentum=cfg.loss.momentum,
            shuffle_bn=cfg.train.shuffle_bn,
            bn_splits=bn_splits,
            mse_weight=cfg.loss.mse_weight,
            teacher_bn_train=cfg.teacher.bn_train_mode,
            **cls.own_arguments(cfg, student, teacher),
        )

    @classmethod
    def own_arguments(cls, cfg: Config, student: Student, teacher: Teacher) -> Dict:
        """The constructor's arguments that only this method has, from ``cfg``."""
        return {}

    def query(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """f(x): the student's L2-normalised embedding, with gradients."""
        raise NotImplementedError

    def key(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """f'(x): the mean student's L2-normalised embedding (called without gradients)."""
        raise NotImplementedError

    def averaged(self) -> Iterable[Tuple[nn.Module, nn.Module]]:
        """(mean, online) pairs that the mean student averages; the student's backbone first."""
        return [(self.student_ema, self.student)]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, teacher=None) -> Dict[str, torch.Tensor]:
        """``teacher``: the teacher's embeddings of the views, read from a teacher cache (None: run the teacher)."""
        t1, t2 = self.teacher_embeddings(x1, x2, cached=teacher)
        q, q2 = self.query(x1), self.query(x2)
        with torch.no_grad():
            for mean, online in self.averaged():
                ema_update(mean, online, self.momentum)
            k = self.keys(self.key, x2)
        contrast = info_nce(q, k, self.queue.negatives(), self.temperature)
        mse1, mse2 = consistency_mse(q, t1), consistency_mse(q2, t2)
        self.queue.enqueue(k)
        loss = contrast + self.mse_weight * (mse1 + mse2)
        return {"loss": loss, "infonce": contrast.detach(), "mse1": mse1.detach(), "mse2": mse2.detach()}
