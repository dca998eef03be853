"""Data sets and evaluators for the detection recipes, with their annotations checked on first load.

Pascal VOC 2007/2012 and COCO are Detectron2's built-in names
(``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``,
``coco_2017_train``, ``coco_2017_val``...), registered by Detectron2 itself
under ``$DETECTRON2_DATASETS``; this module checks they are there before a run
starts. The project's shapes data (``tools/make_shapes.py``) is registered as
``shapes_voc_{train,val,trainval,test}`` (its VOC layout, boxes, scored by
Detectron2's VOC evaluator) and ``shapes_coco_{train,val,test}`` (the same
images with COCO instance masks, for Mask R-CNN, scored by ``COCOEvaluator``).

Detectron2's own loaders trust the annotations: its data mapper clips a box
that reaches past its image, or drops it, without a word, and a class name
missing from the class list is a bare ``ValueError`` from ``list.index``. The
loaders here return the same records but check every annotation as they read
it, and :func:`check_datasets` puts them in place of Detectron2's for the
built-in names too. A box reaching past its image is clipped and counted in a
warning; a box with no area inside its image or a coordinate that is not a
number, an unknown class, a missing file or a VOC ``<size>`` that is not the
image's is a :class:`DatasetError` naming the file. :func:`training_records`
checks, before training, that the training images hold objects and at least
one batch of them (Detectron2 asserts on the first and waits forever on the
second).
"""

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import load_coco_json
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from PIL import Image

from ..data.shapes import CLASSES, COCO_DIRNAME, COCO_SPLITS, VOC_DIRNAME, ShapesConfig

log = logging.getLogger(__name__)

SHAPES_SPLITS = ("train", "val", "trainval", "test")
SHAPES_PREFIX = "shapes_voc_"
SHAPES_COCO_PREFIX = "shapes_coco_"
VOC_FOLDERS = ("Annotations", "JPEGImages")


class DatasetError(ValueError):
    """A data set a config names is unknown, not on disk or wrongly annotated; the message names the file."""


def shapes_classes(root: os.PathLike) -> List[str]:
    """The class names of the shapes data at ``root`` (its ``classes.txt``; the generator's when absent)."""
    classes_file = Path(root).expanduser() / "classes.txt"
    return classes_file.read_text().split() if classes_file.is_file() else list(CLASSES)


def shapes_image_side(root: os.PathLike) -> int:
    """The side of the shapes images at ``root``, from the first annotation (the generator's default if unreadable).

    A folder that is not there is reported by :func:`check_datasets`, with the
    command that makes it; this only has to give a size meanwhile.
    """
    voc = Path(root).expanduser() / VOC_DIRNAME
    try:
        first = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
        return int(ET.parse(voc / "Annotations" / f"{first}.xml").findtext("size/width"))
    except (OSError, IndexError, ET.ParseError, TypeError, ValueError):
        return ShapesConfig().size


def register_shapes(root: os.PathLike) -> List[str]:
    """Register the shapes data at ``root`` (the folder holding ``VOC2007/``); returns the names.

    :func:`~retro_transfer.d2.load_config` calls this with the config's
    ``DATASETS.SHAPES_ROOT``. Registering again (another root, or the same in
    a second run in one process) replaces the earlier entries.
    """
    root = Path(root).expanduser()
    classes = shapes_classes(root)
    names = []
    for split in SHAPES_SPLITS:
        names.append(_unregister(SHAPES_PREFIX + split))
        register_voc(names[-1], str(root / VOC_DIRNAME), split, classes)
    for split in COCO_SPLITS:
        names.append(_unregister(SHAPES_COCO_PREFIX + split))
        json_file = root / COCO_DIRNAME / f"instances_{split}.json"
        register_coco(names[-1], str(json_file), str(root / VOC_DIRNAME / "JPEGImages"), classes)
    return names


def _unregister(name: str) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    return name


def register_voc(name: str, dirname: str, split: str, classes: Sequence[str], year: int = 2007) -> None:
    """As Detectron2's ``register_pascal_voc`` (same metadata), read by the checked :func:`load_voc`."""
    DatasetCatalog.register(name, partial(load_voc, dirname, split, tuple(classes), name))
    MetadataCatalog.get(name).set(
        thing_classes=list(classes), dirname=dirname, year=year, split=split, evaluator_type="pascal_voc"
    )


