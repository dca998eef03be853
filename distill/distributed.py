"""Process-group helpers that degrade to no-ops in a single process."""

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns True when running distributed. gloo on CPU, nccl on GPU.
    ``torchrun --nnodes`` needs nothing more: RANK/WORLD_SIZE are global.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0, in rank order (no gradient)."""
    if not is_distributed():
        return tensor
    # Contiguous buffers and input: ``empty_like`` would copy a channels_last
    # layout, and NCCL's all_gather writes raw row-major bytes into it.
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Shuffle a batch across ranks (MoCo's shuffling BN, He et al., 2020, section 3.3).

    Returns this rank's share of the shuffled global batch and the index that
    undoes it. In one process there is nothing to shuffle across, so the batch
    comes back unchanged with ``None`` (one process uses split BN instead:
    ``DistillMethod.keys``).
    """
    if not is_distributed():
        return x, None
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    undo = torch.argsort(perm).view(world_size(), -1)[rank()]
    return x_all[perm.view(world_size(), -1)[rank()]], undo


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, undo: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle` for the key encoder's output."""
    if undo is None:
        return x
    return concat_all_gather(x)[undo]
