"""A deterministic synthetic data set of coloured shapes, written in real layouts.

The toolkit has to be exercised end to end (distil -> convert -> fine-tune)
on machines with no network and no GPU, so it brings its own data. Rather than
a toy format, the generator writes the *real* on-disk layouts so that the same
loaders that read Pascal VOC and ImageNet read it too:

``OUT/VOC2007/``
    Pascal VOC: ``JPEGImages/*.jpg``, ``Annotations/*.xml`` (size, object/name,
    pose, truncated, difficult, bndbox with VOC's 1-based inclusive pixel
    coordinates), ``SegmentationClass/*.png`` and ``SegmentationObject/*.png``
    (palette PNGs, 255 = "void" on object borders as in VOC),
    ``ImageSets/Main/{train,val,trainval,test}.txt`` and
    ``ImageSets/Segmentation/{train,val,trainval}.txt``.
``OUT/annotations/instances_{train,val,test}.json``
    The same VOC images and splits as COCO instance annotations (Mask R-CNN):
    one annotation per object with its visible mask as compressed RLE, the
    tight box ``[x, y, w, h]`` of that mask and its area; category ids 1..7
    in ``classes.txt`` order; ``file_name`` relative to ``VOC2007/JPEGImages``.
``OUT/classification/{train,val}/<class>/*.jpg``
    An ImageFolder split with one dominant object per image (linear probe, k-NN).
``OUT/unlabeled/*.jpg``
    A flat folder of object-centric images (like ImageNet, one dominant object
    over small distractors) for self-supervised pretraining and distillation.
``OUT/classes.txt``
    One class name per line, in label order (VOC index = line number + 1).
``OUT/shapes.json``
    The generation parameters, so that a folder can be recognised and rebuilt.

Every image is drawn from its own ``numpy.random.SeedSequence`` child of the
user's seed, so a seed fully determines every byte written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASSES: Tuple[str, ...] = (
    "circle",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star",
    "cross",
)

#: Marker file that identifies a folder written by this module.
META_FILE = "shapes.json"
VOC_DIRNAME = "VOC2007"
COCO_DIRNAME = "annotations"
COCO_SPLITS = ("train", "val", "test")
VOID = 255

# Objects occluded below this visible fraction are hard to recognise: VOC marks
# such objects "difficult", and we do the same so its evaluator ignores them.
DIFFICULT_VISIBLE_FRACTION = 0.5
# Never let a placement hide most of an earlier object: an almost invisible but
# annotated object would be label noise.
MIN_VISIBLE_FRACTION = 0.3
# Width of the void band drawn on object borders in the segmentation maps.
BORDER_PX = 1
JPEG_QUALITY = 92


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of one generated data set (all that determines its bytes)."""

    num_images: int = 300
    size: int = 128
    seed: int = 0
    max_objects: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason for unusable values."""
        if not 32 <= self.size <= 2048:
            raise ValueError(f"--size must be between 32 and 2048 pixels, got {self.size}")
        if self.num_images < 8:
            raise ValueError(
                f"--num-images must be at least 8 (every split needs images), got {self.num_images}"
            )
        if self.num_images > 1_000_000:
            raise ValueError(f"--num-images must be at most 1000000, got {self.num_images}")
        if self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed}")
        if not 1 <= self.max_objects <= 12:
            raise ValueError(f"max_objects must be between 1 and 12, got {self.max_objects}")

    @property
    def num_classification_train(self) -> int:
        return self.num_images

    @property
    def num_classification_val(self) -> int:
        return max(len(CLASSES), self.num_images // 4)

    @property
    def num_unlabeled(self) -> int:
        return self.num_images


@dataclass
class ShapeObject:
    """One drawn object: its class, its visible mask and derived annotations."""

    label: int  # index into CLASSES
    full_area: int
    mask: np.ndarray  # visible pixels (bool, H x W), updated as later objects occlude it

    def visible_fraction(self) -> float:
        return float(self.mask.sum()) / max(self.full_area, 1)

    def bbox(self) -> Tuple[int, int, int, int]:
        """Tight box of the visible pixels, 0-based inclusive (x0, y0, x1, y1)."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------


def voc_palette(num_entries: int = 256) -> List[int]:
    """Pascal VOC's colour map: label bits spread over the high bits of R, G, B."""
    palette = []
    for label in range(num_entries):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