def register_coco(name: str, json_file: str, image_root: str, classes: Sequence[str]) -> None:
    """As Detectron2's ``register_coco_instances``, read by the checked :func:`load_coco`.

    The classes are those of the file's categories, ids 1..N in order; the
    metadata says so up front, so an evaluator built before the data set is
    read finds it.
    """
    DatasetCatalog.register(name, partial(load_coco, json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", thing_classes=list(classes),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(classes))},
    )


# --------------------------------------------------------------------------- checked loading


@dataclass
class _BoxCheck:
    """Boxes clipped to their image, and boxes with no area inside it, for one data set."""

    name: str
    clipped: int = 0
    first_clipped: str = ""
    outside: List[str] = field(default_factory=list)
    not_numbers: List[str] = field(default_factory=list)

    def clip(self, box: Sequence[float], width: int, height: int, where: str) -> List[float]:
        """``[x0, y0, x1, y1]`` clipped to the image; remembers what it changed or cannot keep.

        A zero-size box is left as it is (Detectron2's mapper drops it); an
        inverted box, or one that does not overlap its image, is refused.
        """
        x0, y0, x1, y1 = box
        if not all(math.isfinite(v) for v in box):  # nan passes every comparison below as "inside"
            self.not_numbers.append(f"{where} [{x0:g}, {y0:g}, {x1:g}, {y1:g}]")
            return list(box)
        clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                   min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        described = f"{where} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] in a {width}x{height} image"
        inverted = x1 < x0 or y1 < y0
        off_image = x1 > x0 and y1 > y0 and (clipped[2] <= clipped[0] or clipped[3] <= clipped[1])
        if inverted or off_image:
            self.outside.append(described)
        elif clipped != [x0, y0, x1, y1]:
            self.clipped += 1
            self.first_clipped = self.first_clipped or described
        return clipped

    def report(self) -> None:
        """Raise for boxes that cannot be kept; warn, with a count, about clipped ones."""
        if self.not_numbers:
            raise DatasetError(
                f"data set {self.name}: {len(self.not_numbers)} box(es) have a coordinate that is not a finite number "
                f"(first: {self.not_numbers[0]}); fix or delete these objects"
            )
        if self.outside:
            raise DatasetError(
                f"data set {self.name}: {len(self.outside)} box(es) have no area inside their image "
                f"(first: {self.outside[0]}); fix or delete these objects"
            )
        if self.clipped:
            log.warning("data set %s: clipped %d box(es) reaching past their image to its border (first: %s)",
                        self.name, self.clipped, self.first_clipped)


def _voc_size(tree: ET.ElementTree, xml: str) -> Tuple[int, int]:
    try:
        return int(tree.findtext("size/width")), int(tree.findtext("size/height"))
    except (TypeError, ValueError):
        raise DatasetError(f"{xml} has no valid <size> with <width> and <height>") from None


def _voc_box(obj: ET.Element, xml: str, index: int) -> List[float]:
    try:
        return [float(obj.findtext(f"bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError):
        raise DatasetError(f"{xml}: object {index} has no valid <bndbox> (xmin, ymin, xmax, ymax)") from None


def _stored_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image as Detectron2 reads it: from the header, turned as its EXIF orientation says."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)  # 5-8: turned by 90 degrees
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_voc_size(xml: str, jpeg: str, width: int, height: int) -> None:
    """The XML's <size> must be the image's: Detectron2 checks it only when it reads the image, mid-training."""
    try:
        actual = _stored_size(jpeg)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise DatasetError(f"{jpeg} is not a readable image ({type(e).__name__}: {e})") from None
    if actual != (width, height):
        raise DatasetError(
            f"{xml}: <size> says {width}x{height}, but {jpeg} is {actual[0]}x{actual[1]}; "
            "correct <width> and <height> (the boxes are in the image's pixels)"
        )


def _voc_ids(dirname: str, split: str, name: str) -> List[str]:
    """The image ids of a VOC split, once its folders are known to be there."""
    for folder in VOC_FOLDERS:
        if not os.path.isdir(os.path.join(dirname, folder)):
            raise DatasetError(f"data set {name}: folder {os.path.join(dirname, folder)} not found; a VOC layout "
                               f"holds {', '.join(VOC_FOLDERS)} and ImageSets/Main/{split}.txt")
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise DatasetError(f"data set {name}: split file {split_file} not found")
    ids = Path(split_file).read_text().split()
    if not ids:
        raise DatasetError(f"data set {name}: {split_file} lists no images")
    return ids


def load_voc(dirname: str, split: str, classes: Sequence[str], name: str = "") -> List[dict]:
    """Detectron2's ``load_voc_instances`` records, with every file and annotation checked.

    VOC boxes are 1-based inclusive pixel indices; as in Detectron2, 1 is taken
    off ``xmin``/``ymin`` to get 0-based ``XYXY_ABS`` coordinates. Difficult
    objects are kept, as Detectron2 keeps them for training.
    """
    name = name or f"{dirname} ({split})"
    boxes = _BoxCheck(name)
    records = []
    for fileid in _voc_ids(dirname, split, name):
        xml = os.path.join(dirname, "Annotations", fileid + ".xml")
        jpeg = os.path.join(dirname, "JPEGImages", fileid + ".jpg")
        for path in (xml, jpeg):
            if not os.path.isfile(path):
                raise DatasetError(
                    f"data set {name}: ImageSets/Main/{split}.txt lists {fileid}, but {path} does not exist"
                )
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise DatasetError(f"{xml} is not valid XML ({e})") from None
        width, height = _voc_size(tree, xml)
        _check_voc_size(xml, jpeg, width, height)
        instances = []
        for index, obj in enumerate(tree.findall("object"), start=1):
            cls = (obj.findtext("name") or "").strip()
            if cls not in classes:
                raise DatasetError(f"{xml}: object {index} has class {cls!r}, which is not one of the "
                                   f"{len(classes)} classes of data set {name} ({', '.join(classes)})")
            x0, y0, x1, y1 = _voc_box(obj, xml, index)
            box = boxes.clip([x0 - 1.0, y0 - 1.0, x1, y1], width, height, f"{xml} object {index} {cls!r}")
            instances.append({"category_id": classes.index(cls), "bbox": box, "bbox_mode": BoxMode.XYXY_ABS})
        records.append({"file_name": jpeg, "image_id": fileid, "height": height, "width": width,
                        "annotations": instances})
    boxes.report()
    return records


def _unknown_category(json_file: str) -> str:
    """The first annotation whose category is not among the file's categories, described for a user."""
    with open(json_file) as f:
        data = json.load(f)
    known = {c.get("id") for c in data.get("categories", [])}
    for ann in data.get("annotations", []):
        if ann.get("category_id") not in known:
            return (f"annotation {ann.get('id')} (image {ann.get('image_id')}) has category_id "
                    f"{ann.get('category_id')}, which is not among the file's categories "
                    f"({', '.join(str(k) for k in sorted(known, key=str))})")
    return "an annotation has a category_id that is not among the file's categories"


def load_coco(json_file: str, image_root: str, name: str) -> List[dict]:
    """Detectron2's ``load_coco_json`` records, with the files, categories and boxes checked."""
    for path, kind in ((json_file, "annotation file"), (image_root, "image folder")):
        if not os.path.exists(path):
            raise DatasetError(f"data set {name}: {kind} {path} not found")
    try:
        records = load_coco_json(json_file, image_root, name)
    except KeyError:  # Detectron2's words for an unknown category_id, without the annotation
        raise DatasetError(f"{json_file}: {_unknown_category(json_file)}") from None
    except (ValueError, AssertionError) as e:  # json.JSONDecodeError is a ValueError
        raise DatasetError(f"{json_file} is not a valid COCO annotation file: {e}") from None
    boxes = _BoxCheck(name)
    for record in records:
        for ann in record["annotations"]:
            x, y, w, h = ann["bbox"][:4]
            where = f"{json_file} annotation of image {record['image_id']}"
            x0, y0, x1, y1 = boxes.clip([x, y, x + w, y + h], record["width"], record["height"], where)
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    boxes.report()
    return records


def _checked_loader(name: str) -> Optional[partial]:
    """The checked loader for a data set, from the metadata Detectron2 registered it with; None if unknown."""
    meta = MetadataCatalog.get(name)
    kind = getattr(meta, "evaluator_type", None)
    if kind == "pascal_voc" and hasattr(meta, "dirname"):
        return partial(load_voc, meta.dirname, meta.split, tuple(meta.thing_classes), name)
    if kind == "coco" and hasattr(meta, "json_file"):
        return partial(load_coco, meta.json_file, meta.image_root, name)
    return None


def use_checked_loaders(names: Iterable[str]) -> None:
    """Read each named VOC or COCO data set with the checked loader instead of Detectron2's (same records)."""
    for name in names:
        if name not in DatasetCatalog:
            continue
        current = DatasetCatalog[name]  # the registered function (``get`` would call it)
        if isinstance(current, partial) and current.func in (load_voc, load_coco):
            continue
        loader = _checked_loader(name)
        if loader is not None:
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, loader)


def _where(name: str) -> List[str]:
    """The files and folders a registered data set reads first; empty when its kind is not known here."""
    meta = MetadataCatalog.get(name)
    kind = getattr(meta, "evaluator_type", None)
    if kind == "pascal_voc":
        return [os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")] + [
            os.path.join(meta.dirname, folder) for folder in VOC_FOLDERS
        ]
    if kind == "coco":
        return [meta.json_file, meta.image_root]
    return []


def check_datasets(names: Iterable[str]) -> None:
    """Fail before training when a data set is unknown or missing on disk, saying where it was expected.

    The named VOC and COCO data sets are also switched to the checked loaders,
    so their annotations are checked when they are first read.
    """
    names = list(names)
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            ours = ("voc_", "coco_2017", SHAPES_PREFIX, SHAPES_COCO_PREFIX)
            known = sorted(n for n in registered if n.startswith(ours))
            raise DatasetError(f"unknown data set {name!r}; known here: {', '.join(known)}")
        missing = [p for p in _where(name) if not os.path.exists(p)]
        if not missing:
            continue
        if name.startswith((SHAPES_PREFIX, SHAPES_COCO_PREFIX)):
            raise DatasetError(
                f"data set {name}: {missing[0]} not found; generate the data with "
                "`python tools/make_shapes.py --out DIR` (a folder from before COCO annotations were added needs "
                "--overwrite) and pass DATASETS.SHAPES_ROOT DIR"
            )
        env = os.environ.get("DETECTRON2_DATASETS")
        raise DatasetError(
            f"data set {name}: {missing[0]} not found. Detectron2 reads data sets under $DETECTRON2_DATASETS "
            f"({'now ' + env if env else 'unset, so ./datasets'}), which must hold VOC2007/, VOC2012/ and coco/ "
            "in their official layouts; or run this config on the generated shapes data: "
            "`python tools/make_shapes.py --out DIR`, then tools/train_net.py ... --shapes DIR"
        )
    use_checked_loaders(names)


def training_records(cfg) -> List[dict]:
    """The records Detectron2's training loader reads, refused unless they hold objects and one batch of images.

    Detectron2 asserts on a training set whose images have no objects, and with
    ``SOLVER.IMS_PER_BATCH`` above the number of images its aspect-ratio
    grouping waits for a batch that never fills, printing nothing.
    """
    names = list(cfg.DATASETS.TRAIN)
    try:
        records = get_detection_dataset_dicts(
            names,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    except AssertionError:  # "Dataset '...' is empty!" or, after leaving out images without objects, "No valid data"
        records = []
    if not any(record.get("annotations") for record in records):
        raise DatasetError(
            f"DATASETS.TRAIN {', '.join(names)}: no image has an object to train on (every annotation file lists "
            "none); train on a split with boxes"
        )
    batch, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if batch < 1 or batch % world:
        raise DatasetError(f"SOLVER.IMS_PER_BATCH {batch} must be a positive multiple of the {world} process(es)")
    if batch > len(records):
        raise DatasetError(
            f"SOLVER.IMS_PER_BATCH {batch} is more than the {len(records)} training images of "
            f"{', '.join(names)}; lower SOLVER.IMS_PER_BATCH (it is the batch of all GPUs together) or add images"
        )
    return records


def build_evaluator(name: str, output_dir: str) -> DatasetEvaluator:
    """VOC-style AP/AP50/AP75 for VOC layouts (VOC 2007 uses the 11-point metric), COCO AP for COCO."""
    kind = getattr(MetadataCatalog.get(name), "evaluator_type", None)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(name)
    if kind == "coco":
        # Detectron2's fast COCO evaluator is compiled code this install lacks.
        return COCOEvaluator(name, output_dir=output_dir, use_fast_impl=False)
    raise DatasetError(f"no evaluator for data set {name!r} (evaluator_type {kind!r}); use a VOC or COCO data set")
