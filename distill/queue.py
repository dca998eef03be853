"""A FIFO queue of embeddings shared by all processes (MoCo's dictionary)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import concat_all_gather


class EmbeddingQueue(nn.Module):
    """K L2-normalised D-dim embeddings, oldest overwritten first.

    The queue lives in buffers so it is saved in checkpoints. Every process
    enqueues the all-gathered batch, so all queues stay identical. Initialised
    with random unit vectors, as MoCo does (not from a teacher checkpoint: that
    is a bug of the released Retro code).
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator = None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> torch.Tensor:
        """A copy to compute with: the queue itself is updated in place after the loss."""
        return self.embeddings.clone().detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys.detach())
        n = keys.shape[0]
        if self.size % n != 0:
            raise ValueError(f"queue size {self.size} must be a multiple of the global batch size {n}")
        ptr = int(self.ptr)
        self.embeddings[ptr : ptr + n] = keys.to(self.embeddings.dtype)
        self.ptr.fill_((ptr + n) % self.size)
