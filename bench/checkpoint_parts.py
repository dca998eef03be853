#!/usr/bin/env python
"""What a distillation checkpoint's bytes are: the file's size, and MiB per part of it.

    python bench/checkpoint_parts.py runs/distill/shapes_retro_effb0/checkpoint_last.pth

Parts: each top-level module of the model (student, its mean copy, teacher,
adapter, heads, queue), the optimiser's state (SGD momentum) and the rest.
Sizes are those of the tensors (elements x bytes each); the file adds a little
for names and structure.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch

from retro_transfer.safe_io import safe_load

MIB = 2**20


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested dict / list."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def parts(ckpt: dict) -> dict:
    """MiB per part: ``model.<module>`` for each top-level module, ``optimizer``, and ``other``."""
    sizes = defaultdict(int)
    for name, tensor in ckpt["model"].items():
        sizes[f"model.{name.split('.')[0]}"] += tensor_bytes(tensor)
    sizes["optimizer"] = tensor_bytes(ckpt.get("optimizer", {}))
    sizes["other"] = tensor_bytes({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")})
    return {name: size / MIB for name, size in sizes.items()}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("usage: checkpoint_parts.py CHECKPOINT (a distillation checkpoint file)", file=sys.stderr)
        return 2
    path = Path(args[0])
    print(f"{path}: {path.stat().st_size / MIB:.1f} MiB")
    for name, mib in sorted(parts(safe_load(path)).items(), key=lambda item: -item[1]):
        print(f"  {name:24s} {mib:8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
