"""Hostile and broken inputs to the downstream tools (issue 11, points 1-7), at toy scale on the CPU.

No file a user is handed runs code (a malicious ``.pkl`` or YAML creates no
file), a file that is not weights gets the toolkit's one-line refusal, weights
that would leave the model partly random are refused, and wrong annotations
are named with their file. Tools run in-process through ``main``; a refusal
is ``SystemExit(2)`` with one line on stderr.
"""

import collections
import json
import logging
import os
import pickle
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_voc_instances, register_coco_instances

import retro_transfer.mmseg  # noqa: F401  (registers the backbone and data sets)
from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import CheckpointError, safe_load
from retro_transfer.d2 import ConfigError, DatasetError, check_datasets, load_config, register_shapes
from retro_transfer.d2.data import load_voc
from retro_transfer.d2.pickles import load_weights_pickle
from retro_transfer.d2.weights import RetroCheckpointer
from retro_transfer.models.students import Student

from tool_helpers import fresh_detectron2_logging, load_tool, one_thread  # noqa: F401  (autouse fixtures)

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "configs" / "detection"
SEGMENTATION = ROOT / "configs" / "segmentation"


@pytest.fixture(scope="module")
def tools():
    names = ("train_net", "convert_to_d2", "convert_to_mmseg", "train_seg", "test_seg")
    return {name: load_tool(name) for name in names}


def run(tool_main, argv, capsys):
    """``(exit code, stderr)`` of a tool's ``main``; errors exit through ``fail``."""
    try:
        tool_main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The tool's error, checked to be a single line that ends the output (no traceback after or around it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    return errors[0]


class CreatesFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def distill_checkpoint(student: Student) -> dict:
    body = student.body.state_dict()
    model = {f"student.body.{k}": v for k, v in body.items()}
    model["teacher.backbone.conv1.weight"] = torch.randn(4, 3, 7, 7)
    return {"format": DISTILL_FORMAT, "method": "retro", "student_arch": student.arch, "teacher_arch": "resnet50",
            "config": {}, "step": 1, "model": model}


@pytest.fixture(scope="module")
def r18_files(tools, tmp_path_factory):
    """A ResNet-18 distillation checkpoint and its Detectron2 and MMSeg conversions."""
    folder = tmp_path_factory.mktemp("r18")
    torch.manual_seed(0)
    distill = folder / "r18.pth"
    torch.save(distill_checkpoint(Student("resnet18")), distill)
    assert tools["convert_to_d2"].main([str(distill), str(folder / "r18_d2.pkl")]) == 0
    assert tools["convert_to_mmseg"].main([str(distill), str(folder / "r18_mmseg.pth")]) == 0
    return {"distill": distill, "d2": folder / "r18_d2.pkl", "mmseg": folder / "r18_mmseg.pth"}


