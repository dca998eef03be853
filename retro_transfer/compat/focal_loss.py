"""Sigmoid focal loss in pure PyTorch, with mmcv's ``sigmoid_focal_loss`` signature."""

from typing import Optional

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017, eq. 5) on logits ``(N, C)`` and class indices ``(N,)``.

    As in mmcv's kernel, ``target == C`` is background (negative for every
    class) and ``weight``, if given, is a per-class weight indexed by target.
    """
    num_classes = input.size(1)
    one_hot = F.one_hot(target.clamp(max=num_classes), num_classes + 1)[:, :num_classes].to(input.dtype)
    p = input.sigmoid()
    ce = F.binary_cross_entropy_with_logits(input, one_hot, reduction="none")
    p_t = p * one_hot + (1 - p) * (1 - one_hot)
    alpha_t = alpha * one_hot + (1 - alpha) * (1 - one_hot)
    loss = alpha_t * (1 - p_t).pow(gamma) * ce
    if weight is not None:
        loss = loss * weight[target.clamp(max=weight.numel() - 1)].unsqueeze(1)
    if reduction == "mean":
        return loss.sum() / input.size(0)
    if reduction == "sum":
        return loss.sum()
    return loss
