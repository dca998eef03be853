"""What every distillation method shares: the interface and the embedding helpers."""

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from retro_transfer.models import Student, Teacher

from ..distributed import batch_shuffle, batch_unshuffle


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a (B, C, H, W) map."""
    return feature_map.mean(dim=(2, 3))


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised, in float32 so that losses are computed at full precision."""
    return F.normalize(x.float(), dim=1)


class DistillMethod(nn.Module):
    """A student, what it learns from, and the loss.

    ``forward(x1, x2)`` takes two augmented views of one batch and returns a
    dict with the scalar ``loss`` to back-propagate and each loss term,
    detached, for logging. A method updates its own state (mean student,
    queue) inside ``forward``; the engine owns the loop, the optimiser and
    the devices.
    """

    name = "base"
    needs_teacher = True
    num_views = 2  # augmented views per image that forward() takes

    def __init__(
        self, student: Student, teacher: Optional[Teacher] = None, teacher_bn_train: bool = False, shuffle_bn: bool = True
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.teacher_bn_train = teacher_bn_train
        self.shuffle_bn = shuffle_bn
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DistillMethod":
        super().train(mode)
        # The teacher uses its running BN statistics (METHOD.md: the released
        # DisCo/Retro code's train-mode teacher is a bug, kept only as an option).
        if self.teacher is not None and not self.teacher_bn_train:
            self.teacher.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def teacher_embeddings(self, *views: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """t_i = n(H_T(T(x_i))) for each view, in one batch, without autograd."""
        with torch.inference_mode():
            t = unit(self.teacher(torch.cat(views)))
        # A clone outside inference mode is an ordinary tensor the loss can use.
        return t.clone().chunk(len(views))

    @torch.no_grad()
    def keys(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``encode(x)`` for the mean student, with MoCo's shuffling BN across processes.

        Shuffling keeps the key encoder's BN statistics from being computed on
        the same sub-batch as the query's, which would leak information.
        """
        if not self.shuffle_bn:
            return encode(x)
        shuffled, undo = batch_shuffle(x)
        return batch_unshuffle(encode(shuffled), undo)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