def not_weights(folder: Path) -> dict:
    """A JPEG and random bytes, both named .pth."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / "photo.pth"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    noise = folder / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"jpeg": jpeg, "noise": noise}


# ---------------------------------------------------------------------- Detectron2: train_net


def d2_args(shapes_root, out, *extra):
    return ["--config-file", str(DETECTION / "shapes_frcnn_r18.yaml"), *extra,
            "DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1",
            "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0"]


def train_net(tools, argv, capsys):
    tool = tools["train_net"]
    return run(lambda a: tool.main(tool.build_parser().parse_args(a)), argv, capsys)


def evil_pkl(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": CreatesFile(marker)}, "__author__": "x"}, f, protocol=2)
    return path


@pytest.mark.parametrize("how", ["MODEL.WEIGHTS", "--eval-only", "--resume"])
def test_malicious_pkl_runs_no_code(how, tools, shapes_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    evil = evil_pkl(out / "model_evil.pkl", marker)
    if how == "--resume":  # Detectron2 resumes from the file named in OUTPUT_DIR/last_checkpoint
        (out / "last_checkpoint").write_text("model_evil.pkl")
        argv = d2_args(shapes_root, out, "--resume", "--eval-only")
    elif how == "--eval-only":
        argv = d2_args(shapes_root, out, "--eval-only") + ["MODEL.WEIGHTS", str(evil)]
    else:
        argv = d2_args(shapes_root, out) + ["MODEL.WEIGHTS", str(evil)]
    code, err = train_net(tools, argv, capsys)
    assert not marker.exists(), "the pickle ran code"
    assert code == 2
    line = one_line(err)
    assert "model_evil.pkl" in line and "io.open" in line and "NOT executed" in line


@pytest.mark.exact
def test_model_zoo_pickles_still_load(tmp_path):
    """numpy arrays under ``model`` (Detectron2 zoo) or ``blobs`` (Detectron/Caffe2), any protocol, load.

    Exact on any CPU: the compared tensors are copies read from a file or state dict, with no
    arithmetic between them.
    """
    arrays = {"conv1_w": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "res2_0_branch2a_bn_s": np.ones(3),
              "n": np.int64(7), "empty": np.zeros(0, np.float32), "conv1_w_momentum": np.zeros(1)}
    files = {
        "zoo.pkl": ({"model": collections.OrderedDict(arrays), "__author__": "Detectron2 Model Zoo",
                     "matching_heuristics": True}, 5),
        "caffe2.pkl": ({"blobs": arrays}, 2),
    }
    checkpointer = RetroCheckpointer(torch.nn.Linear(1, 1))
    for name, (obj, protocol) in files.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        loaded = checkpointer._load_file(str(tmp_path / name))
        assert loaded["matching_heuristics"] is True
        np.testing.assert_array_equal(loaded["model"]["conv1_w"], arrays["conv1_w"])
        assert loaded["model"]["n"] == 7 and loaded["model"]["empty"].shape == (0,)
    assert loaded["__author__"] == "Caffe2" and "conv1_w_momentum" not in loaded["model"]


def test_pkl_that_is_not_weights_is_one_line(tmp_path):
    bad = not_weights(tmp_path)
    for path in bad.values():
        pkl = path.rename(path.with_suffix(".pkl"))
        with pytest.raises(CheckpointError, match="truncated or not a Detectron2 .pkl weights file"):
            load_weights_pickle(pkl)


def evil_yaml(path: Path, marker: Path, base: Path) -> Path:
    path.write_text(f'_BASE_: "{base}"\nMODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n')
    return path


def test_malicious_yaml_runs_no_code(tools, shapes_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = evil_yaml(tmp_path / "evil.yaml", marker, DETECTION / "shapes_frcnn_r18.yaml")
    argv = ["--config-file", str(config), "DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(tmp_path)]
    code, err = train_net(tools, argv, capsys)
    assert not marker.exists(), "the YAML ran code"
    assert code == 2
    line = one_line(err)
    assert "evil.yaml, line 3" in line and "python/object/apply:os.system" in line
    # The pipeline reads configs the same way; a hostile _BASE_ is refused too.
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{config}"\n')
    with pytest.raises(ConfigError, match="evil.yaml, line 3"):
        load_config(child)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["jpeg", "noise"])
def test_train_net_non_weights_file_is_one_line(kind, tools, shapes_root, tmp_path, capsys):
    path = not_weights(tmp_path)[kind]
    code, err = train_net(tools, d2_args(shapes_root, tmp_path / "out") + ["MODEL.WEIGHTS", str(path)], capsys)
    assert code == 2
    line = one_line(err)
    assert f"{path.name} is truncated or not a PyTorch checkpoint" in line and "weights_only" not in line


def test_malicious_pth_is_refused_by_train_net(tools, shapes_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": CreatesFile(marker)}}, tmp_path / "evil.pth")
    argv = d2_args(shapes_root, tmp_path / "out") + ["MODEL.WEIGHTS", str(tmp_path / "evil.pth")]
    code, err = train_net(tools, argv, capsys)
    assert code == 2 and not marker.exists()
    assert "contains code" in one_line(err)


def test_weights_that_leave_the_backbone_random_are_refused(tools, r18_files, shapes_root, tmp_path, capsys):
    # An unconverted distillation checkpoint fills none of the backbone.
    code, err = train_net(tools, d2_args(shapes_root, tmp_path / "a") + ["MODEL.WEIGHTS", str(r18_files["distill"])],
                          capsys)
    assert code == 2
    line = one_line(err)
    assert "at random initialisation" in line and "tools/convert_to_d2.py" in line and "distillation" in line
    # So does a file made for something else (a torchvision classifier): whatever its origin.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    code, err = train_net(tools, d2_args(shapes_root, tmp_path / "b") + ["MODEL.WEIGHTS", str(tmp_path / "tv.pth")],
                          capsys)
    line = one_line(err)
    assert code == 2 and "leaves 100 of the 100 backbone tensors" in line and "named like conv1.weight" in line
    # Forgetting MODEL.WEIGHTS is refused; MODEL.WEIGHTS '' asks for random initialisation.
    code, err = train_net(tools, d2_args(shapes_root, tmp_path / "c"), capsys)
    assert code == 2 and "MODEL.WEIGHTS ''" in one_line(err)
    args = tools["train_net"].build_parser().parse_args(d2_args(shapes_root, tmp_path / "d") + ["MODEL.WEIGHTS", ""])
    assert tools["train_net"].setup(args).MODEL.WEIGHTS == ""


def test_eval_only_refuses_a_backbone_file(tools, r18_files, shapes_root, tmp_path, capsys):
    argv = d2_args(shapes_root, tmp_path, "--eval-only") + ["MODEL.WEIGHTS", str(r18_files["d2"])]
    code, err = train_net(tools, argv, capsys)
    assert code == 2
    line = one_line(err)
    assert "leaves 54 of the 154 model tensors at random initialisation" in line
    assert "backbone.fpn_lateral2.weight" in line and "converted by tools/convert_to_d2.py" in line


# ---------------------------------------------------------------------- Detectron2: annotations


def voc_copy(shapes_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the shapes data's annotations; images are linked."""
    root = tmp_path / "shapes"
    voc = root / "VOC2007"
    shutil.copytree(shapes_root / "VOC2007" / "Annotations", voc / "Annotations")
    shutil.copytree(shapes_root / "VOC2007" / "ImageSets", voc / "ImageSets")
    (voc / "JPEGImages").symlink_to(shapes_root / "VOC2007" / "JPEGImages")
    shutil.copy(shapes_root / "classes.txt", root / "classes.txt")
    return root


