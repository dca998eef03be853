"""Checks a segmentation run makes before MMEngine's Runner starts: its data, and the checkpoint it loads.

MMSeg trusts both. A mask whose size differs from its image is resized away
by the pipeline and trains silently; label values beyond the classes, a
missing folder or split file end in a traceback from a data-loader worker,
often after the model was built; and the Runner loads a checkpoint with
``strict=False``, so one that fills nothing of the segmentor is evaluated as
if it were trained. Each problem here is one line naming the file.
"""

from __future__ import annotations

import os
import os.path as osp
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.model import is_model_wrapper
from PIL import Image, UnidentifiedImageError

from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import CheckpointError

from .backbones import MMSEG_FORMAT

IGNORE_INDEX = 255  # MMSeg's default ignore_index, and VOC's "void"
_MASK_MODES = ("L", "P", "I", "I;16")


class DataError(ValueError):
    """A data folder, split file, image or mask a config needs is missing or unusable; the message names it."""


# ---------------------------------------------------------------------- data


def _under(root: str, path: str) -> str:
    """A config path as MMEngine resolves it: under ``data_root`` unless absolute."""
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _check_paths(dataset: Mapping, where: str) -> None:
    """The data root, image and mask folders and split file a dataset config names exist."""
    root = dataset.get("data_root") or ""
    if root and not osp.isdir(root):
        raise DataError(f"{where}.data_root {root} does not exist; pass --data-root DIR (tools/train_seg.py) "
                        f"or --cfg-options {where}.data_root=DIR")
    for key, what in (("img_path", "image folder"), ("seg_map_path", "mask folder")):
        folder = (dataset.get("data_prefix") or {}).get(key)
        if folder is not None and not osp.isdir(_under(root, folder)):
            raise DataError(f"{where}: {what} {_under(root, folder)} not found (data_prefix.{key} under data_root "
                            f"{root or '.'})")
    ann_file = dataset.get("ann_file") or ""
    if ann_file and not osp.isfile(_under(root, ann_file)):
        raise DataError(f"{where}: split file {_under(root, ann_file)} not found (ann_file under data_root "
                        f"{root or '.'}); it lists one image name per line")


def _label_values(mask: Image.Image) -> np.ndarray:
    """The distinct values of a label map (a histogram for 8-bit maps: no array copy)."""
    if mask.mode in ("L", "P"):
        return np.flatnonzero(np.asarray(mask.histogram()[:256]))
    return np.unique(np.asarray(mask))


def _effective(values: np.ndarray, reduce_zero_label: bool, label_map: Optional[Mapping]) -> np.ndarray:
    """What MMSeg's ``LoadAnnotations`` turns raw mask values into (zero reduced, then class map applied)."""
    out = values.astype(np.int64)
    if reduce_zero_label:
        out = np.where(out == 0, IGNORE_INDEX, np.where(out == IGNORE_INDEX, IGNORE_INDEX, out - 1))
    if label_map:
        out = np.array([label_map.get(int(v), int(v)) for v in out], dtype=np.int64)
    return out


def _check_sample(info: Mapping, num_classes: int) -> Optional[str]:
    """Why one image/mask pair cannot be trained on, or None."""
    img_path, seg_path = info["img_path"], info.get("seg_map_path")
    try:
        with Image.open(img_path) as image:
            size = image.size  # read from the header; nothing is decoded
    except FileNotFoundError:
        return f"image {img_path} does not exist"
    except (UnidentifiedImageError, OSError) as e:
        return f"{img_path} is not a readable image ({e})"
    if seg_path is None:
        return None
    try:
        with Image.open(seg_path) as mask:
            if mask.mode not in _MASK_MODES:
                return (f"mask {seg_path} is a {mask.mode} image; a label map is a single-channel PNG of class "
                        "indices (palette or greyscale)")
            if mask.size != size:
                return (f"mask {seg_path} is {mask.size[0]}x{mask.size[1]} but its image {img_path} is "
                        f"{size[0]}x{size[1]}")
            raw = _label_values(mask)
    except FileNotFoundError:
        return f"mask {seg_path} (for {img_path}) does not exist"
    except (UnidentifiedImageError, OSError) as e:
        return f"{seg_path} is not a readable mask ({e})"
    values = _effective(raw, bool(info.get("reduce_zero_label")), info.get("label_map"))
    bad = sorted({int(r) for r, v in zip(raw, values) if not (0 <= v < num_classes or v == IGNORE_INDEX)})
    if bad:
        return (f"mask {seg_path} has label value(s) {', '.join(map(str, bad[:6]))} outside the {num_classes} classes "
                f"(0..{num_classes - 1}, and {IGNORE_INDEX} = ignore)")
    return None


