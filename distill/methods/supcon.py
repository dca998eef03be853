"""Supervised contrastive learning on MoCo v2's engine: the recipe of the demo's label-trained stand-in teacher."""

from typing import Dict, Optional

import torch

from retro_transfer.models import Student

from ..distributed import concat_all_gather
from ..ema import ema_update
from ..losses import same_label, supcon_loss
from .base import pooled, unit
from .moco_v2 import MoCoV2


class SupCon(MoCoV2):
    """Khosla et al., 2020 ("Supervised contrastive learning"), with MoCo v2's key encoder, queue and MLP head.

        q = n(H(S(x1))),  k = n(H'(S'(x2))),  (S', H') = EMA(S, H; m)
        L = SupCon(q; [k_batch; queue], positives = every key of q's class)

    The queue keeps each key's label beside it (``queue_labels``; -1 for the
    random vectors it starts with, which are not candidates at all). The network
    and head are MoCo v2's, so the result exports to the MoCo v2 layout and
    Retro reuses its head exactly as it reuses a MoCo head. This method sees
    labels: it trains teachers (tools/pretrain_teacher.py), never students.
    """

    name = "supcon"
    needs_labels = True

    def __init__(self, student: Student, head_hidden: Optional[int] = None, dim: int = 128, queue_size: int = 65536, **kwargs) -> None:
        super().__init__(student, head_hidden=head_hidden, dim=dim, queue_size=queue_size, **kwargs)
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        q = unit(self.head(pooled(self.student(x1))))
        with torch.no_grad():
            ema_update(self.student_ema, self.student, self.momentum)
            ema_update(self.head_ema, self.head, self.momentum)
            k = self.keys(lambda x: unit(self.head_ema(pooled(self.student_ema(x)))), x2)
        labels = labels.to(q.device)
        # Slots never filled hold the queue's random start vectors, keys of no image: leaving them out of
        # the candidates keeps them from pulling every embedding toward one side of the sphere early on.
        filled = self.queue_labels >= 0
        keys = torch.cat([k, self.queue.negatives()[filled]])
        positives = same_label(labels, torch.cat([labels, self.queue_labels[filled]]))
        loss = supcon_loss(q, keys, positives, self.temperature)
        self.queue.enqueue(k)
        self._enqueue_labels(labels)
        return {"loss": loss, "supcon": loss.detach(), "positives": positives.sum(dim=1).float().mean()}

    @torch.no_grad()
    def _enqueue_labels(self, labels: torch.Tensor) -> None:
        """The labels of the keys just enqueued, at the slots they will occupy (the queue's pointer now)."""
        labels = concat_all_gather(labels)
        start = int(self.queue.ptr)
        self.queue_labels[start : start + labels.shape[0]] = labels