def first_annotation(root: Path, split: str = "train") -> Path:
    first = (root / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]
    return root / "VOC2007" / "Annotations" / f"{first}.xml"


def edit_first_object(xml: Path, **fields) -> None:
    """Set fields of the first object of a VOC annotation: ``name`` or its ``bndbox`` coordinates."""
    tree = ET.parse(xml)
    obj = tree.find("object")
    for tag, value in fields.items():
        obj.find(tag if tag == "name" else f"bndbox/{tag}").text = str(value)
    tree.write(xml)


def test_checked_voc_loader_gives_detectron2s_records(shapes_root):
    voc = str(shapes_root / "VOC2007")
    classes = tuple((shapes_root / "classes.txt").read_text().split())
    ours, theirs = load_voc(voc, "trainval", classes), load_voc_instances(voc, "trainval", classes)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a["annotations"] == b["annotations"]
        assert {k: a[k] for k in ("file_name", "image_id", "height", "width")} == \
            {k: b[k] for k in ("file_name", "image_id", "height", "width")}


def test_voc_boxes_outside_the_image_are_clipped_or_refused(shapes_root, tmp_path, caplog):
    root = voc_copy(shapes_root, tmp_path)
    xml = first_annotation(root)
    register_shapes(root)
    edit_first_object(xml, xmax=1000)
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get("shapes_voc_train")
    assert "clipped 1 box(es)" in caplog.text and xml.name in caplog.text
    record = next(r for r in records if r["image_id"] == xml.stem)
    assert record["annotations"][0]["bbox"][2] == record["width"]

    edit_first_object(xml, xmin=500, xmax=600)
    with pytest.raises(DatasetError, match=rf"1 box\(es\) have no area inside their image \(first: .*{xml.name}"):
        DatasetCatalog.get("shapes_voc_train")


def test_voc_unknown_class_and_missing_folder_are_named(tools, shapes_root, tmp_path, capsys):
    root = voc_copy(shapes_root, tmp_path)
    xml = first_annotation(root)
    edit_first_object(xml, name="blob")
    register_shapes(root)
    with pytest.raises(DatasetError, match=rf"{xml.name}: object 1 has class 'blob', which is not one of the 7"):
        DatasetCatalog.get("shapes_voc_train")

    shutil.rmtree(root / "VOC2007" / "Annotations")
    argv = d2_args(root, tmp_path / "out") + ["MODEL.WEIGHTS", ""]
    code, err = train_net(tools, argv, capsys)
    assert code == 2 and f"{root / 'VOC2007' / 'Annotations'} not found" in one_line(err)


def test_coco_annotations_are_checked(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30)).save(images / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "categories": [{"id": 1, "name": "circle"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [30, 5, 20, 10], "area": 200,
                             "iscrowd": 0}]}
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = "safety_coco_test"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(images))
    check_datasets([name])
    with caplog.at_level(logging.WARNING):
        records = DatasetCatalog.get(name)
    assert records[0]["annotations"][0]["bbox"] == [30, 5, 10, 10]  # x + w clipped to the width, 40
    assert "clipped 1 box(es)" in caplog.text

    coco["annotations"].append({"id": 11, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25,
                                "iscrowd": 0})
    json_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="annotation 11 \\(image 1\\) has category_id 9, which is not among"):
        DatasetCatalog.get(name)

    coco["annotations"][1] = {"id": 11, "image_id": 1, "category_id": 1, "bbox": [100, 1, 5, 5], "area": 25,
                              "iscrowd": 0}
    json_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="have no area inside their image"):
        DatasetCatalog.get(name)
    os.remove(json_file)
    with pytest.raises(DatasetError, match=f"annotation file {json_file} not found"):
        DatasetCatalog.get(name)


# ---------------------------------------------------------------------- MMSeg: weights and data


