"""Retro: the student reuses the teacher's frozen projection head through an adapter."""

from typing import Dict, Optional

import torch
import torch.nn as nn

from retro_transfer.models import Student, Teacher, build_adapter

from ..ema import ema_update, make_mean_copy
from ..losses import consistency_mse, info_nce
from ..queue import EmbeddingQueue
from .base import DistillMethod, pooled, unit


class Retro(DistillMethod):
    """Nguyen and Park, 2024 ("Reusing teacher projection head"), section 3 and Figure 5.

        q  = n(H_T(pool(A(S(x1))))),     q2 = n(H_T(pool(A(S(x2)))))
        k  = n(H_T(pool(A'(S'(x2))))),   S' = EMA(S; m),  A' = EMA(A; m)
        t_i = n(H_T(T(x_i)))
        L  = InfoNCE(q, k) + w * (MSE(t1, q) + MSE(t2, q2))

    MSE is the squared distance summed over embedding dimensions and averaged
    over the images; w = 32 is the released recipe (see ``DisCo``).

    The mean student is the EMA of every trainable part, backbone and adapter,
    with the frozen H_T shared, as DisCo's released builder averages every
    trainable part of its query encoder (METHOD.md: no Retro code is public).
    ``adapter_ema=False`` averages only the backbone and sends the keys
    through the online adapter, A' = A: the other reading, kept for comparison.

    Trainable: the student backbone S and the adapter A. Frozen: the teacher
    backbone T and its head H_T, through which gradients flow to A and S.
    q2 is the student's embedding of view 2 (the released code uses view 1
    there, a bug).
    """

    name = "retro"

    def __init__(
        self,
        student: Student,
        teacher: Teacher,
        adapter_kind: str = "auto",
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        mse_weight: float = 1.0,
        teacher_bn_train: bool = False,
        adapter_ema: bool = True,
    ) -> None:
        if teacher.head is None:
            raise ValueError(
                "Retro reuses the teacher's projection head, and this teacher has none: "
                "load a MoCo v2 pretraining checkpoint (it holds the head as fc.0/fc.2)"
            )
        super().__init__(student, teacher, teacher_bn_train, shuffle_bn, bn_splits)
        self.adapter: nn.Module = build_adapter(student.arch, student.out_channels, teacher.out_channels, adapter_kind)
        self.student_ema = make_mean_copy(student)
        # None when the keys go through the online adapter; checkpoints then hold no adapter_ema.* tensors.
        self.adapter_ema: Optional[nn.Module] = make_mean_copy(self.adapter) if adapter_ema else None
        self.queue = EmbeddingQueue(queue_size, teacher.head.out_dim)
        self.temperature, self.momentum = temperature, momentum
        self.mse_weight = mse_weight

    def embed(self, feature_map: torch.Tensor, adapter: Optional[nn.Module] = None) -> torch.Tensor:
        """n(H_T(pool(A(feature_map)))): the student's embedding in the teacher's space (A: the online adapter by default)."""
        return unit(self.teacher.head(pooled((self.adapter if adapter is None else adapter)(feature_map))))

    @property
    def key_adapter(self) -> nn.Module:
        """The mean student's adapter A': the averaged copy, or the online adapter with ``adapter_ema=False``."""
        return self.adapter if self.adapter_ema is None else self.adapter_ema

    def monitored_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The backbone's pooled features, and the adapter's (the released linear probe's features)."""
        fmap = self.student(x)
        return {"backbone": pooled(fmap), "adapter": pooled(self.adapter(fmap))}

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, teacher=None) -> Dict[str, torch.Tensor]:
        """``teacher``: the teacher's embeddings of the views, read from a teacher cache (None: run the teacher)."""
        t1, t2 = self.teacher_embeddings(x1, x2, cached=teacher)
        q, q2 = self.embed(self.student(x1)), self.embed(self.student(x2))
        with torch.no_grad():
            ema_update(self.student_ema, self.student, self.momentum)
            if self.adapter_ema is not None:
                ema_update(self.adapter_ema, self.adapter, self.momentum)
            k = self.keys(lambda x: self.embed(self.student_ema(x), self.key_adapter), x2)
        contrast = info_nce(q, k, self.queue.negatives(), self.temperature)
        mse1, mse2 = consistency_mse(q, t1), consistency_mse(q2, t2)
        self.queue.enqueue(k)
        loss = contrast + self.mse_weight * (mse1 + mse2)
        return {"loss": loss, "infonce": contrast.detach(), "mse1": mse1.detach(), "mse2": mse2.detach()}
