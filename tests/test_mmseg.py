"""MMSegmentation transfer: backbone, converter, configs and the Runner, at toy scale on the CPU.

The chain under test is the user's: a distillation checkpoint ->
``tools/convert_to_mmseg.py`` -> ``init_cfg`` of ``StudentBackbone`` ->
``tools/train_seg.py`` / ``tools/test_seg.py``. Tools run in-process through
their ``main(argv)`` (a second interpreter would import torch and mmseg again).
"""

import importlib.util
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, MODELS

import retro_transfer.mmseg  # noqa: F401  (registers the backbone and data sets)
from distill.common import DISTILL_FORMAT
from retro_transfer.safe_io import CheckpointError, save_atomic
from retro_transfer.mmseg import launch
from retro_transfer.mmseg.backbones import MMSEG_FORMAT, StudentBackbone
from retro_transfer.mmseg.safe_globals import allow_runner_checkpoints, runner_checkpoint_globals
from retro_transfer.models.students import Student

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "segmentation"
STUDENTS = ["efficientnet_b0", "mobilenetv3_large_100", "resnet18", "resnet34"]
NUM_CLASSES = {"voc": 21, "cityscapes": 19, "shapes": 8}

@pytest.fixture(autouse=True)
def _mmseg_scope():
    """As the configs' default_scope does: heads and preprocessors resolve in mmseg (other test files use mmdet's)."""
    init_default_scope("mmseg")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_tool = load_tool("convert_to_mmseg")
train_tool = load_tool("train_seg")
test_tool = load_tool("test_seg")


def run_tool(tool, argv, capsys):
    """``(exit code, stdout, stderr)`` of a tool's ``main``; errors exit through ``fail``."""
    try:
        code = tool.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def trained_looking(student: Student, seed: int) -> Student:
    """Random weights and BatchNorm statistics, so a tensor that failed to load would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return student.eval()


def distill_checkpoint(student: Student, path: Path) -> Path:
    """A distillation checkpoint in the engine's layout, with every group a converter must drop."""
    body = student.state_dict()
    model = {f"student.{k}": v for k, v in body.items()}
    model.update({f"student_ema.{k}": v.clone() for k, v in body.items()})
    model.update({
        "adapter.0.weight": torch.randn(8, 4, 1, 1),
        "teacher.backbone.conv1.weight": torch.randn(4, 3, 7, 7),
        "teacher.head.0.weight": torch.randn(4, 4),
        "queue.embeddings": torch.randn(16, 4),
        "queue.ptr": torch.zeros((), dtype=torch.long),
    })
    ckpt = {"format": DISTILL_FORMAT, "method": "retro", "student_arch": student.arch, "teacher_arch": "resnet50",
            "config": {}, "step": 10, "model": model}
    save_atomic(ckpt, path)
    return path


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """arch -> (student in eval mode, distillation checkpoint, converted MMSeg checkpoint)."""
    folder = tmp_path_factory.mktemp("students")
    return {arch: _convert_student(arch, i, folder) for i, arch in enumerate(STUDENTS)}


def _convert_student(arch, seed, folder):
    student = trained_looking(Student(arch), seed)
    src = distill_checkpoint(student, folder / f"{arch}.pth")
    out = folder / f"{arch}_mmseg.pth"
    assert convert_tool.main([str(src), str(out)]) == 0
    return student, src, out


def build(cfg: dict) -> nn.Module:
    return MODELS.build(Config(dict(model=cfg)).model)


# ---------------------------------------------------------------------- backbone = student after conversion


@pytest.mark.parametrize("arch", STUDENTS)
def test_backbone_features_equal_the_distilled_student(arch, students):
    student, _, converted = students[arch]
    backbone = build(dict(type="StudentBackbone", arch=arch, out_indices=(0, 1, 2, 3, 4),
                          init_cfg=dict(type="Pretrained", checkpoint=str(converted))))
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = backbone(x)
        want = student.body.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(want) == 5
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, level
        assert (g - w).abs().max().item() < 1e-4, f"level {level}"
        assert w.abs().max().item() > 1e-3  # the comparison is not between two zero maps


