"""The run's numeric precision: the autocast dtype a setting means on a device, and the context that applies it.

Both the training engine and the teacher-cache builder run networks under it,
and must agree: a cache's embeddings are valid for a run only when they were
computed under the same autocast as its steps would compute them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from .config import ConfigError


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision. ``auto``: bf16 on a capable GPU."""
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device_type: str, autocast_dtype: Optional[torch.dtype]):
    """Autocast to ``autocast_dtype``, or nothing for full precision."""
    return torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