def _regular_polygon(n: int, radius: float, rotation: float) -> np.ndarray:
    angles = rotation + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(radius: float, rotation: float) -> np.ndarray:
    angles = rotation + math.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(radius: float, rotation: float) -> np.ndarray:
    a, b = radius, radius * 0.34
    pts = np.array(
        [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    )
    rot = np.array([[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]])
    return pts @ rot.T


def shape_outline(name: str, radius: float, rotation: float) -> Optional[np.ndarray]:
    """Polygon vertices centred on the origin, or ``None`` for the circle."""
    if name == "circle":
        return None
    if name == "triangle":
        return _regular_polygon(3, radius, rotation)
    if name == "square":
        return _regular_polygon(4, radius, rotation)
    if name == "pentagon":
        return _regular_polygon(5, radius, rotation)
    if name == "hexagon":
        return _regular_polygon(6, radius, rotation)
    if name == "star":
        return _star(radius, rotation)
    if name == "cross":
        return _cross(radius, rotation)
    raise KeyError(f"unknown shape {name!r}; known shapes: {', '.join(CLASSES)}")


def _shape_mask(size: int, name: str, cx: float, cy: float, radius: float, rotation: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    outline = shape_outline(name, radius, rotation)
    if outline is None:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in outline], fill=1)
    return np.asarray(canvas, dtype=bool)


# The look of every image is deliberately plain: one object colour (with a dark
# outline, so that touching objects stay apart) on one background tone. In a
# data set this small, any per-image colour or texture identifies an image
# across its two augmented views better than its shapes do, and a contrastive
# learner then learns colours and stays at chance on the shape classes (probes
# in BENCHMARKS.md: k-NN 14-18% with random colours and textured backgrounds).
OBJECT_RGB = (217.0, 38.0, 38.0)
OUTLINE_SCALE = 0.45
BACKGROUND_LEVEL = 60.0
NOISE_STD = 4.0
# Objects keep their class's upright orientation up to this many degrees (a
# CNN learns rotation invariance only from far more data than a demo has).
ROTATION_JITTER_DEG = 10.0
UPRIGHT = {"circle": 0.0, "triangle": -math.pi / 2, "square": math.pi / 4, "pentagon": -math.pi / 2,
           "hexagon": 0.0, "star": -math.pi / 2, "cross": 0.0}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat background with light sensor-like noise."""
    return BACKGROUND_LEVEL + rng.normal(0, NOISE_STD, (size, size, 3))


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` with the object colour and a one-pixel darker outline, with light noise."""
    fill = np.asarray(OBJECT_RGB) + rng.normal(0, NOISE_STD, img.shape)
    outline = _border(mask, 1)
    fill[outline] *= OUTLINE_SCALE
    img[mask] = fill[mask]


def _place_object(
    rng: np.random.Generator,
    size: int,
    objects: List[ShapeObject],
    label: int,
    radius_range: Tuple[float, float],
    inside: bool = False,
    tries: int = 20,
) -> Optional[np.ndarray]:
    """Sample a placement of ``label`` that leaves every earlier object visible enough.

    Centres may sit near the border so that some objects are truncated, unless
    ``inside`` asks for the whole object in the frame (the classification splits).
    """
    jitter = math.radians(ROTATION_JITTER_DEG)
    for _ in range(tries):
        radius = rng.uniform(*radius_range) * size
        margin = 1.06 * radius + 1 if inside else 0.1 * size  # the cross reaches 1.06 radii
        cx, cy = rng.uniform(margin, size - margin, 2)
        rotation = UPRIGHT[CLASSES[label]] + rng.uniform(-jitter, jitter)
        mask = _shape_mask(size, CLASSES[label], cx, cy, radius, rotation)
        if mask.sum() < 16:
            continue
        if all((obj.mask & ~mask).sum() >= MIN_VISIBLE_FRACTION * obj.full_area for obj in objects):
            return mask
    return None