def test_converter_reports_converted_and_dropped_groups(tmp_path, capsys):
    student = trained_looking(Student("resnet18"), 5)
    src = distill_checkpoint(student, tmp_path / "r18.pth")
    code, out, err = run_tool(convert_tool, [src, tmp_path / "out.pth"], capsys)
    assert code == 0, err
    body = len(student.body.state_dict())
    assert f"converted {body} tensors" in out
    for group in ("layer4", "conv1", "student_ema", "adapter", "teacher", "queue"):
        assert group in out
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)
    assert ckpt["meta"]["format"] == MMSEG_FORMAT and ckpt["meta"]["arch"] == "resnet18"
    assert set(ckpt["state_dict"]) == {"body." + k for k in student.body.state_dict()}
    assert ckpt["meta"]["dropped"]["student_ema"] == body


def test_torchvision_resnet_converts_to_the_same_features(tmp_path, capsys):
    """torchvision's ResNet names are timm's: a (teacher-style) torchvision file needs no renaming."""
    net = torchvision.models.resnet18(weights=None).eval()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    code, out, err = run_tool(convert_tool, [tmp_path / "tv.pth", tmp_path / "tv_mmseg.pth"], capsys)
    assert code == 0, err
    assert "torchvision" in out and "classifier" in out
    backbone = build(dict(type="StudentBackbone", arch="resnet18",
                          init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "tv_mmseg.pth"))))
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        layers = nn.Sequential(*list(net.children())[:-2])
        assert (backbone(x)[-1] - layers(x)).abs().max().item() < 1e-4


# ---------------------------------------------------------------------- clear errors


def test_converter_errors_are_one_clear_line(students, tmp_path, capsys):
    _, src, _ = students["resnet18"]
    code, _, err = run_tool(convert_tool, [tmp_path / "nope.pth", tmp_path / "o.pth"], capsys)
    assert code == 2 and "does not exist" in err

    code, _, err = run_tool(convert_tool, [src, tmp_path / "o.pth", "--arch", "resnet34"], capsys)
    assert code == 2 and "resnet18" in err and "resnet34" in err

    no_student = {"format": DISTILL_FORMAT, "student_arch": "resnet18",
                  "model": {"teacher.backbone.conv1.weight": torch.zeros(1)}}
    torch.save(no_student, tmp_path / "teacher_only.pth")
    code, _, err = run_tool(convert_tool, [tmp_path / "teacher_only.pth", tmp_path / "o.pth"], capsys)
    assert code == 2 and "no student" in err

    (tmp_path / "exists.pth").write_bytes(b"keep")
    code, _, err = run_tool(convert_tool, [src, tmp_path / "exists.pth"], capsys)
    assert code == 2 and "--force" in err and (tmp_path / "exists.pth").read_bytes() == b"keep"
    code, _, err = run_tool(convert_tool, [src, tmp_path / "exists.pth", "--force"], capsys)
    assert code == 0, err


def test_converter_refuses_to_drop_a_backbone_tensor(tmp_path, capsys):
    student = Student("resnet18")
    path = distill_checkpoint(student, tmp_path / "r18.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["student.body.layer9.0.conv1.weight"] = torch.zeros(1)  # not in any ResNet-18
    torch.save(ckpt, path)
    code, _, err = run_tool(convert_tool, [path, tmp_path / "o.pth"], capsys)
    assert code == 2 and "layer9.0.conv1.weight" in err and not (tmp_path / "o.pth").exists()


def _pretrained(arch, checkpoint, **kwargs):
    return build(dict(type="StudentBackbone", arch=arch,
                      init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint), **kwargs)))


def test_backbone_loading_errors_name_the_problem(students, tmp_path):
    _, src, converted = students["resnet18"]
    with pytest.raises(CheckpointError, match="does not exist"):
        _pretrained("resnet18", tmp_path / "missing.pth").init_weights()
    with pytest.raises(CheckpointError, match="holds a resnet18 backbone but the config builds resnet34"):
        _pretrained("resnet34", converted).init_weights()
    with pytest.raises(CheckpointError, match="convert it first"):
        _pretrained("resnet18", src).init_weights()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        build(dict(type="StudentBackbone", arch="resnet18", init_cfg=dict(type="Pretrained"))).init_weights()

    ckpt = torch.load(converted, weights_only=True)
    del ckpt["state_dict"]["body.layer3.1.bn2.running_var"]
    torch.save(ckpt, tmp_path / "one_missing.pth")
    with pytest.raises(CheckpointError, match=r"1 backbone tensor\(s\) missing \(body.layer3.1.bn2.running_var\)"):
        _pretrained("resnet18", tmp_path / "one_missing.pth").init_weights()

    # Without the arch in meta, a ResNet-34 file still does not load into a ResNet-18
    # (every ResNet-18 key exists in it with the same shape: only the extra keys tell).
    r34 = torch.load(students["resnet34"][2], weights_only=True)
    torch.save({"state_dict": r34["state_dict"]}, tmp_path / "r34_no_meta.pth")
    with pytest.raises(CheckpointError, match="the resnet18 backbone does not have"):
        _pretrained("resnet18", tmp_path / "r34_no_meta.pth").init_weights()


