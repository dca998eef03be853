"""The downstream commands as a new user types them (issue 12), at toy scale on the CPU.

Config names resolve for every tool; the shapes data carries COCO instance
masks and Mask R-CNN trains on them with box and mask AP; every shipped
detection and segmentation config builds and takes a converted backbone of
its architecture exactly; ``train_seg --data-root`` points every loader at a
folder and names what is missing there; no dependency warning at start-up.
"""

import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import save_atomic
from retro_transfer.cli import resolve_config
from retro_transfer.convert import read_backbone
from retro_transfer.d2 import RetroCheckpointer, load_config, register_shapes, save_d2, to_detectron2
from retro_transfer.data.shapes import CLASSES, VOID
from retro_transfer.models.students import Student

from tool_helpers import fresh_detectron2_logging, load_tool, one_thread  # noqa: F401  (autouse fixtures)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STUDENTS = ("efficientnet_b0", "mobilenetv3_large_100", "resnet18", "resnet34")


def error_of(call, capsys) -> str:
    """The one-line error a tool exits with (code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def distill_files(tmp_path_factory):
    """arch -> a distillation checkpoint of a (random) student, as tools/distill.py writes it."""
    folder = tmp_path_factory.mktemp("students")
    torch.manual_seed(0)
    files = {}
    for arch in STUDENTS:
        body = Student(arch).body.state_dict()
        files[arch] = folder / f"{arch}.pth"
        torch.save({"format": DISTILL_FORMAT, "method": "retro", "student_arch": arch, "step": 1, "config": {},
                    "model": {f"student.body.{k}": v for k, v in body.items()}}, files[arch])
    return files


@pytest.fixture(scope="module")
def d2_files(distill_files, tmp_path_factory):
    """arch -> a Detectron2 file converted from it; resnet50 from a torchvision ResNet-50 (Detectron2's ResNet)."""
    folder = tmp_path_factory.mktemp("d2")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), folder / "resnet50.pth")
    sources = {**distill_files, "resnet50": folder / "resnet50.pth"}
    files = {}
    for arch, path in sources.items():
        files[arch] = folder / f"{arch}.pkl"
        save_d2(to_detectron2(read_backbone(path)), files[arch])
    return files


# ---------------------------------------------------------------------- config names


def test_config_names_resolve_for_every_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bare names and repository paths work from any folder
    detection = CONFIGS / "detection" / "voc_frcnn_effb0.yaml"
    for name in ("voc_frcnn_effb0.yaml", "voc_frcnn_effb0", "configs/detection/voc_frcnn_effb0.yaml", str(detection)):
        assert resolve_config(name, "detection").resolve() == detection
    assert resolve_config("retro_effb0_r50", "distill") == CONFIGS / "distill" / "retro_effb0_r50.yaml"
    assert resolve_config("shapes_moco_v2_r50", "teacher") == CONFIGS / "teacher" / "shapes_moco_v2_r50.yaml"
    assert resolve_config("shapes_fcn_r18.py", "segmentation") == CONFIGS / "segmentation" / "shapes_fcn_r18.py"
    with pytest.raises(FileNotFoundError, match="closest: voc_frcnn_effb0.yaml"):
        resolve_config("voc_frcnn_efb0", "detection")
    with pytest.raises(FileNotFoundError, match="is a segmentation config .*shapes_fcn_r18.py.*not a detection one"):
        resolve_config("shapes_fcn_r18", "detection")


def test_tools_take_config_names(capsys):
    train_net = load_tool("train_net")
    for flag in ("--config", "--config-file"):
        args = train_net.build_parser().parse_args([flag, "shapes_frcnn_r18"])
        assert Path(args.config_file) == CONFIGS / "detection" / "shapes_frcnn_r18.yaml"
    line = error_of(lambda: train_net.build_parser().parse_args(["--config", "voc_frcnn_efb0.yaml"]), capsys)
    assert "closest: voc_frcnn_effb0.yaml" in line

    distill = load_tool("distill")
    assert Path(distill.build_parser().parse_args(["--config", "retro_effb0_r50"]).config).name == "retro_effb0_r50.yaml"
    assert "closest: retro_effb0_r50.yaml" in error_of(lambda: distill.build_parser().parse_args(["--config", "retro_efb0_r50"]),
                                                         capsys)
    teacher = load_tool("pretrain_teacher")
    assert "closest: shapes_moco_v2_r50.yaml" in error_of(lambda: teacher.main(["--config", "shapes_moco_r50"]),
                                                           capsys)
    for tool in ("train_seg", "test_seg"):
        parser = load_tool(tool).build_parser()
        extra = ["ckpt.pth"] if tool == "test_seg" else []
        assert Path(parser.parse_args(["shapes_fcn_r18", *extra]).config).name == "shapes_fcn_r18.py"