def build_listed_dataset(registry, scope: str, dataset_cfg: Mapping, where: str):
    """The dataset ``dataset_cfg`` describes, without its transforms (listing the samples needs none).

    Built in ``scope`` (``mmseg``, ``mmdet``) whatever the process's default
    scope: a run of the other toolbox in this process (a pipeline stage, a
    test) leaves its own behind, and the dataset type would not be found.
    A folder or annotation file that cannot be read is a one-line DataError.
    """
    from mmengine.registry import DefaultScope

    cfg = ConfigDict(dict(dataset_cfg))
    cfg.pipeline = []
    try:
        with DefaultScope.overwrite_default_scope(scope):
            return registry.build(cfg)
    except Exception as e:  # a bad folder or file surfaces as AssertionError, FileNotFoundError, KeyError, ParseError...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where} ({cfg.get('type')}) cannot be read: {detail}") from None


def _build(dataset_cfg: Mapping, where: str):
    from mmseg.registry import DATASETS

    return build_listed_dataset(DATASETS, "mmseg", dataset_cfg, where)


def check_loader_data(cfg: Config, loader: str, workers: int = 8) -> int:
    """Check every sample of ``cfg[loader]``'s dataset; returns how many there are.

    Image sizes are read from file headers; masks are decoded once to see
    their label values (threads overlap the decoding; on Cityscapes this is
    tens of seconds, paid once before a run of hours).
    """
    dataset_cfg = cfg[loader]["dataset"]
    where = f"{loader}.dataset"
    _check_paths(dataset_cfg, where)
    dataset = _build(dataset_cfg, where)
    if len(dataset) == 0:
        prefix = dict(dataset_cfg.get("data_prefix") or {})
        raise DataError(
            f"{where}: no images found under data_root {dataset_cfg.get('data_root') or '.'} (data_prefix {prefix}, "
            f"ann_file {dataset_cfg.get('ann_file') or 'none'}, img_suffix {getattr(dataset, 'img_suffix', '?')})"
        )
    num_classes = len(dataset.metainfo["classes"])
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        problems = [p for p in pool.map(lambda info: _check_sample(info, num_classes), infos) if p]
    if problems:
        raise DataError(f"{where}: {len(problems)} of {len(infos)} samples are unusable; first: {problems[0]}")
    return len(infos)


def check_data(cfg: Config, loaders: Iterable[str]) -> None:
    """:func:`check_loader_data` for each named data loader the config has."""
    for loader in loaders:
        if cfg.get(loader) is not None:
            check_loader_data(cfg, loader)


# ---------------------------------------------------------------------- checkpoints


def _first(keys: Sequence[str], n: int = 4) -> str:
    return ", ".join(list(keys)[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _not_a_segmentor(ckpt: Mapping) -> str:
    """The words that say which kind of file was passed instead of a segmentor checkpoint."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
    if meta.get("format") == MMSEG_FORMAT:
        return ("it is a backbone file from tools/convert_to_mmseg.py: train with it "
                "(model.backbone.init_cfg.checkpoint=FILE in tools/train_seg.py), then use the iter_N.pth it writes")
    if ckpt.get("format") == DISTILL_FORMAT:
        return ("it is a distillation checkpoint: convert it with tools/convert_to_mmseg.py, train with "
                "tools/train_seg.py, then use the iter_N.pth it writes")
    return "use a checkpoint tools/train_seg.py wrote with this config (work_dirs/<config>/iter_N.pth)"


def check_segmentor_checkpoint(model: nn.Module, ckpt: Mapping, path: str) -> None:
    """Refuse a checkpoint that would leave tensors of ``model`` at their initial values, or mis-shaped.

    MMEngine loads with ``strict=False``, so without this a backbone-only or
    distillation file is evaluated as a (random) trained model. Keys are
    compared as MMEngine loads them (a ``module.`` prefix dropped); extra
    tensors in the file are allowed (e.g. an auxiliary head the test config omits).
    """
    model = model.module if is_model_wrapper(model) else model
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} is not a segmentor checkpoint (no 'state_dict'; top-level keys "
                              f"{_first(list(ckpt))}); {_not_a_segmentor(ckpt)}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if missing or wrong:
        problems = [f"{len(missing)} of its {len(expected)} tensors missing ({_first(missing)})"] if missing else []
        problems += [f"{len(wrong)} shape mismatch(es) ({'; '.join(wrong[:2])})"] if wrong else []
        raise CheckpointError(f"{path} does not fill the model of this config: {'; '.join(problems)}; "
                              f"{_not_a_segmentor(ckpt)}")


def checkpoint_to_load(cfg: Config) -> Optional[str]:
    """The file the Runner will load for this config: ``load_from``, or the latest one when resuming."""
    if cfg.get("load_from"):
        return str(cfg.load_from)
    if cfg.get("resume"):
        from mmengine.runner import find_latest_checkpoint

        return find_latest_checkpoint(cfg.work_dir)
    return None