def test_train_seg_fails_early_on_a_missing_pretrained_file(tmp_path, capsys):
    config = CONFIGS / "shapes_fcn_r18.py"
    code, _, err = run_tool(train_tool, [config, "--work-dir", tmp_path,
                                         "--cfg-options", f"model.backbone.init_cfg.checkpoint={tmp_path / 'x.pth'}"],
                            capsys)
    assert code == 2 and "x.pth does not exist" in err
    code, _, err = run_tool(train_tool, [config, "--work-dir", tmp_path], capsys)
    assert code == 2 and "model.backbone.init_cfg.checkpoint=" in err
    code, _, err = run_tool(train_tool, [tmp_path / "nope.py"], capsys)
    assert code == 2 and "nope.py does not exist" in err


# ---------------------------------------------------------------------- backbone options


def test_frozen_stages_and_norm_eval():
    backbone = build(dict(type="StudentBackbone", arch="resnet18", frozen_stages=1))
    backbone.train()
    grads = {name.split(".")[1]: p.requires_grad for name, p in backbone.named_parameters()}
    assert grads == {"conv1": False, "bn1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}
    assert not backbone.body.bn1.training and not backbone.body.layer1[0].bn1.training
    assert backbone.body.layer2[0].bn1.training

    backbone = build(dict(type="StudentBackbone", arch="efficientnet_b0", frozen_stages=1, norm_eval=True))
    backbone.train()
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert any(n.startswith("conv_stem") for n in frozen) and any(n.startswith("blocks.1.") for n in frozen)
    assert not any(n.startswith("blocks.2.") for n in frozen)
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    with pytest.raises(ValueError, match="out_indices"):
        build(dict(type="StudentBackbone", arch="resnet18", out_indices=(5,)))


@pytest.mark.exact
def test_syncbn_config_keeps_timms_fused_norm_act(monkeypatch):
    """On one process SyncBN stays BN; on several it becomes timm's SyncBatchNormAct, activation kept.

    torch's and MMEngine's converters turn timm's BatchNormAct2d into a plain
    SyncBatchNorm and silently drop the activation fused into it.

    Exact on any CPU: in eval mode both norms are the same F.batch_norm on the same running
    statistics followed by the same activation, the same operations on the same shapes.
    """
    from retro_transfer.mmseg import backbones

    bn = build(dict(type="StudentBackbone", arch="efficientnet_b0")).eval()
    one = build(dict(type="StudentBackbone", arch="efficientnet_b0", norm_cfg=dict(type="SyncBN"))).eval()
    assert type(one.body.bn1).__name__ == "BatchNormAct2d"
    monkeypatch.setattr(backbones, "get_world_size", lambda: 2)
    many = build(dict(type="StudentBackbone", arch="efficientnet_b0", norm_cfg=dict(type="SyncBN"))).eval()
    assert type(many.body.bn1).__name__ == "SyncBatchNormAct"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for other in (one, many):
            other.load_state_dict(bn.state_dict())
            assert all(torch.equal(a, b) for a, b in zip(bn(x), other(x)))  # eval mode: no synchronisation


# ---------------------------------------------------------------------- configs


def _config_files():
    return sorted(p for p in CONFIGS.glob("*.py"))


def test_configs_cover_every_student_head_and_data_set():
    names = {p.stem for p in _config_files()}
    for data in ("voc", "cityscapes", "shapes"):
        for head in ("fcn", "deeplabv3plus"):
            for student in ("effb0", "mbv3", "r18", "r34"):
                assert f"{data}_{head}_{student}" in names


def test_every_config_fits_its_backbone():
    channels = {}
    for path in _config_files():
        cfg = Config.fromfile(str(path))
        model = cfg.model
        assert cfg.custom_imports["imports"] == ["retro_transfer.mmseg"]
        assert model.backbone.type == "StudentBackbone" and model.backbone.init_cfg.type == "Pretrained"
        key = model.backbone.arch
        if key not in channels:
            channels[key] = StudentBackbone(key).level_channels
        out = [channels[key][i] for i in model.backbone.out_indices]
        assert model.decode_head.in_channels == out[model.decode_head.in_index], path.name
        assert model.auxiliary_head.in_channels == out[model.auxiliary_head.in_index], path.name
        if model.decode_head.type == "DepthwiseSeparableASPPHead":
            assert model.decode_head.c1_in_channels == out[0], path.name
        classes = NUM_CLASSES[path.stem.split("_")[0]]
        assert model.decode_head.num_classes == model.auxiliary_head.num_classes == classes, path.name
        assert model.data_preprocessor.size == cfg.crop_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_distributed_launch_without_gpu_is_refused_up_front(tmp_path, capsys):
    code, _, err = run_tool(train_tool, [CONFIGS / "shapes_fcn_r18.py", "--launcher", "pytorch"], capsys)
    assert code == 2 and "needs GPUs" in err


@pytest.mark.parametrize("config", ["shapes_fcn_mbv3.py", "shapes_deeplabv3plus_effb0.py"])
def test_segmentors_build_and_predict_without_compiled_ops(config):
    cfg = Config.fromfile(str(CONFIGS / config))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64), mode="tensor")
    assert logits.shape[1] == 8 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------- data sets


