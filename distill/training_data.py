"""A run's training data as the config names it: the checked image list and its augmented views.

:mod:`distill.data` holds the pieces (listing, checking, decoding, augmenting,
sampling); this module puts them together for a config, with the method's
needs (labels, views) and the processes' share of the checks. The training
engine and the teacher-cache builder both call it, so that a cache is built
from exactly the images and views the run will draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

from . import distributed as dist_utils
from .config import Config, ConfigError, check_queue_against_data
from .data import MultiViewImages, check_batch_fits, decode_all, folder_labels, list_images, moco_v2_augmentation, unreadable_images
from .methods import METHODS


def training_images(cfg: Config, views: int) -> List[Path]:
    """The training image files, checked before anything is written: headers, one batch, the queue."""
    files = list_images(cfg.data.train_dir)
    bad = _unreadable_images_in_all_processes(files)
    if bad and not cfg.data.skip_bad_images:
        shown = ", ".join(str(path) for path, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ConfigError(
            f"{len(bad)} of {len(files)} files in data.train_dir are not readable images: {shown} "
            f"(first: {bad[0][1]}); delete or replace them, or set data.skip_bad_images=true to train without them"
        )
    main = dist_utils.is_main_process()
    if bad:
        skipped = {path for path, _ in bad}
        files = [path for path in files if path not in skipped]
        if main:
            total = len(files) + len(bad)
            print(f"data.skip_bad_images=true: skipped {len(bad)} unreadable image file(s) of {total}, e.g. {bad[0][0]}")
    check_batch_fits(len(files), cfg.train.batch_size, dist_utils.world_size())
    if METHODS[cfg.method].needs_labels:
        _, classes = folder_labels(cfg.data.train_dir, files)  # refused here, before anything is written
        if main:
            print(f"{cfg.method} trains on labels: {len(classes)} classes from the class folders of {cfg.data.train_dir}")
    warning = check_queue_against_data(cfg, len(files), views)
    if warning and main:
        print(warning)
    return files


def _unreadable_images_in_all_processes(files: List[Path]) -> List[Tuple[Path, str]]:
    """:func:`unreadable_images` of ``files``: each process checks its share and all get the whole answer.

    A header takes a fraction of a millisecond to read: minutes for ImageNet's 1.28 M files in one process.
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    bad = unreadable_images(files[rank::world])
    if world == 1:
        return bad
    shares = [None] * world
    torch.distributed.all_gather_object(shares, bad)
    return sorted(found for share in shares for found in share)


def training_dataset(cfg: Config, files: List[Path], views: int) -> MultiViewImages:
    """The run's augmented views of ``files``: decoded once in memory when the set is small enough, else read per sample."""
    decoded = decode_all(files, cfg.data.in_memory_mb)
    if dist_utils.is_main_process():
        where = (
            f"decoded once, {sum(t.numel() for t in decoded) / 2**20:.0f} MiB in memory"
            if decoded is not None
            else f"read from disk per sample (more than data.in_memory_mb={cfg.data.in_memory_mb} MiB decoded)"
        )
        print(f"data: {len(files)} images in {cfg.data.train_dir}, {where}", flush=True)
    augmentation = moco_v2_augmentation(cfg.data.image_size, cfg.data.crop_min_scale)
    labels = folder_labels(cfg.data.train_dir, files)[0] if METHODS[cfg.method].needs_labels else None
    return MultiViewImages(files, augmentation, views, cfg.seed, decoded, labels)
