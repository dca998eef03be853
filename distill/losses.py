"""The loss terms of the distillation methods, as small pure functions.

All embeddings passed in are already L2-normalised. ``queue`` is (K, D).
"""

import torch
import torch.nn.functional as F

MSE_REDUCTIONS = ("batch_mean", "sum")


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al., 2020, eq. 1): the positive ``k`` against ``queue`` negatives.

    logits = [q.k, q.queue^T] / tau, cross-entropy with the positive at index 0,
    averaged over the batch.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def seed_loss(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, tau_student: float, tau_teacher: float) -> torch.Tensor:
    """SEED (Fang et al., 2021, eq. 4): soft cross-entropy between similarity distributions.

    Both the student embedding ``s`` and the teacher embedding ``t`` are
    compared with [t; queue]; the teacher's softmax (temperature tau_T) is the
    target for the student's log-softmax (temperature tau_S).
    """
    anchors_s = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ queue.t()], dim=1) / tau_student
    anchors_t = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ queue.t()], dim=1) / tau_teacher
    target = F.softmax(anchors_t, dim=1)
    return -(target * F.log_softmax(anchors_s, dim=1)).sum(dim=1).mean()


def consistency_mse(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "batch_mean") -> torch.Tensor:
    """DisCo's / Retro's consistency term: squared L2 distance between embeddings.

    Summed over embedding dimensions; ``batch_mean`` averages over the batch
    (the faithful reading of the papers), ``sum`` also sums over the batch
    (what the released DisCo code computes with ``MSELoss(reduction='sum')``).
    """
    per_sample = (student - teacher).pow(2).sum(dim=1)
    if reduction == "batch_mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"unknown mse reduction {reduction!r}; choose one of {', '.join(MSE_REDUCTIONS)}")