def _voc_like(tmp_path, shapes_root, with_aug):
    voc = Path(shapes_root) / "VOC2007"
    root = tmp_path / ("aug" if with_aug else "plain")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name in ("JPEGImages", "SegmentationClass"):
        (root / name).symlink_to(voc / name)
    sets = voc / "ImageSets" / "Segmentation"
    train = (sets / "train.txt").read_text().split()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text((sets / "train.txt").read_text())
    if with_aug:
        (root / "SegmentationClassAug").symlink_to(voc / "SegmentationClass")
        (root / "ImageSets" / "Segmentation" / "aug.txt").write_text((sets / "trainval.txt").read_text())
    return root, train, (sets / "trainval.txt").read_text().split()


@pytest.mark.parametrize("with_aug", [True, False])
def test_voc_aug_data_set_adds_the_augmented_set_when_present(tmp_path, shapes_root, with_aug):
    root, train, trainval = _voc_like(tmp_path, shapes_root, with_aug)
    dataset = DATASETS.build(dict(type="VOCAugDataset", data_root=str(root),
                                  data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
                                  pipeline=[]))
    assert len(dataset) == (len(set(train) | set(trainval)) if with_aug else len(train))
    seg_dirs = {Path(dataset.get_data_info(i)["seg_map_path"]).parent.name for i in range(len(dataset))}
    assert seg_dirs == ({"SegmentationClass", "SegmentationClassAug"} if with_aug else {"SegmentationClass"})


# ---------------------------------------------------------------------- weights_only and Runner checkpoints


