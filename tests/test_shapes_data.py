"""The shapes generator writes real layouts that real loaders read, deterministically."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retro_transfer.data.shapes import BORDER_PX, CLASSES, VOID, ShapesConfig, generate, read_classes

ROOT = Path(__file__).resolve().parents[1]


def _voc(root):
    return str(root / "VOC2007")


def _split(root, name, kind="Main"):
    return (root / "VOC2007" / "ImageSets" / kind / f"{name}.txt").read_text().split()


def test_splits_partition_the_images(shapes_root):
    train, val, test = (set(_split(shapes_root, s)) for s in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert set(_split(shapes_root, "trainval")) == train | val
    assert set(_split(shapes_root, "train", "Segmentation")) == train
    all_ids = {p.stem for p in (shapes_root / "VOC2007" / "JPEGImages").glob("*.jpg")}
    assert train | val | test == all_ids
    assert read_classes(shapes_root) == list(CLASSES)


def test_detectron2_reads_voc_and_boxes_match_masks(shapes_root):
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    records = load_voc_instances(_voc(shapes_root), "trainval", CLASSES)
    assert len(records) == len(_split(shapes_root, "trainval"))
    n_checked = 0
    for record in records:
        image = Image.open(record["file_name"])
        assert image.size == (record["width"], record["height"])
        stem = Path(record["file_name"]).stem
        inst = np.asarray(Image.open(shapes_root / "VOC2007" / "SegmentationObject" / f"{stem}.png"))
        cls = np.asarray(Image.open(shapes_root / "VOC2007" / "SegmentationClass" / f"{stem}.png"))
        assert record["annotations"], "every VOC image has at least one object"
        for index, ann in enumerate(record["annotations"], start=1):
            # Detectron2 turns VOC's 1-based inclusive boxes into [x0, y0, x1 + 1, y1 + 1).
            x0, y0, x1, y1 = (int(round(v)) for v in ann["bbox"])
            ys, xs = np.nonzero(inst == index)
            assert set(np.unique(cls[inst == index])) == {ann["category_id"] + 1}
            if len(xs):
                # The object's interior lies inside the box, inset by the void border ...
                assert xs.min() >= x0 + BORDER_PX and xs.max() <= x1 - 1 - BORDER_PX
                assert ys.min() >= y0 + BORDER_PX and ys.max() <= y1 - 1 - BORDER_PX
            # ... and the box is tight: each of its edges touches the object's void border.
            box_void = inst[y0:y1, x0:x1] == VOID
            assert box_void[:, 0].any() and box_void[:, -1].any()
            assert box_void[0, :].any() and box_void[-1, :].any()
            n_checked += 1
    assert n_checked >= len(records)


def test_detectron2_registration(shapes_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc

    name = "shapes_test_registration_val"
    register_pascal_voc(name, _voc(shapes_root), "val", 2007, CLASSES)
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == len(_split(shapes_root, "val"))
        assert MetadataCatalog.get(name).thing_classes == list(CLASSES)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _load_all(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_mmseg_reads_the_segmentation_layout(shapes_root):
    import retro_transfer.mmseg  # noqa: F401  (registers ShapesVOCDataset)
    from mmengine.registry import init_default_scope
    from mmseg.datasets import PascalVOCDataset
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")  # as a config's default_scope does: mmseg's LoadAnnotations
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]
    ann = "ImageSets/Segmentation/train.txt"
    prefix = dict(img_path="JPEGImages", seg_map_path="SegmentationClass")
    # MMSeg's own VOC data set reads the layout (its class names are VOC's).
    voc = PascalVOCDataset(data_root=_voc(shapes_root), data_prefix=prefix, ann_file=ann, pipeline=pipeline)
    assert len(voc) == len(_split(shapes_root, "train", "Segmentation"))

    ours = DATASETS.build(
        dict(type="ShapesVOCDataset", data_root=_voc(shapes_root), data_prefix=prefix, ann_file=ann, pipeline=pipeline)
    )
    assert ours.metainfo["classes"] == ("background",) + CLASSES
    seen = set()
    for item in _load_all(ours):
        seg = item["gt_seg_map"]
        assert seg.shape == item["img"].shape[:2]
        seen |= set(np.unique(seg).tolist())
    assert VOID in seen and 0 in seen
    assert seen - {VOID} <= set(range(len(CLASSES) + 1))
    assert len(seen - {0, VOID}) >= 3, "several classes should appear in the train split"


def test_classification_split_loads_with_imagefolder(shapes_root):
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(shapes_root / "classification" / "train"))
    val = ImageFolder(str(shapes_root / "classification" / "val"))
    assert sorted(train.classes) == sorted(CLASSES) == sorted(val.classes)
    counts = np.bincount(train.targets, minlength=len(CLASSES))
    assert counts.max() - counts.min() <= 1, "classes are balanced"
    image, _ = train[0]
    assert image.size == (64, 64)
    assert len(list((shapes_root / "unlabeled").glob("*.jpg"))) == 24


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    cfg = ShapesConfig(num_images=8, size=48, seed=3)
    a = generate(tmp_path / "a", cfg)
    b = generate(tmp_path / "b", cfg)
    c = generate(tmp_path / "c", ShapesConfig(num_images=8, size=48, seed=4))
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)
    # Not just the metadata: the images themselves differ.
    assert (a / "unlabeled" / "000000.jpg").read_bytes() != (c / "unlabeled" / "000000.jpg").read_bytes()


def _make_shapes(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shapes.py"), *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "8"], "--size must be between 32 and 2048"),
        (["--num-images", "0"], "--num-images must be at least 8"),
        (["--num-images", "many"], "invalid int value"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(tmp_path, args, message):
    result = _make_shapes("--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_overwrite_rules(tmp_path):
    out = tmp_path / "shapes"
    small = ["--num-images", "8", "--size", "32"]
    assert _make_shapes("--out", str(out), *small).returncode == 0
    refused = _make_shapes("--out", str(out), *small)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _make_shapes("--out", str(out), *small, "--seed", "5", "--overwrite").returncode == 0
    assert '"seed": 5' in (out / "shapes.json").read_text()

    # A non-empty folder this tool did not write is never deleted.
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    result = _make_shapes("--out", str(foreign), *small, "--overwrite")
    assert result.returncode == 2 and "refusing to delete" in result.stderr
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "shapes"]


def test_dominant_objects_are_whole_upright_and_plain():
    """What lets a short contrastive run learn shapes: the classification and unlabeled
    images show one whole, upright object, and colour carries no identity (one object
    colour, one background tone), so shape is the cue that survives augmentation."""
    from retro_transfer.data import shapes

    for index in range(40):
        rng = np.random.default_rng(index)
        label = index % len(CLASSES)
        img, objects = shapes.render_scene(rng, 64, [label], [shapes._DOMINANT_RADII], inside=True)
        (obj,) = objects
        x0, y0, x1, y1 = obj.bbox()
        assert min(x0, y0) > 0 and max(x1, y1) < 63, f"{CLASSES[label]} touches the border: {obj.bbox()}"
        inner = obj.mask & ~shapes._border(obj.mask, 1)
        assert np.abs(img[inner].mean(0) - np.array(shapes.OBJECT_RGB)).max() < 3
        assert np.abs(img[~obj.mask].mean() - shapes.BACKGROUND_LEVEL) < 3
    # Upright: a square is drawn axis-aligned (its mask fills its bounding box).
    img, (square,) = shapes.render_scene(np.random.default_rng(0), 64, [CLASSES.index("square")], [shapes._DOMINANT_RADII], inside=True)
    x0, y0, x1, y1 = square.bbox()
    assert square.mask.sum() > 0.85 * (x1 - x0 + 1) * (y1 - y0 + 1)
