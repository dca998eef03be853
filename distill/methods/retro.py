"""Retro: the student reuses the teacher's frozen projection head through an adapter."""

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from retro_transfer.models import Student, Teacher, build_adapter

from ..config import Config, check_adapter_widths
from ..ema import make_mean_copy
from .base import pooled, unit
from .consistency import MeanStudentConsistency


class Retro(MeanStudentConsistency):
    """Nguyen and Park, 2024 ("Reusing teacher projection head"), section 3 and Figure 5.

        q  = n(H_T(pool(A(S(x1))))),     q2 = n(H_T(pool(A(S(x2)))))
        k  = n(H_T(pool(A'(S'(x2))))),   S' = EMA(S; m),  A' = EMA(A; m)
        t_i = n(H_T(T(x_i)))
        L  = InfoNCE(q, k) + w * (MSE(t1, q) + MSE(t2, q2))

    The step and the weight w (32: the released recipe) are
    :class:`MeanStudentConsistency`'s.

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
        adapter = build_adapter(student.arch, student.out_channels, teacher.out_channels, adapter_kind)
        super().__init__(
            student, teacher, teacher.head.out_dim, queue_size, temperature, momentum, shuffle_bn, bn_splits, mse_weight,
            teacher_bn_train,
        )  # fmt: skip
        self.adapter: nn.Module = adapter
        # None when the keys go through the online adapter; checkpoints then hold no adapter_ema.* tensors.
        self.adapter_ema: Optional[nn.Module] = make_mean_copy(adapter) if adapter_ema else None

    @classmethod
    def own_arguments(cls, cfg: Config, student: Student, teacher: Teacher) -> Dict:
        return {"adapter_kind": cfg.adapter.kind, "adapter_ema": cfg.adapter.ema}

    @classmethod
    def from_config(cls, cfg: Config, student: Student, teacher: Optional[Teacher], bn_splits: int) -> "Retro":
        """As every method, and the adapter's output must be what the teacher's head takes."""
        method = super().from_config(cfg, student, teacher, bn_splits)
        adapter_out = [m for m in method.adapter.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        check_adapter_widths(student.out_channels, teacher.head.in_dim, adapter_out)
        return method

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

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.student(x))

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.student_ema(x), self.key_adapter)

    def averaged(self) -> Iterable[Tuple[nn.Module, nn.Module]]:
        pairs = [(self.student_ema, self.student)]
        return pairs if self.adapter_ema is None else pairs + [(self.adapter_ema, self.adapter)]
