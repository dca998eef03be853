"""What ``tools/train_det.py`` and ``tools/test_det.py`` share: read a config, check its inputs, run MMEngine's Runner.

Config loading, the pretrained-file check, resume and checkpoint resolution
are the MMSeg tools' own (:mod:`retro_transfer.mmseg.launch`): one code path
for both OpenMMLab toolboxes. What differs for detection is here: ``--data-root``
also moves a COCO evaluator's annotation file, the data check reads detection
annotations (a VOC split file or a COCO JSON) rather than masks, and a
checkpoint to test must fill a detector.
"""

from __future__ import annotations

import os
import os.path as osp
from typing import Iterator, Mapping, Optional

from mmengine.config import Config
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import CheckpointError, safe_load
from retro_transfer.mmseg import launch as _openmmlab
from retro_transfer.mmseg.backbones import MMSEG_FORMAT, not_converted_message
from retro_transfer.mmseg.checks import DataError, build_listed_dataset, checkpoint_to_load

# The steps shared with the segmentation tools, under the names the detection tools use.
check_pretrained = _openmmlab.check_pretrained
set_resume = _openmmlab.set_resume
resolve_checkpoint = _openmmlab.resolve_checkpoint
stopped_at = _openmmlab.stopped_at
work_dir_holds_run = _openmmlab.work_dir_holds_run

_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
_EVALUATORS = {"val_dataloader": "val_evaluator", "test_dataloader": "test_evaluator"}


def load_config(
    path: os.PathLike,
    cfg_options: Optional[Mapping] = None,
    work_dir: Optional[os.PathLike] = None,
    launcher: str = "none",
    data_root: Optional[os.PathLike] = None,
) -> Config:
    """The config with ``--cfg-options``, work dir (default ``work_dirs/<config name>``) and launcher set.

    ``data_root`` replaces every dataset's root (wrappers included) and moves
    an evaluator's ``ann_file`` that lay under the old root to the new one, so
    that COCO AP is computed against the annotations the data loader reads.
    """
    import retro_transfer.mmdet  # noqa: F401  (registers StudentBackbone; the config imports it too)

    cfg = _openmmlab.load_config(path, cfg_options, work_dir, launcher, data_root=None)
    if data_root is not None:
        set_data_root(cfg, str(data_root))
    return cfg


def _leaves(dataset: Mapping) -> Iterator[Mapping]:
    """The datasets a dataset config reads, through wrappers (Concat, Repeat, ClassBalanced...)."""
    inner = list(dataset.get("datasets") or ([dataset["dataset"]] if "dataset" in dataset else []))
    if not inner:
        yield dataset
    for child in inner:
        yield from _leaves(child)


def set_data_root(cfg: Config, data_root: str) -> None:
    """``--data-root``: every dataset reads from ``data_root``, and the evaluators' annotation files follow."""
    for loader in _LOADERS:
        if cfg.get(loader) is None:
            continue
        old_roots = {str(d.get("data_root") or "") for d in _leaves(cfg[loader].dataset)} - {""}
        for dataset in _leaves(cfg[loader].dataset):
            dataset["data_root"] = data_root
        evaluator = cfg.get(_EVALUATORS.get(loader, ""))
        for metric in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator] if evaluator else []:
            ann_file = metric.get("ann_file")
            for old in old_roots:
                if ann_file and ann_file.startswith(old):
                    metric["ann_file"] = osp.join(data_root, ann_file[len(old):].lstrip("/"))
                    break


# ---------------------------------------------------------------------- data