def render_scene(
    rng: np.random.Generator,
    size: int,
    labels: Sequence[int],
    radius_ranges: Sequence[Tuple[float, float]],
    inside: bool = False,
) -> Tuple[np.ndarray, List[ShapeObject]]:
    """Draw ``labels`` in order (later ones occlude earlier ones) on a background.

    Returns the uint8 RGB image and the objects that could be placed, each with
    its final visible mask. ``inside`` keeps the last (dominant) object whole in the frame.
    """
    img = _background(rng, size)
    objects: List[ShapeObject] = []
    for index, (label, radius_range) in enumerate(zip(labels, radius_ranges)):
        mask = _place_object(rng, size, objects, label, radius_range, inside=inside and index == len(labels) - 1)
        if mask is None:
            continue
        for obj in objects:
            obj.mask &= ~mask
        _paint(img, mask, rng)
        objects.append(ShapeObject(label=label, full_area=int(mask.sum()), mask=mask.copy()))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _border(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its outside (4-neighbourhood)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def label_maps(objects: Sequence[ShapeObject], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Class and instance maps in VOC's convention (0 background, 255 void border)."""
    cls_map = np.zeros((size, size), np.uint8)
    inst_map = np.zeros((size, size), np.uint8)
    void = np.zeros((size, size), bool)
    for index, obj in enumerate(objects, start=1):
        cls_map[obj.mask] = obj.label + 1
        inst_map[obj.mask] = index
        void |= _border(obj.mask, BORDER_PX)
    cls_map[void] = VOID
    inst_map[void] = VOID
    return cls_map, inst_map


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _save_palette_png(array: np.ndarray, path: Path, palette: List[int]) -> None:
    image = Image.fromarray(array, mode="P")
    image.putpalette(palette)
    image.save(path, optimize=False)


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img, mode="RGB").save(path, quality=JPEG_QUALITY)


def voc_annotation_xml(image_id: str, size: int, objects: Sequence[ShapeObject]) -> ET.ElementTree:
    """A VOC annotation: boxes in 1-based inclusive pixel coordinates."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = VOC_DIRNAME
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "retro-transfer shapes"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox()
        truncated = x0 == 0 or y0 == 0 or x1 == size - 1 or y1 == size - 1
        difficult = obj.visible_fraction() < DIFFICULT_VISIBLE_FRACTION or min(x1 - x0, y1 - y0) < 4
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = CLASSES[obj.label]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = str(int(truncated))
        ET.SubElement(el, "difficult").text = str(int(difficult))
        box = ET.SubElement(el, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def coco_annotations(objects: Sequence[ShapeObject], image_id: int, first_id: int) -> List[dict]:
    """COCO instance annotations of one image's objects: visible mask as compressed RLE, its tight box and area.

    The box is the mask's, in COCO's continuous ``[x, y, width, height]``
    (a pixel column x covers [x, x + 1)), so it agrees with the VOC box.
    """
    annotations = []
    for offset, obj in enumerate(objects):
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        x0, y0, x1, y1 = obj.bbox()
        annotations.append({
            "id": first_id + offset,
            "image_id": image_id,
            "category_id": obj.label + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(obj.mask.sum()),
            "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
            "iscrowd": 0,
        })
    return annotations


def _write_coco(root: Path, size: int, splits: dict, images: dict) -> None:
    """``annotations/instances_{split}.json`` for the VOC splits; ``images`` maps a VOC id to its annotations."""
    (root / COCO_DIRNAME).mkdir()
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    for split in COCO_SPLITS:
        members = splits[split]
        coco = {
            "info": {"description": f"retro-transfer shapes, {split} split of {VOC_DIRNAME}"},
            "images": [{"id": int(i), "file_name": f"{i}.jpg", "width": size, "height": size} for i in members],
            "annotations": [ann for i in members for ann in images[i]],
            "categories": categories,
        }
        (root / COCO_DIRNAME / f"instances_{split}.json").write_text(json.dumps(coco))


def _image_rng(root: np.random.SeedSequence, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (stream, image): reproducible and order-free."""
    return np.random.default_rng(np.random.SeedSequence(entropy=root.entropy, spawn_key=(stream, index)))


_VOC_STREAM, _CLS_STREAM, _UNLABELED_STREAM, _SPLIT_STREAM = range(4)
_MULTI_OBJECT_RADII = (0.08, 0.22)


def _multi_object_scene(rng: np.random.Generator, cfg: ShapesConfig) -> Tuple[np.ndarray, List[ShapeObject]]:
    count = int(rng.integers(1, cfg.max_objects + 1))
    labels = rng.integers(0, len(CLASSES), count).tolist()
    return render_scene(rng, cfg.size, labels, [_MULTI_OBJECT_RADII] * count)


def _write_split_list(path: Path, ids: Iterable[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


def _write_voc(root: Path, cfg: ShapesConfig, seed_seq: np.random.SeedSequence, progress: Callable) -> None:
    voc = root / VOC_DIRNAME
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    palette = voc_palette()
    ids = []
    coco_images = {}
    next_annotation = 1
    for index in progress(range(cfg.num_images), desc="VOC images"):
        rng = _image_rng(seed_seq, _VOC_STREAM, index)
        img, objects = _multi_object_scene(rng, cfg)
        while not objects:  # every VOC image has at least one object
            img, objects = _multi_object_scene(rng, cfg)
        image_id = f"{index:06d}"
        ids.append(image_id)
        _save_jpeg(img, voc / "JPEGImages" / f"{image_id}.jpg")
        voc_annotation_xml(image_id, cfg.size, objects).write(voc / "Annotations" / f"{image_id}.xml")
        cls_map, inst_map = label_maps(objects, cfg.size)
        _save_palette_png(cls_map, voc / "SegmentationClass" / f"{image_id}.png", palette)
        _save_palette_png(inst_map, voc / "SegmentationObject" / f"{image_id}.png", palette)
        coco_images[image_id] = coco_annotations(objects, index, next_annotation)
        next_annotation += len(objects)

    # A quarter held out as test (scored by the evaluators), the rest trainval, of which a quarter is val.
    order = np.random.default_rng(np.random.SeedSequence(seed_seq.entropy, spawn_key=(_SPLIT_STREAM,))).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_test = len(ids) // 4
    n_val = (len(ids) - n_test) // 4
    test, val, train = shuffled[:n_test], shuffled[n_test : n_test + n_val], shuffled[n_test + n_val :]
    splits = {"train": sorted(train), "val": sorted(val), "trainval": sorted(train + val), "test": sorted(test)}
    for name, members in splits.items():
        _write_split_list(voc / "ImageSets" / "Main" / f"{name}.txt", members)
        if name != "test":
            _write_split_list(voc / "ImageSets" / "Segmentation" / f"{name}.txt", members)
    _write_coco(root, cfg.size, splits, coco_images)


_DOMINANT_RADII = (0.28, 0.42)
_DISTRACTOR_RADII = (0.06, 0.1)


def _dominant_object_scene(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """One large object of class ``label``, whole in the frame, over up to two small distractors."""
    n_distractors = int(rng.integers(0, 3))
    labels = rng.integers(0, len(CLASSES), n_distractors).tolist() + [label]
    img, _ = render_scene(rng, size, labels, [_DISTRACTOR_RADII] * n_distractors + [_DOMINANT_RADII], inside=True)
    return img


def _write_classification(root: Path, cfg: ShapesConfig, seed_seq: np.random.SeedSequence, progress: Callable) -> None:
    """One dominant object per image, labels balanced by cycling through classes."""
    for split, count, offset in (
        ("train", cfg.num_classification_train, 0),
        ("val", cfg.num_classification_val, cfg.num_classification_train),
    ):
        for name in CLASSES:
            (root / "classification" / split / name).mkdir(parents=True)
        for index in progress(range(count), desc=f"classification {split}"):
            rng = _image_rng(seed_seq, _CLS_STREAM, offset + index)
            label = index % len(CLASSES)
            img = _dominant_object_scene(rng, cfg.size, label)
            _save_jpeg(img, root / "classification" / split / CLASSES[label] / f"{split}_{index:06d}.jpg")


def _write_unlabeled(root: Path, cfg: ShapesConfig, seed_seq: np.random.SeedSequence, progress: Callable) -> None:
    """Object-centric images, as ImageNet is for the real teachers; their classes are drawn and never written."""
    (root / "unlabeled").mkdir()
    for index in progress(range(cfg.num_unlabeled), desc="unlabeled images"):
        rng = _image_rng(seed_seq, _UNLABELED_STREAM, index)
        img = _dominant_object_scene(rng, cfg.size, int(rng.integers(0, len(CLASSES))))
        _save_jpeg(img, root / "unlabeled" / f"{index:06d}.jpg")


def _no_progress(iterable, desc: str = ""):
    return iterable


def is_shapes_dataset(path: Path) -> bool:
    """Whether ``path`` was written by :func:`generate` (it holds our marker file)."""
    return (Path(path) / META_FILE).is_file()


def read_classes(root: os.PathLike) -> List[str]:
    """Class names of a generated data set, in label order."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a shapes data set? Create one with tools/make_shapes.py --out {root}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def generate(out: os.PathLike, cfg: ShapesConfig = ShapesConfig(), overwrite: bool = False, progress: Callable = _no_progress) -> Path:
    """Write a shapes data set to ``out`` and return its path.

    The data set is written to a temporary sibling folder and renamed into
    place at the end, so ``out`` never holds a half-written data set. An
    existing non-empty ``out`` is replaced only with ``overwrite=True`` and only
    if it is itself a shapes data set: this function never deletes a folder it
    did not write.
    """
    cfg.validate()
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
            if not is_shapes_dataset(out):
                raise FileExistsError(
                    f"{out} is not empty and has no {META_FILE}, so it was not written by this tool; "
                    "refusing to delete it, choose another --out"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    seed_seq = np.random.SeedSequence(cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
        _write_voc(tmp, cfg, seed_seq, progress)
        _write_classification(tmp, cfg, seed_seq, progress)
        _write_unlabeled(tmp, cfg, seed_seq, progress)
        meta = {"generator": "retro_transfer.data.shapes", "format_version": 3, "classes": list(CLASSES), **asdict(cfg)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
