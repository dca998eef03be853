"""The loss terms of the distillation methods, as small pure functions.

All embeddings passed in are already L2-normalised. ``queue`` is (K, D).

Every loss is computed in float32 with autocast off, whatever precision the
networks ran in: under bf16 autocast ``q @ queue.t()`` would otherwise run in
bf16 (8 bits of mantissa), and dividing by a small temperature turns that
rounding into large logit errors (SEED's teacher logits at tau_T = 0.01 move by
up to 0.3; at the released code's 1e-4, by up to 25).
"""

import functools

import torch
import torch.nn.functional as F


def full_precision(fn):
    """Run ``fn`` with autocast disabled and its tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next(a for a in args if torch.is_tensor(a)).device.type
        with torch.autocast(device_type, enabled=False):
            return fn(*(a.float() if torch.is_tensor(a) else a for a in args), **kwargs)

    return wrapper


@full_precision
def similarity_logits(x: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[x.positive, x.queue^T] / tau``: (B, 1 + K) logits with the positive pair at index 0."""
    return torch.cat([(x * positive).sum(dim=1, keepdim=True), x @ queue.t()], dim=1) / temperature


@full_precision
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al., 2020, eq. 1): the positive ``k`` against ``queue`` negatives.

    logits = [q.k, q.queue^T] / tau, cross-entropy with the positive at index 0,
    averaged over the batch.
    """
    logits = similarity_logits(q, k, queue, temperature)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@full_precision
def seed_loss(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, tau_student: float, tau_teacher: float) -> torch.Tensor:
    """SEED (Fang et al., 2021, eq. 4): soft cross-entropy between similarity distributions.

    Both the student embedding ``s`` and the teacher embedding ``t`` are
    compared with [t; queue]; the teacher's softmax (temperature tau_T) is the
    target for the student's log-softmax (temperature tau_S).
    """
    target = F.softmax(similarity_logits(t, t, queue, tau_teacher), dim=1)
    return -(target * F.log_softmax(similarity_logits(s, t, queue, tau_student), dim=1)).sum(dim=1).mean()


@full_precision
def consistency_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DisCo's / Retro's consistency term: the squared L2 distance between embeddings, per image.

    Summed over embedding dimensions and averaged over the batch. The released
    DisCo code sums over the batch too (``MSELoss(reduction='sum')`` on each
    GPU's 32 images); that is this mean weighted by 32, which the methods'
    ``mse_weight`` expresses without tying the weight to the per-process batch.
    """
    return (student - teacher).pow(2).sum(dim=1).mean()


def same_label(labels: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask: key n carries anchor b's label. A negative key label (an unfilled queue slot) matches nothing."""
    return (labels[:, None] == key_labels[None, :]) & (key_labels[None, :] >= 0)


@full_precision
def supcon_loss(q: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, eq. 2, "L_out"), with MoCo's keys as candidates.

        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(q_i.k_p / tau) / sum_{a in A(i)} exp(q_i.k_a / tau) )

    A(i) is every row of ``keys`` (the batch's keys, then the queue), P(i) the
    keys ``positives[i]`` marks (the same class, the anchor's own second view
    among them). Averaged over the anchors that have a positive; 0 when none has.
    """
    log_prob = F.log_softmax(q @ keys.t() / temperature, dim=1)
    count = positives.sum(dim=1)
    per_anchor = -(positives * log_prob).sum(dim=1) / count.clamp_min(1)
    has_positive = count > 0
    if not has_positive.any():
        return log_prob.sum() * 0.0  # keeps the graph, so that backward still runs
    return per_anchor[has_positive].mean()
