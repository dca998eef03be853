"""What every distillation method shares: the interface and the embedding helpers."""

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from retro_transfer.models import Student, Teacher

from ..config import Config
from ..distributed import batch_shuffle, batch_unshuffle, is_distributed
from ..losses import full_precision


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a (B, C, H, W) map."""
    return feature_map.mean(dim=(2, 3))


@full_precision
def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised, in float32 with autocast off, so that losses are computed at full precision."""
    return F.normalize(x, dim=1)


def embed_views(teacher: Teacher, *views: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """n(H_T(T(x))) of each view, run as one batch without autograd: what a step, and the teacher cache, compute.

    One batch is exact only for a teacher on running BN statistics, whose
    output for an image does not depend on the rest of the batch.
    """
    with torch.inference_mode():
        t = unit(teacher(torch.cat(views)))
    # A clone outside inference mode is an ordinary tensor the loss can use.
    return t.clone().chunk(len(views))


def embed_each_view(teacher: Teacher, *views: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """n(H_T(T(x))) of each view, one teacher call per view, the last view first.

    What the released DisCo code does with its train-mode teacher: its builder
    calls the teacher on the key view (x2) and then on the query view (x1), so
    BN normalises each view with that view's own batch statistics and updates
    its running statistics twice a step, in that order.
    """
    with torch.inference_mode():
        last_first = [unit(teacher(view)) for view in reversed(views)]
    return tuple(t.clone() for t in reversed(last_first))


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
    needs_labels = False  # forward(x1, x2, labels): only teacher recipes (supcon); students never see labels

    def __init__(
        self,
        student: Student,
        teacher: Optional[Teacher] = None,
        teacher_bn_train: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.teacher_bn_train = teacher_bn_train
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
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

    @classmethod
    def from_config(cls, cfg: Config, student: Student, teacher: Optional[Teacher], bn_splits: int) -> "DistillMethod":
        """The method a run's config describes, around ``student`` and ``teacher`` (None for a method without one).

        Each method reads the keys it has; ``bn_splits`` is the engine's
        resolved split-BN count (it depends on the process count).
        """
        raise NotImplementedError  # pragma: no cover

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def monitored_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Features the online k-NN monitor scores: the student's pooled backbone features."""
        return {"backbone": pooled(self.student(x))}

    def teacher_embeddings(self, *views: torch.Tensor, cached: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
        """t_i = n(H_T(T(x_i))) for each view: ``cached`` when the engine read them from a teacher cache, else computed.

        A teacher on batch statistics (``teacher_bn_train``) runs once per view,
        as the released code does; one concatenated batch would normalise over
        both views and update the running statistics once (METHOD.md, issue 24).
        """
        if cached is not None:
            return tuple(cached)
        embed = embed_each_view if self.teacher_bn_train else embed_views
        return embed(self.teacher, *views)

    @torch.no_grad()
    def keys(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``encode(x)`` for the mean student, its BN statistics kept apart from the query's.

        With the query and key encoders normalising over the same samples, BN
        statistics would leak which samples share a batch (He et al., 2020,
        section 3.3). Across processes: MoCo's shuffling BN. In one process
        with ``bn_splits > 1``: MoCo's split BN, the batch shuffled and encoded
        as ``bn_splits`` sub-batches, each normalised with its own statistics
        as one of that many processes would. The mean student's BN running
        statistics are then updated once per sub-batch; no loss reads them.
        """
        if not self.shuffle_bn:
            return encode(x)
        if is_distributed():
            shuffled, undo = batch_shuffle(x)
            return batch_unshuffle(encode(shuffled), undo)
        if self.bn_splits == 1:
            return encode(x)
        order = torch.randperm(x.shape[0]).to(x.device)  # the global generator: saved with checkpoints
        encoded = torch.cat([encode(part) for part in x[order].chunk(self.bn_splits)])
        return encoded[torch.argsort(order)]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