def test_allow_list_is_idempotent_and_getattr_is_restricted(tmp_path):
    before = torch.serialization.get_safe_globals()
    allow_runner_checkpoints()
    allow_runner_checkpoints()
    assert len(torch.serialization.get_safe_globals()) == len(before)
    assert all(g in before for g in runner_checkpoint_globals())

    class Reaches:  # pickles as getattr(HistoryBuffer, "__init__"): not a statistics method
        def __reduce__(self):
            return getattr, (HistoryBuffer, "__init__")

    torch.save({"x": Reaches()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(tmp_path / "evil.pth", weights_only=True)


def _shapes_config(tmp_path, shapes_root, checkpoint) -> Path:
    """shapes_deeplabv3plus_r18 at 64 px, batch 4, no worker processes, a few iterations."""
    cfg = Config.fromfile(str(CONFIGS / "shapes_deeplabv3plus_r18.py"))
    size = (64, 64)
    cfg.model.data_preprocessor.size = size
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[name]
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = str(Path(shapes_root) / "VOC2007")
        for step in loader.dataset.pipeline:
            if step.type in ("RandomResize", "Resize"):
                step.scale = size
            if step.type == "RandomCrop":
                step.crop_size = size
    cfg.train_dataloader.batch_size = 4
    cfg.train_cfg.max_iters = 12
    cfg.train_cfg.val_interval = 12
    cfg.param_scheduler[0].end = 12
    cfg.optim_wrapper.optimizer.lr = 0.02
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 6
    path = tmp_path / "shapes_test.py"
    cfg.dump(str(path))
    return path


def _scalars(work_dir: Path):
    rows = []
    for f in sorted(work_dir.glob("*/vis_data/scalars.json")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.exact
def test_runner_trains_evaluates_and_resumes_with_weights_only(students, shapes_root, tmp_path, capsys, monkeypatch):
    """Exact on any CPU: the loaded backbone tensor is a copy of the saved one, and the two evaluations of
    iter_14 (test_seg, then --eval-only) run the same operations on the same shapes."""
    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append((str(args[0]) if args else "", kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    config = _shapes_config(tmp_path, shapes_root, students["resnet18"][2])
    work = tmp_path / "work"

    code, _, err = run_tool(train_tool, [config, "--work-dir", work], capsys)
    assert code == 0, err
    rows = _scalars(work)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    val = [r for r in rows if "mIoU" in r]
    assert val and 0 <= val[-1]["mIoU"] <= 100

    # The Runner's own checkpoints hold HistoryBuffers and numpy objects; the
    # allow-list covers all of them, and without it weights_only refuses them.
    ckpt = work / "iter_12.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    assert "message_hub" in real_load(ckpt, weights_only=True)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError):
            real_load(ckpt, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)

    code, _, err = run_tool(train_tool, [config, "--work-dir", work, "--resume",
                                         "--cfg-options", "train_cfg.max_iters=14", "param_scheduler.0.end=14"], capsys)
    assert code == 0, err
    resumed = [r["iter"] for r in _scalars(work) if "loss" in r][12:]
    assert resumed == [13, 14]
    assert any(path.endswith("iter_12.pth") for path, _ in loads)

    code, out, err = run_tool(test_tool, [config, work / "iter_14.pth", "--work-dir", work,
                                          "--out", tmp_path / "metrics.json"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 100 and json.loads(out.strip().splitlines()[-1]) == metrics
    # --out inside a file (not a folder) cannot be written: one line naming it, and the metrics file unharmed.
    unwritable = tmp_path / "metrics.json" / "again.json"
    code, _, err = run_tool(test_tool, [config, work / "iter_14.pth", "--work-dir", work, "--out", unwritable], capsys)
    assert code == 2 and str(unwritable) in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    code, out, err = run_tool(train_tool, [config, "--work-dir", work, "--eval-only"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == metrics  # the latest checkpoint is iter_14

    # A trained segmentor's backbone loads back (strictly) with prefix='backbone.'.
    backbone = _pretrained("resnet18", work / "iter_14.pth", prefix="backbone.")
    backbone.init_weights()
    trained = torch.load(work / "iter_14.pth", weights_only=True)["state_dict"]
    assert torch.equal(backbone.state_dict()["body.layer4.1.conv2.weight"],
                       trained["backbone.body.layer4.1.conv2.weight"])

    assert loads and all(weights_only is not False for _, weights_only in loads)


def test_two_runs_in_one_process_within_a_second_keep_their_own_logs(students, shapes_root, tmp_path, capsys):
    """MMEngine hands a Runner named like an earlier one (config name and start second) that run's visualizer:
    the second run's scalars went into the first run's work dir. Each run is named on its own."""
    config = _shapes_config(tmp_path, shapes_root, students["resnet18"][2])
    short = ["--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=100", "param_scheduler.0.end=2",
             "default_hooks.checkpoint.interval=2", "val_cfg=None", "val_dataloader=None", "val_evaluator=None"]
    for name in ("first", "second"):
        code, _, err = run_tool(train_tool, [config, "--work-dir", tmp_path / name, *short], capsys)
        assert code == 0, err
    for name in ("first", "second"):
        iters = [r["iter"] for r in _scalars(tmp_path / name) if "loss" in r]
        assert iters == [1, 2], (name, iters)