def seg_config(tmp_path: Path, data_root: Path, checkpoint: Path) -> Path:
    """shapes_fcn_r18 at 64 px, one iteration, no worker processes."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(SEGMENTATION / "shapes_fcn_r18.py"))
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[name]
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = str(data_root)
        for step in loader.dataset.pipeline:
            if step.type in ("RandomResize", "Resize"):
                step.scale = (64, 64)
            if step.type == "RandomCrop":
                step.crop_size = (64, 64)
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg.max_iters = 1
    cfg.train_cfg.val_interval = 1
    cfg.param_scheduler[0].end = 1
    cfg.default_hooks.checkpoint.interval = 1
    path = tmp_path / "seg.py"
    cfg.dump(str(path))
    return path


def test_test_seg_refuses_checkpoints_that_do_not_fill_the_segmentor(tools, r18_files, shapes_root, tmp_path,
                                                                       capsys):
    config = seg_config(tmp_path, shapes_root / "VOC2007", r18_files["mmseg"])
    test_seg = tools["test_seg"].main
    expected = {"mmseg": ("does not fill the model of this config", "tensors missing (backbone.body.",
                          "backbone file from tools/convert_to_mmseg.py"),
                "distill": ("is not a segmentor checkpoint (no 'state_dict'", "distillation checkpoint")}
    for key, words in expected.items():
        code, err = run(test_seg, [str(config), str(r18_files[key]), "--work-dir", str(tmp_path / "w")], capsys)
        assert code == 2, err[-2000:]
        line = one_line(err)
        assert str(r18_files[key]) in line and all(w in line for w in words), line


def test_seg_tools_refuse_non_weights_files(tools, r18_files, shapes_root, tmp_path, capsys):
    config = seg_config(tmp_path, shapes_root / "VOC2007", r18_files["mmseg"])
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": CreatesFile(marker)}}, tmp_path / "evil.pth")
    files = {**not_weights(tmp_path), "evil": tmp_path / "evil.pth"}
    runs = [("jpeg", "test_seg", []), ("noise", "train_seg", ["--resume"]),
            ("evil", "train_seg", ["--eval-only", "--checkpoint"]), ("evil", "test_seg", [])]
    for kind, tool, flags in runs:
        argv = [config, *flags, files[kind]] if flags else [config, files[kind]]
        code, err = run(tools[tool].main, [str(a) for a in argv] + ["--work-dir", str(tmp_path / "w")], capsys)
        assert code == 2, (tool, kind, err[-2000:])
        line = one_line(err)
        expect = "contains code" if kind == "evil" else "is truncated or not a PyTorch checkpoint"
        assert expect in line and files[kind].name in line and "weights_only` set to `False`" not in line
    assert not marker.exists()


def seg_copy(shapes_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the shapes data's VOC2007 masks; images are linked."""
    voc = tmp_path / "VOC2007"
    shutil.copytree(shapes_root / "VOC2007" / "SegmentationClass", voc / "SegmentationClass")
    shutil.copytree(shapes_root / "VOC2007" / "ImageSets", voc / "ImageSets")
    (voc / "JPEGImages").symlink_to(shapes_root / "VOC2007" / "JPEGImages")
    return voc


def test_seg_data_problems_are_one_line_naming_the_file(tools, r18_files, shapes_root, tmp_path, capsys):
    voc = seg_copy(shapes_root, tmp_path)
    config = seg_config(tmp_path, voc, r18_files["mmseg"])
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    mask_path = voc / "SegmentationClass" / f"{train[0]}.png"
    original = Image.open(mask_path)
    original.load()

    def train_seg():
        return run(tools["train_seg"].main, [str(config), "--work-dir", str(tmp_path / "w")], capsys)

    original.resize((48, 64), Image.NEAREST).save(mask_path)
    code, err = train_seg()
    assert code == 2 and f"mask {mask_path} is 48x64 but its image" in one_line(err)

    labels = np.asarray(original).copy()
    labels[:4, :4] = 50
    wrong = Image.fromarray(labels, mode="P")
    wrong.putpalette(original.getpalette())
    wrong.save(mask_path)
    code, err = train_seg()
    assert code == 2 and f"mask {mask_path} has label value(s) 50 outside the 8 classes" in one_line(err)
    original.save(mask_path)

    code, err = run(tools["train_seg"].main, [str(config), "--work-dir", str(tmp_path / "w"), "--cfg-options",
                                              f"val_dataloader.dataset.data_root={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and f"val_dataloader.dataset.data_root {tmp_path / 'nowhere'} does not exist" in one_line(err)


def test_safe_load_calls_a_jpeg_not_a_checkpoint(tmp_path):
    for path in not_weights(tmp_path).values():
        with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
            safe_load(path)
