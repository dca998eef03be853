"""A FIFO queue of embeddings shared by all processes (MoCo's dictionary)."""

from typing import Optional

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

    A step scores its queries against :meth:`negatives` and then calls
    :meth:`enqueue`. Backward still needs the negatives the step scored
    against, so the new keys are written into the buffer only when the queue
    is next read (the next step's :meth:`negatives`, or a ``state_dict``):
    no step copies the queue (32 MiB at K = 65536), as MoCo's ``clone()`` does.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator = None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._pending: Optional[torch.Tensor] = None

    def negatives(self) -> torch.Tensor:
        """The queue as it stands after every earlier step's keys, without a copy."""
        self._write_pending()
        return self.embeddings

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Add this step's keys (all processes' keys, in rank order); written at the next read."""
        keys = concat_all_gather(keys.detach())
        if self.size % keys.shape[0] != 0:
            raise ValueError(f"queue size {self.size} must be a multiple of the global batch size {keys.shape[0]}")
        self._write_pending()
        self._pending = keys

    @torch.no_grad()
    def _write_pending(self) -> None:
        if self._pending is None:
            return
        keys, self._pending = self._pending, None
        n, ptr = keys.shape[0], int(self.ptr)
        self.embeddings[ptr : ptr + n] = keys.to(self.embeddings.dtype)
        self.ptr.fill_((ptr + n) % self.size)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._write_pending()  # a checkpoint holds every key enqueued so far
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._pending = None  # keys of a step before the restored state do not belong to it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
