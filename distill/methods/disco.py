"""DisCo: MoCo v2 on the student plus consistency with the teacher's embeddings."""

from typing import Dict

import torch

from retro_transfer.models import ProjectionHead, Student, Teacher

from ..ema import ema_update, make_mean_copy
from ..losses import consistency_mse, info_nce
from ..queue import EmbeddingQueue
from .base import DistillMethod, pooled, unit


class DisCo(DistillMethod):
    """Gao et al., 2022 (ECCV), section 3.

        q = n(H_S(S(x1))),  q2 = n(H_S(S(x2))),  k = n(H_S'(S'(x2))),  t_i = n(H_T(T(x_i)))
        L = InfoNCE(q, k) + w * (MSE(t1, q) + MSE(t2, q2))

    MSE is the squared distance summed over embedding dimensions and averaged
    over the images, so w does not depend on the batch or the process count.
    The released code sums over each GPU's 32 images (``MSELoss(reduction='sum')``)
    and averages the gradients over GPUs, which is w = 32 here, on any number
    of processes. H_S is wide (hidden 2048 by default): the paper's fix for
    the distilling bottleneck.
    """

    name = "disco"

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
        super().__init__(student, teacher, teacher_bn_train, shuffle_bn, bn_splits)
        self.head = ProjectionHead(student.out_channels, head_hidden, dim)
        self.student_ema = make_mean_copy(student)
        self.head_ema = make_mean_copy(self.head)
        self.queue = EmbeddingQueue(queue_size, dim)
        self.temperature, self.momentum = temperature, momentum
        self.mse_weight = mse_weight

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return unit(self.head(pooled(self.student(x))))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, teacher=None) -> Dict[str, torch.Tensor]:
        """``teacher``: the teacher's embeddings of the views, read from a teacher cache (None: run the teacher)."""
        t1, t2 = self.teacher_embeddings(x1, x2, cached=teacher)
        q, q2 = self.embed(x1), self.embed(x2)
        with torch.no_grad():
            ema_update(self.student_ema, self.student, self.momentum)
            ema_update(self.head_ema, self.head, self.momentum)
            k = self.keys(lambda x: unit(self.head_ema(pooled(self.student_ema(x)))), x2)
        contrast = info_nce(q, k, self.queue.negatives(), self.temperature)
        mse1, mse2 = consistency_mse(q, t1), consistency_mse(q2, t2)
        self.queue.enqueue(k)
        loss = contrast + self.mse_weight * (mse1 + mse2)
        return {"loss": loss, "infonce": contrast.detach(), "mse1": mse1.detach(), "mse2": mse2.detach()}