# ---------------------------------------------------------------------- Mask R-CNN on shapes-COCO


def test_shapes_coco_annotations_match_the_voc_data(shapes_root):
    voc = shapes_root / "VOC2007"
    for split in ("train", "val", "test"):
        coco = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(CLASSES)
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert [im["file_name"] for im in coco["images"]] == [f"{i}.jpg" for i in ids]
        by_image = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for image in coco["images"]:
            stem = image["file_name"][:-4]
            objects = ET.parse(voc / "Annotations" / f"{stem}.xml").findall("object")
            instances = np.asarray(Image.open(voc / "SegmentationObject" / f"{stem}.png"))
            anns = by_image[image["id"]]
            assert len(anns) == len(objects) > 0
            for index, (ann, obj) in enumerate(zip(anns, objects), start=1):
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                # The mask is the object's visible pixels: its instance map region plus the void border.
                assert (mask[instances == index]).all() and not mask[(instances != index) & (instances != VOID)].any()
                assert ann["area"] == mask.sum() and CLASSES[ann["category_id"] - 1] == obj.findtext("name")
                xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
                assert ann["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
    register_shapes(shapes_root)
    records = DatasetCatalog.get("shapes_coco_test")
    assert len(records) == len(coco["images"]) and all(r["annotations"] for r in records)


def mask_rcnn_args(shapes_root, out, weights, iters=4):
    return ["--config", "shapes_mrcnn_r18", "MODEL.WEIGHTS", str(weights), "DATASETS.SHAPES_ROOT", str(shapes_root),
            "OUTPUT_DIR", str(out), "SEED", "0", "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "DATALOADER.NUM_WORKERS", "0"]


def test_mask_rcnn_trains_from_a_converted_student_with_box_and_mask_ap(d2_files, shapes_root, tmp_path):
    train_net = load_tool("train_net")
    args = train_net.build_parser().parse_args(mask_rcnn_args(shapes_root, tmp_path, d2_files["resnet18"]))
    results = train_net.main(args)
    for task in ("bbox", "segm"):
        assert all(math.isfinite(results[task][name]) for name in ("AP", "AP50", "AP75")), results
    assert (tmp_path / "inference" / "shapes_coco_test" / "coco_instances_results.json").is_file()


def test_pipeline_mask_rcnn_stage_runs_in_the_full_preset(shapes_root, tmp_path, monkeypatch):
    from retro_transfer.pipeline import PRESETS
    from retro_transfer.pipeline.downstream import downstream_stages
    from retro_transfer.pipeline.runner import Context

    # --preset full reports Mask R-CNN from each initialisation; the others leave it out (30 minutes, tests' time).
    assert {"mrcnn_retro", "mrcnn_moco_v2", "mrcnn_random"} <= {s.name for s in downstream_stages(PRESETS["full"])}
    for name in ("smoke", "quick", "default"):
        assert not any(s.name.startswith("mrcnn_") for s in downstream_stages(PRESETS[name])), name
    preset = {**PRESETS["smoke"], "mrcnn_iters": 3, "det_batch": 2}
    stages = {s.name: s for s in downstream_stages(preset)}
    assert {"mrcnn_retro", "mrcnn_moco_v2", "mrcnn_random"} <= set(stages)
    ctx = Context(out=tmp_path, preset=preset)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes").symlink_to(shapes_root)
    monkeypatch.chdir(ROOT)  # the pipeline names its configs from the repository root
    folder = ctx.folder("mrcnn_random")
    folder.mkdir()
    metrics = stages["mrcnn_random"].run(ctx, folder, stages["mrcnn_random"].calls(ctx, folder))
    assert metrics["init"] == "random" and metrics["iters"] == 3
    assert all(math.isfinite(metrics[f"{p}_{n}"]) for p in ("box", "mask") for n in ("AP", "AP50", "AP75"))
    assert "--config-file configs/detection/shapes_mrcnn_effb0.yaml" in stages["mrcnn_random"].command(ctx, folder)


# ---------------------------------------------------------------------- every shipped config builds


def _backbone_arch(cfg) -> str:
    if cfg.MODEL.BACKBONE.NAME.startswith(("build_timm", "build_retinanet_timm")):
        return cfg.MODEL.TIMM.ARCH
    return f"resnet{cfg.MODEL.RESNETS.DEPTH}"


def test_every_detection_config_builds_and_takes_its_converted_backbone(d2_files):
    configs = sorted((CONFIGS / "detection").glob("*.yaml"))
    assert len(configs) >= 31
    for path in configs:
        cfg = load_config(path, ["MODEL.DEVICE", "cpu"])
        model = build_model(cfg)
        checkpointer = RetroCheckpointer(model)
        pkl = str(d2_files[_backbone_arch(cfg)])
        # RetroCheckpointer refuses a file that leaves any backbone tensor unset.
        incompatible = checkpointer._load_model(checkpointer._load_file(pkl))
        assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == [], path.name


@pytest.mark.exact
def test_every_segmentation_config_builds_and_takes_its_converted_backbone(distill_files, tmp_path):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import retro_transfer.mmseg  # noqa: F401  (registers StudentBackbone)
    from retro_transfer.mmseg.conversion import to_mmseg

    init_default_scope("mmseg")
    converted = {}
    for arch, path in distill_files.items():
        converted[arch] = tmp_path / f"{arch}_mmseg.pth"
        save_atomic(to_mmseg(read_backbone(path))[0], converted[arch])
    configs = sorted((CONFIGS / "segmentation").glob("*.py"))
    assert len(configs) == 24
    for path in configs:
        cfg = Config.fromfile(str(path))
        cfg.model.backbone.init_cfg.checkpoint = str(converted[cfg.model.backbone.arch])
        model = MODELS.build(cfg.model)
        model.backbone.init_weights()  # StudentBackbone loads strictly: a missing or extra tensor raises
        loaded = model.backbone.state_dict()
        reference = torch.load(converted[cfg.model.backbone.arch], weights_only=True)["state_dict"]
        assert set(loaded) == set(reference), path.name
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), path.name


# ---------------------------------------------------------------------- train_seg --data-root


def test_data_root_points_every_loader_and_names_what_is_missing(shapes_root, tmp_path, capsys):
    from retro_transfer.mmseg import launch

    voc = shapes_root / "VOC2007"
    cfg = launch.load_config(CONFIGS / "segmentation" / "shapes_fcn_r18.py", data_root=voc)
    assert {cfg[f"{s}_dataloader"].dataset.data_root for s in ("train", "val", "test")} == {str(voc)}

    train_seg = load_tool("train_seg")

    def run(data_root):
        args = ["shapes_fcn_r18", "--data-root", str(data_root), "--work-dir", str(tmp_path / "w"),
                "--cfg-options", "model.backbone.init_cfg=None"]
        return error_of(lambda: train_seg.main(args), capsys)

    assert f"train_dataloader.dataset.data_root {tmp_path / 'nowhere'} does not exist" in run(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "JPEGImages").mkdir(parents=True)
    (empty / "SegmentationClass").mkdir()
    expected = empty / "ImageSets" / "Segmentation" / "train.txt"
    assert f"split file {expected} not found" in run(empty)
    expected.parent.mkdir(parents=True)
    expected.write_text("000001\n")
    assert f"image {empty / 'JPEGImages' / '000001.jpg'} does not exist" in run(empty)


# ---------------------------------------------------------------------- start-up noise


def test_no_torch_jit_warning_at_tool_start_and_nothing_else_filtered(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "tools/convert_to_d2.py", str(tmp_path / "missing.pth"),
                          str(tmp_path / "out.pkl")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "does not exist" in run.stderr
    assert "torch.jit.script" not in run.stderr and "FutureWarning" not in run.stderr, run.stderr
    probe = ("import warnings, retro_transfer.cli; "
             "warnings.warn('`torch.jit.script` is deprecated. Please switch', FutureWarning); "
             "warnings.warn('another future change', FutureWarning)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "another future change" in run.stderr and "torch.jit.script" not in run.stderr


# ---------------------------------------------------------------------- no two runs in one folder


def test_a_new_training_run_never_writes_over_another(shapes_root, tmp_path, capsys):
    """train_net and train_seg refuse a folder holding a run (its last_checkpoint) unless told --resume."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "last_checkpoint").write_text("model_0000009.pth")
    train_net = load_tool("train_net")
    args = train_net.build_parser().parse_args(
        ["--config", "shapes_frcnn_r18", "MODEL.WEIGHTS", "", "DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(held)]
    )
    message = error_of(lambda: train_net.setup(args), capsys)
    assert f"OUTPUT_DIR {held} already holds a run" in message and "--resume" in message

    train_seg = load_tool("train_seg")
    seg_args = ["shapes_fcn_r18", "--data-root", str(shapes_root / "VOC2007"), "--work-dir", str(held),
                "--cfg-options", "model.backbone.init_cfg=None"]
    message = error_of(lambda: train_seg.main(seg_args), capsys)
    assert f"work dir {held} already holds a run" in message and "--resume" in message
