"""Data sets and evaluators for the detection recipes.

Pascal VOC 2007/2012 and COCO are Detectron2's built-in names
(``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``,
``coco_2017_train``, ``coco_2017_val``...), registered by Detectron2 itself
under ``$DETECTRON2_DATASETS``; this module checks they are there before a run
starts. The project's shapes data (``tools/make_shapes.py``) is registered as
``shapes_voc_{train,val,trainval,test}``: it is written in the VOC layout, so
Detectron2's own VOC loader and evaluator read it.
"""

import os
from pathlib import Path
from typing import Iterable, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator

from ..data.shapes import CLASSES, VOC_DIRNAME

SHAPES_SPLITS = ("train", "val", "trainval", "test")
SHAPES_PREFIX = "shapes_voc_"


class DatasetError(ValueError):
    """A data set a config names is unknown or not on disk; the message says where it was looked for."""


def register_shapes(root: os.PathLike) -> List[str]:
    """Register the shapes data at ``root`` (the folder holding ``VOC2007/``); returns the names.

    Registering again (another root, or the same in a second run in one
    process) replaces the earlier entries.
    """
    root = Path(root).expanduser()
    classes_file = root / "classes.txt"
    classes = classes_file.read_text().split() if classes_file.is_file() else list(CLASSES)
    names = []
    for split in SHAPES_SPLITS:
        name = SHAPES_PREFIX + split
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_pascal_voc(name, str(root / VOC_DIRNAME), split, 2007, classes)
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        names.append(name)
    return names


def _where(name: str) -> List[str]:
    """The files a registered data set reads first; empty when its kind is not known here."""
    meta = MetadataCatalog.get(name)
    kind = getattr(meta, "evaluator_type", None)
    if kind == "pascal_voc":
        return [os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")]
    if kind == "coco":
        return [meta.json_file, meta.image_root]
    return []


def check_datasets(names: Iterable[str]) -> None:
    """Fail before training when a data set is unknown or missing on disk, saying where it was expected."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            known = sorted(n for n in registered if n.startswith(("voc_", "coco_2017", SHAPES_PREFIX)))
            raise DatasetError(f"unknown data set {name!r}; known here: {', '.join(known)}")
        missing = [p for p in _where(name) if not os.path.exists(p)]
        if not missing:
            continue
        if name.startswith(SHAPES_PREFIX):
            raise DatasetError(
                f"data set {name}: {missing[0]} not found; generate it with "
                "`python tools/make_shapes.py --out DIR` and pass DATASETS.SHAPES_ROOT DIR"
            )
        env = os.environ.get("DETECTRON2_DATASETS")
        raise DatasetError(
            f"data set {name}: {missing[0]} not found. Detectron2 reads data sets under $DETECTRON2_DATASETS "
            f"({'now ' + env if env else 'unset, so ./datasets'}), which must hold VOC2007/, VOC2012/ and coco/ "
            "in their official layouts"
        )


def build_evaluator(name: str, output_dir: str) -> DatasetEvaluator:
    """VOC-style AP/AP50/AP75 for VOC layouts (VOC 2007 uses the 11-point metric), COCO AP for COCO."""
    kind = getattr(MetadataCatalog.get(name), "evaluator_type", None)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(name)
    if kind == "coco":
        # Detectron2's fast COCO evaluator is compiled code this install lacks.
        return COCOEvaluator(name, output_dir=output_dir, use_fast_impl=False)
    raise DatasetError(f"no evaluator for data set {name!r} (evaluator_type {kind!r}); use a VOC or COCO data set")