def _under(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _check_leaf(dataset: Mapping, where: str) -> None:
    """The folders and annotation file one dataset config names exist."""
    root = dataset.get("data_root") or ""
    if root and not osp.isdir(root):
        raise DataError(f"{where}.data_root {root} does not exist; pass --data-root DIR "
                        f"or --cfg-options {where}.data_root=DIR")
    ann_file = dataset.get("ann_file") or ""
    if ann_file and not osp.isfile(_under(root, ann_file)):
        raise DataError(f"{where}: annotation file {_under(root, ann_file)} not found (ann_file under data_root "
                        f"{root or '.'})")
    for key, folder in (dataset.get("data_prefix") or {}).items():
        if folder and not osp.isdir(_under(root, folder)):
            raise DataError(f"{where}: folder {_under(root, folder)} not found (data_prefix.{key} under data_root "
                            f"{root or '.'})")


def _build(dataset_cfg: Mapping, where: str):
    from mmdet.registry import DATASETS

    return build_listed_dataset(DATASETS, "mmdet", dataset_cfg, where)


def check_loader_data(cfg: Config, loader: str) -> int:
    """Every dataset of ``cfg[loader]`` is readable, non-empty and its images exist; returns the image count."""
    total = 0
    for index, leaf in enumerate(_leaves(cfg[loader].dataset)):
        where = f"{loader}.dataset" + (f" (dataset {index})" if leaf is not cfg[loader].dataset else "")
        _check_leaf(leaf, where)
        dataset = _build(leaf, where)
        if len(dataset) == 0:
            raise DataError(f"{where}: no images with annotations in {_under(leaf.get('data_root') or '', leaf.get('ann_file') or '')}")
        infos = [dataset.get_data_info(i) for i in range(len(dataset))]
        absent = [info["img_path"] for info in infos if not osp.isfile(info["img_path"])]
        if absent:
            raise DataError(f"{where}: {len(absent)} of {len(infos)} images do not exist; first: {absent[0]}")
        total += len(infos)
    return total


def check_data(cfg: Config, loaders) -> None:
    for loader in loaders:
        if cfg.get(loader) is not None:
            check_loader_data(cfg, loader)


# ---------------------------------------------------------------------- checkpoints


def _what_instead(ckpt: Mapping) -> str:
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
    if meta.get("format") == MMSEG_FORMAT:
        return ("it is a backbone file from tools/convert_to_openmmlab.py: train with it "
                "(model.backbone.init_cfg.checkpoint=FILE in tools/train_det.py), then test the epoch_N/iter_N.pth it writes")
    if ckpt.get("format") == DISTILL_FORMAT:
        return ("it is a distillation checkpoint: convert it with tools/convert_to_openmmlab.py, train with "
                "tools/train_det.py, then test the checkpoint it writes")
    return "use a checkpoint tools/train_det.py wrote with this config (work_dirs/<config>/epoch_N.pth or iter_N.pth)"


def check_detector_checkpoint(model, ckpt: Mapping, path: str) -> None:
    """Refuse a checkpoint that would leave tensors of the detector at their initial values, or mis-shaped.

    MMEngine loads with ``strict=False``: without this a backbone-only file
    would be evaluated as a trained detector.
    """
    model = model.module if is_model_wrapper(model) else model
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} is not a detector checkpoint (no 'state_dict'); {_what_instead(ckpt)}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if missing or wrong:
        problems = [f"{len(missing)} of its {len(expected)} tensors missing (e.g. {missing[0]})"] if missing else []
        problems += [f"{len(wrong)} shape mismatch(es) ({wrong[0]})"] if wrong else []
        raise CheckpointError(f"{path} does not fill the detector of this config: {'; '.join(problems)}; "
                              f"{_what_instead(ckpt)}")


def _runner(cfg: Config) -> Runner:
    """The Runner, once the checkpoint it will load (read with ``weights_only``) is known to fill its detector."""
    path = checkpoint_to_load(cfg)
    ckpt = safe_load(path) if path and "://" not in path else None
    runner = Runner.from_cfg(_openmmlab.name_this_run(cfg))
    if ckpt is not None:
        check_detector_checkpoint(runner.model, ckpt, path)
    return runner


def check_converted(cfg: Config) -> None:
    """Refuse, before the Runner starts, a backbone file that is not a converted (or OpenMMLab) checkpoint.

    It is read with ``weights_only`` loading, so a file that is not plain
    weights is refused here too. The backbone's strict load later checks
    every tensor; this check only saves building a Runner to learn that the
    file is a distillation or timm checkpoint that needs converting.
    """
    init_cfg = cfg.model.get("backbone", {}).get("init_cfg")
    if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained" or init_cfg.get("prefix"):
        return
    checkpoint = str(init_cfg.get("checkpoint"))
    if "://" in checkpoint:
        return
    ckpt = safe_load(checkpoint)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), Mapping) else {}
    hint = None if meta.get("format") == MMSEG_FORMAT else not_converted_message(checkpoint, ckpt)
    if hint:
        raise CheckpointError(hint)


def train(cfg: Config) -> Runner:
    """Train (validating every ``val_interval``) as the config says; returns the Runner."""
    check_pretrained(cfg)
    check_converted(cfg)
    check_data(cfg, ["train_dataloader"] + (["val_dataloader"] if cfg.get("val_cfg") else []))
    runner = _runner(cfg)
    runner.train()
    return runner


def test(cfg: Config, checkpoint: str) -> dict:
    """Evaluate ``checkpoint`` on the config's test set; returns the metrics."""
    cfg.load_from = checkpoint
    cfg.resume = False
    check_data(cfg, ["test_dataloader"])
    return dict(_runner(cfg).test())

