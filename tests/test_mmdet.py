"""MMDetection transfer: configs, converted weights, the Runner and the tools, at toy scale on the CPU.

The chain under test is the user's: a distillation checkpoint ->
``tools/convert_to_openmmlab.py`` -> ``init_cfg`` of ``StudentBackbone`` ->
``tools/train_det.py`` / ``tools/test_det.py``, all on mmcv-lite with the
``mmcv.ops`` stand-in. Tools run in-process through their ``main(argv)``.
"""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import retro_transfer.mmdet  # noqa: F401  (registers the backbone in MMDetection)
from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import save_atomic
from retro_transfer.models.students import Student
from retro_transfer.pipeline import stats
from tool_helpers import load_tool, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mmdet"
STUDENTS = {"r18": "resnet18", "r34": "resnet34", "effb0": "efficientnet_b0", "mbv3": "mobilenetv3_large_100"}
KINDS = {"voc_faster_rcnn": 20, "coco_mask_rcnn_1x": 80, "shapes_faster_rcnn": 7, "shapes_mask_rcnn": 7}

convert_tool = load_tool("convert_to_openmmlab")
train_tool = load_tool("train_det")
test_tool = load_tool("test_det")


def run_tool(tool, argv, capsys):
    """``(exit code, stdout, stderr)`` of a tool's ``main``; errors exit through ``fail``."""
    try:
        code = tool.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def distill_checkpoint(arch: str, path: Path, seed: int) -> Path:
    """A distillation checkpoint in the engine's layout, student weights random (seeded), plus a teacher group."""
    torch.manual_seed(seed)
    body = Student(arch).state_dict()
    model = {f"student.{k}": v for k, v in body.items()}
    model["teacher.backbone.conv1.weight"] = torch.randn(4, 3, 7, 7)
    save_atomic({"format": DISTILL_FORMAT, "method": "retro", "student_arch": arch, "teacher_arch": "resnet50",
                 "config": {}, "step": 1, "model": model}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (distillation checkpoint, its conversion by tools/convert_to_openmmlab.py)."""
    folder = tmp_path_factory.mktemp("mmdet_students")
    files = {}
    for seed, arch in enumerate(STUDENTS.values()):
        source = distill_checkpoint(arch, folder / f"{arch}.pth", seed)
        out = folder / f"{arch}_openmmlab.pth"
        assert convert_tool.main([str(source), str(out)]) == 0
        files[arch] = (source, out)
    return files


def test_configs_cover_every_student_and_task():
    names = {p.stem for p in CONFIGS.glob("*.py")}
    assert names == {f"{kind}_{short}" for kind in KINDS for short in STUDENTS}


def test_every_config_builds_and_loads_converted_weights_completely(converted):
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    for config in sorted(CONFIGS.glob("*.py")):
        kind, short = config.stem.rsplit("_", 1)
        arch = STUDENTS[short]
        cfg = Config.fromfile(str(config))
        assert cfg.model.backbone.arch == arch and cfg.model.roi_head.bbox_head.num_classes == KINDS[kind]
        cfg.model.backbone.init_cfg.checkpoint = str(converted[arch][1])
        model = MODELS.build(cfg.model)
        loaded = retro_transfer.mmseg.load_pretrained(model.backbone, str(converted[arch][1]))  # strict: raises on any gap
        assert loaded == len(model.backbone.state_dict()), config.name
        saved = torch.load(converted[arch][1], weights_only=True)["state_dict"]
        assert all(torch.equal(v, saved[k]) for k, v in model.backbone.state_dict().items()), config.name
        lateral = [m.conv.in_channels for m in model.neck.lateral_convs]
        assert lateral == model.backbone.out_channels, config.name  # the FPN reads what the student gives
        if "mask" in kind:
            assert model.roi_head.mask_head.num_classes == KINDS[kind]


def _tiny_shapes_options(shapes_root, checkpoint, mask: bool):
    """4 iterations at batch 2 on the 64 px test data, validated once at the end, no worker processes."""
    options = [f"model.backbone.init_cfg.checkpoint={checkpoint}", "train_cfg.max_iters=4", "train_cfg.val_interval=4",
               "default_hooks.checkpoint.interval=4", "train_dataloader.batch_size=2", "val_dataloader.batch_size=4",
               "param_scheduler.0.end=2"]
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        options.append(f"{loader}.num_workers=0")
    for i in (0, 1):
        options.append(f"train_dataloader.dataset.datasets.{i}.pipeline.2.scale=(64,64)")
    for loader in ("val_dataloader", "test_dataloader"):
        options.append(f"{loader}.dataset.pipeline.1.scale=(64,64)")
    return options


def _finite_metrics(metrics, keys):
    return all(k in metrics and math.isfinite(metrics[k]) and 0 <= metrics[k] <= 1 for k in keys)


@pytest.mark.parametrize("config, keys", [
    ("shapes_faster_rcnn_r18", ["coco/bbox_mAP", "coco/bbox_mAP_50"]),
    ("shapes_mask_rcnn_r18", ["coco/bbox_mAP", "coco/segm_mAP", "coco/segm_mAP_50"]),
])
def test_four_iterations_on_shapes_give_finite_ap_and_the_tools_refuse_misuse(
        config, keys, converted, shapes_root, tmp_path, capsys):
    arch = STUDENTS[config.rsplit("_", 1)[1]]
    source, weights = converted[arch]
    work = tmp_path / "work"
    options = _tiny_shapes_options(shapes_root, weights, "mask" in config)
    code, out, err = run_tool(train_tool, [config, "--data-root", shapes_root, "--work-dir", work,
                                           "--cfg-options", *options], capsys)
    assert code == 0, err[-3000:]
    assert (work / "iter_4.pth").is_file()

    code, out, err = run_tool(test_tool, [config, work / "iter_4.pth", "--data-root", shapes_root,
                                          "--work-dir", work, "--out", tmp_path / "m.json", "--cfg-options",
                                          *[o for o in options if o.startswith(("test_", "model."))]], capsys)
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert _finite_metrics(metrics, keys), metrics
    assert json.loads(out.strip().splitlines()[-1]) == metrics

    if "faster" in config:  # MMDetection's habits: --eval-only on the latest checkpoint, --resume continues
        code, out, err = run_tool(train_tool, [config, "--data-root", shapes_root, "--work-dir", work, "--eval-only",
                                               "--cfg-options", *[o for o in options if o.startswith(("test_", "model."))]],
                                  capsys)
        assert code == 0 and json.loads(out.strip().splitlines()[-1]) == metrics, err[-3000:]
        code, out, err = run_tool(train_tool, [config, "--data-root", shapes_root, "--work-dir", work, "--resume",
                                               "--cfg-options", *options, "train_cfg.max_iters=5"], capsys)
        assert code == 0, err[-3000:]
        assert torch.load(work / "iter_5.pth", weights_only=True)["meta"]["iter"] == 5

    # A second run into the same work dir without --resume is refused before anything starts.
    code, _, err = run_tool(train_tool, [config, "--data-root", shapes_root, "--work-dir", work,
                                         "--cfg-options", *options], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    # Testing the converted backbone file (not a trained detector) is refused, naming what it is.
    code, _, err = run_tool(test_tool, [config, weights, "--data-root", shapes_root, "--work-dir", work], capsys)
    assert code == 2 and "backbone file from tools/convert_to_openmmlab.py" in err


def test_train_det_refuses_unconverted_and_non_weights_files_before_the_run(converted, shapes_root, tmp_path, capsys):
    source, _ = converted["resnet18"]
    base = ["shapes_faster_rcnn_r18", "--data-root", shapes_root, "--work-dir", tmp_path / "w"]
    code, _, err = run_tool(train_tool, base + ["--cfg-options", f"model.backbone.init_cfg.checkpoint={source}"], capsys)
    assert code == 2 and "convert it first: python tools/convert_to_openmmlab.py" in err
    assert len(err.strip().splitlines()) == 1

    import argparse

    with open(tmp_path / "code.pth", "wb") as f:  # an object that weights_only loading must refuse to build
        pickle.dump({"state_dict": {}, "obj": argparse.Namespace(a=1)}, f)
    code, _, err = run_tool(train_tool, base + ["--cfg-options", f"model.backbone.init_cfg.checkpoint={tmp_path / 'code.pth'}"], capsys)
    assert code == 2 and "code.pth" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_tool(train_tool, base + ["--cfg-options", f"model.backbone.init_cfg.checkpoint={tmp_path / 'x.pth'}"], capsys)
    assert code == 2 and "x.pth does not exist" in err
    code, _, err = run_tool(train_tool, base + ["--cfg-options", "model.backbone.init_cfg.checkpoint=None"], capsys)
    assert code == 2 and "model.backbone.init_cfg=None" in err  # says how to train from random init
    code, _, err = run_tool(train_tool, ["shapes_faster_rcnn_r81"], capsys)
    assert code == 2 and "shapes_faster_rcnn_r18.py" in err  # the closest names
    code, _, err = run_tool(train_tool, ["shapes_fcn_r18"], capsys)
    assert code == 2 and "segmentation config" in err
    code, _, err = run_tool(train_tool, base + ["--data-root", tmp_path / "nowhere",
                                                "--cfg-options", "model.backbone.init_cfg=None"], capsys)
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = run_tool(train_tool, base + ["--launcher", "pytorch"], capsys)
        assert code == 2 and "needs GPUs" in err
        code, _, err = run_tool(train_tool, base + ["--amp", "--cfg-options", "model.backbone.init_cfg=None"], capsys)
        assert code == 2 and "--amp needs a GPU" in err


def test_data_root_moves_every_dataset_and_the_coco_annotations(tmp_path):
    from retro_transfer.mmdet import launch

    cfg = launch.load_config(CONFIGS / "shapes_mask_rcnn_r18.py", data_root=tmp_path)
    roots = [d.data_root for d in cfg.train_dataloader.dataset.datasets] + [cfg.test_dataloader.dataset.data_root]
    assert roots == [str(tmp_path)] * 3
    assert cfg.test_evaluator.ann_file == str(tmp_path / "annotations/instances_test.json")
    voc = launch.load_config(CONFIGS / "voc_faster_rcnn_r18.py", data_root=tmp_path)
    assert [d.data_root for d in voc.train_dataloader.dataset.dataset.datasets] == [str(tmp_path)] * 2


# ---------------------------------------------------------------------- AP50: recomputation = VOCMetric


def _random_detections(seed: int, images: int = 12, classes: int = 3):
    rng = np.random.default_rng(seed)
    samples, predictions, truth = [], [], []
    for _ in range(images):
        g = rng.integers(1, 5)
        xy = rng.uniform(0, 80, (g, 2))
        gt = np.hstack([xy, xy + rng.uniform(8, 30, (g, 2))])
        gl = rng.integers(0, classes, g)
        hard = rng.random(g) < 0.2  # VOC "difficult": ignored by both
        d = rng.integers(0, 8)
        picks = rng.integers(0, g, d)
        det = gt[picks] + rng.normal(0, 4, (d, 4))  # near the objects: some hits, some misses
        dl = np.where(rng.random(d) < 0.8, gl[picks], rng.integers(0, classes, d))
        ds = rng.uniform(0.05, 1, d)
        samples.append(dict(
            gt_instances=dict(bboxes=torch.tensor(gt[~hard]), labels=torch.tensor(gl[~hard])),
            ignored_instances=dict(bboxes=torch.tensor(gt[hard]).reshape(-1, 4), labels=torch.tensor(gl[hard])),
            pred_instances=dict(bboxes=torch.tensor(det).reshape(-1, 4), scores=torch.tensor(ds),
                                labels=torch.tensor(dl))))
        predictions.append((det.reshape(-1, 4), ds, dl))
        truth.append((gt, gl, hard))
    return samples, predictions, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_ap50_recomputation_equals_mmdetections_voc_metric(seed):
    from mmdet.evaluation import VOCMetric

    samples, predictions, truth = _random_detections(seed)
    assert all(np.isin(np.arange(3), np.concatenate([t[1][~t[2]] for t in truth])))  # every class has positives
    metric = VOCMetric(iou_thrs=0.5, eval_mode="11points")
    metric.dataset_meta = dict(classes=("a", "b", "c"))
    metric.process({}, samples)
    official = metric.compute_metrics(metric.results)["AP50"]
    ours = stats.ap50(stats.detection_pieces(predictions, truth, 3))(np.arange(len(samples)))
    # VOCMetric rounds its AP50 (a fraction) to 3 decimals: at most 0.0005 from the exact value.
    assert abs(ours / 100 - official) <= 0.0005 + 1e-9, (ours, official)
    assert 0 < official < 1  # neither trivially empty nor perfect


# ---------------------------------------------------------------------- pipeline --preset full


def test_full_preset_runs_mmdetection_from_the_retro_student_with_an_interval(converted, shapes_root, tmp_path,
                                                                              monkeypatch):
    from retro_transfer.pipeline import PRESETS
    from retro_transfer.pipeline.build import build_stages
    from retro_transfer.pipeline.mmdet_stages import mmdet_evidence, mmdet_sections, mmdet_stages
    from retro_transfer.pipeline.runner import Context

    assert {"mmdet_retro", "mmdet_random"} <= {s.name for s in build_stages(PRESETS["full"])}
    assert not any(s.name.startswith("mmdet_") for s in build_stages(PRESETS["default"]))
    preset = {**PRESETS["smoke"], "mmdet_iters": 3, "det_batch": 2}
    stages = {s.name: s for s in mmdet_stages(preset)}
    ctx = Context(out=tmp_path, preset=preset)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes").symlink_to(shapes_root)
    (tmp_path / "convert_retro").mkdir()
    (tmp_path / "convert_retro" / "student_mmseg.pth").symlink_to(converted["efficientnet_b0"][1])
    monkeypatch.chdir(ROOT)  # the pipeline names its configs from the repository root
    folder = ctx.folder("mmdet_retro")
    folder.mkdir()
    metrics = stages["mmdet_retro"].run(ctx, folder, stages["mmdet_retro"].calls(ctx, folder))
    assert metrics["init"] == "retro" and metrics["iters"] == 3 and 0 <= metrics["AP50"] <= 100
    records = {"mmdet_retro": {"metrics": metrics}}
    evidence = mmdet_evidence(tmp_path, records)["retro"]
    assert evidence["value"].value == metrics["AP50"]
    assert evidence["value"].low <= evidence["value"].high and evidence["num_images"] > 0
    # The interval's centre is VOCMetric's AP50; the per-image recomputation of the same detections agrees
    # with it up to VOCMetric's rounding to 3 decimals of a fraction (0.05 points of a percentage).
    from retro_transfer.pipeline import stats
    from retro_transfer.pipeline.runner import read_json

    data = read_json(folder / "per_image.json")
    predictions = [(np.array(i["boxes"]).reshape(-1, 4), np.array(i["scores"]), np.array(i["labels"]))
                   for i in data["images"]]
    truth = [(np.array(i["truth"]["boxes"]).reshape(-1, 4), np.array(i["truth"]["labels"]),
              np.array(i["truth"]["difficult"])) for i in data["images"]]
    recomputed = stats.ap50(stats.detection_pieces(predictions, truth, 7))(np.arange(len(predictions)))
    assert abs(recomputed - metrics["AP50"]) <= 0.05 + 1e-9
    assert "Detection with MMDetection" in mmdet_sections(tmp_path, records)[0]
    command = stages["mmdet_retro"].command(ctx, folder)
    assert command.startswith("python tools/train_det.py configs/mmdet/shapes_faster_rcnn_effb0.py")
