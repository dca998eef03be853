"""Hostile inputs to the Detectron2 path, second pass (issue 23, points 7, 9 and 12), at toy scale on the CPU.

Each is one line from ``tools/train_net.py`` (or a ``DatasetError`` / ``ConfigError``
from the library it calls) instead of a traceback, a hang or a NaN box.
"""

import xml.etree.ElementTree as ET

import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog

from retro_transfer.d2 import ConfigError, DatasetError, load_config, register_shapes
from test_safety_downstream import (  # noqa: F401  (the tools fixture and helpers)
    d2_args,
    edit_first_object,
    first_annotation,
    one_line,
    tools,
    train_net,
    voc_copy,
)
from tool_helpers import fresh_detectron2_logging, one_thread  # noqa: F401  (autouse fixtures)


# ---------------------------------------------------------------------- 7: a box with nan coordinates


def test_a_voc_box_with_nan_coordinates_is_refused_naming_it(shapes_root, tmp_path):
    """It was loaded as [nan, nan, nan, nan] with no word (nan passes every "inside the image" comparison)."""
    root = voc_copy(shapes_root, tmp_path)
    xml = first_annotation(root)
    edit_first_object(xml, xmin="nan", ymax="inf")
    register_shapes(root)
    with pytest.raises(DatasetError, match=rf"1 box\(es\) have a coordinate that is not a finite number \(first: .*{xml.name}"):
        DatasetCatalog.get("shapes_voc_train")


# ---------------------------------------------------------------------- 9 and 12: training data


@pytest.mark.timeout(240)  # it used to wait forever for a batch that never fills
def test_a_batch_larger_than_the_training_set_is_refused_before_training(tools, shapes_root, tmp_path, capsys):
    argv = d2_args(shapes_root, tmp_path / "out") + ["MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "1000000000"]
    code, err = train_net(tools, argv, capsys)
    assert code == 2, err
    assert "SOLVER.IMS_PER_BATCH 1000000000 is more than the" in one_line(err) and "training images of shapes_voc_trainval" in err


def test_a_training_split_with_no_objects_is_one_line(tools, shapes_root, tmp_path, capsys):
    """Detectron2 asserted "No valid data found" (its images without objects are left out)."""
    root = voc_copy(shapes_root, tmp_path)
    for xml in (root / "VOC2007" / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        for obj in tree.findall("object"):
            tree.getroot().remove(obj)
        tree.write(xml)
    code, err = train_net(tools, d2_args(root, tmp_path / "out") + ["MODEL.WEIGHTS", ""], capsys)
    assert code == 2 and "DATASETS.TRAIN shapes_voc_trainval: no image has an object to train on" in one_line(err)


def test_an_xml_size_that_is_not_the_images_is_refused_when_loading(shapes_root, tmp_path):
    """Detectron2 raised SizeMismatchError only when its loader reached the image, mid-training."""
    root = voc_copy(shapes_root, tmp_path)
    xml = first_annotation(root)
    tree = ET.parse(xml)
    width = int(tree.findtext("size/width"))
    tree.find("size/width").text = str(width + 10)
    tree.write(xml)
    jpeg = root / "VOC2007" / "JPEGImages" / f"{xml.stem}.jpg"
    with Image.open(jpeg) as image:
        height = image.height
    register_shapes(root)
    with pytest.raises(DatasetError, match=rf"{xml.name}: <size> says {width + 10}x{height}, but .*{jpeg.name} is {width}x{height}"):
        DatasetCatalog.get("shapes_voc_train")


# ---------------------------------------------------------------------- 12: configs


def test_config_files_that_are_not_a_yaml_chain_are_one_line(tools, shapes_root, tmp_path, capsys):
    """A .py (AttributeError; and Detectron2 runs it as code), a _BASE_ loop (RecursionError), /etc/passwd."""
    (tmp_path / "a.yaml").write_text(f"_BASE_: b.yaml\nDATASETS:\n  SHAPES_ROOT: {shapes_root}\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (tmp_path / "inherits_py.yaml").write_text("_BASE_: evil.py\n")
    depth = len(tmp_path.resolve().parts)  # ../ enough times to reach / from tmp_path
    passwd = tmp_path / ("../" * depth + "etc/passwd")
    cases = [
        (tmp_path / "a.yaml", "_BASE_ loop: "),
        (tmp_path / "evil.py", "evil.py is not a YAML config (.yaml)"),
        (tmp_path / "inherits_py.yaml", "evil.py (the _BASE_ of "),
        (passwd, "passwd is not a YAML config (.yaml)"),
    ]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(path)
        argv = ["--config", str(path), "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")]
        code, err = train_net(tools, argv, capsys)
        assert code == 2 and message in one_line(err), err
    assert not marker.exists()
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="its YAML is a list, not a mapping of keys"):
        load_config(tmp_path / "list.yaml")


# ---------------------------------------------------------------------- 12: MODEL.WEIGHTS of another kind


@pytest.mark.parametrize("kind", ["teacher", "mmseg"])
def test_model_weights_of_another_toolkit_are_one_line(kind, tools, teacher_ckpt, shapes_root, tmp_path, capsys):
    """A teacher's .pth.tar and an MMSegmentation .pth gave fvcore's "ValueError: Unsupported type found in checkpoint"."""
    if kind == "teacher":
        path, what = teacher_ckpt, "a training checkpoint (a teacher's .pth.tar, say)"
    else:
        path, what = tmp_path / "iter_40.pth", "an MMEngine (MMSegmentation, MMDetection) checkpoint"
        torch.save({"meta": {"epoch": 1, "iter": 40}, "state_dict": {"backbone.conv1.weight": torch.zeros(4, 3, 3, 3)},
                    "optimizer": {"state": {}, "param_groups": []}}, path)
    code, err = train_net(tools, d2_args(shapes_root, tmp_path / "out") + ["MODEL.WEIGHTS", str(path)], capsys)
    assert code == 2, err
    line = one_line(err)
    assert f"MODEL.WEIGHTS {path} is {what}" in line and "tools/convert_to_d2.py" in line, line
