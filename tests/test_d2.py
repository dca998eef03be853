"""Detectron2 transfer: converter, timm backbones, configs and train_net on shapes-VOC (CPU, small)."""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone.resnet import build_resnet_backbone  # noqa: E402

from distill.common import DISTILL_FORMAT  # noqa: E402
from retro_transfer.d2 import (  # noqa: E402
    ConfigError,
    IncompatibleWeightsError,
    RetroCheckpointer,
    TimmBackbone,
    add_retro_config,
    check_config,
    feature_levels,
)
from retro_transfer.d2.train import RetroTrainer  # noqa: E402
from retro_transfer.models.students import Student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
STUDENTS = {"effb0": "efficientnet_b0", "mbv3": "mobilenetv3_large_100", "r18": "resnet18", "r34": "resnet34"}
LEVELS = ["res2", "res3", "res4", "res5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain little from threads, and on a shared 2-core machine two
    busy-waiting OpenMP threads per process made training 7x slower (38 s vs 5.7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convert_tool():
    return load_tool("convert_to_d2")


@pytest.fixture(scope="module")
def train_tool():
    return load_tool("train_net")


def randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine weights, so a conversion that loses them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def distill_checkpoint(student: Student) -> dict:
    """What tools/distill.py writes: student, EMA, adapter, heads, teacher and queue, plus optimizer state."""
    body = student.body.state_dict()
    model = {f"student.body.{k}": v for k, v in body.items()}
    model.update({f"student_ema.body.{k}": v.clone() for k, v in body.items()})
    model.update({"adapter.0.weight": torch.randn(8, 4, 1, 1), "adapter.1.running_mean": torch.zeros(8)})
    model.update({"head.0.weight": torch.randn(8, 8), "head_ema.0.weight": torch.randn(8, 8)})
    model.update({"teacher.backbone.conv1.weight": torch.randn(4, 3, 7, 7), "teacher.head.0.weight": torch.randn(8, 4)})
    model.update({"queue.embeddings": torch.randn(16, 8), "queue.ptr": torch.zeros(1, dtype=torch.long)})
    return {
        "format": DISTILL_FORMAT,
        "method": "retro",
        "student_arch": student.arch,
        "teacher_arch": "resnet50",
        "config": {"adapter": {"kind": "auto"}},
        "step": 10,
        "model": model,
        "optimizer": {"state": {}, "param_groups": []},
    }


@pytest.fixture(scope="module")
def students():
    torch.manual_seed(0)
    return {short: randomise_norms(Student(arch), seed=i) for i, (short, arch) in enumerate(STUDENTS.items())}


@pytest.fixture(scope="module")
def student_files(students, tmp_path_factory):
    folder = tmp_path_factory.mktemp("students")
    paths = {}
    for short, student in students.items():
        paths[short] = folder / f"{short}.pth"
        torch.save(distill_checkpoint(student), paths[short])
    return paths


@pytest.fixture(scope="module")
def converted(student_files, convert_tool, tmp_path_factory):
    """Each student converted once by the tool, with the report it printed."""
    folder = tmp_path_factory.mktemp("d2")
    out = {}
    for short, path in student_files.items():
        pkl = folder / f"{short}_d2.pkl"
        assert convert_tool.main([str(path), str(pkl)]) == 0
        out[short] = pkl
    return out


def config(name: str, *overrides) -> "CfgNode":  # noqa: F821
    cfg = get_cfg()
    add_retro_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *overrides])
    return cfg


def load_into(model: nn.Module, path: Path):
    """Load with Detectron2's own checkpointer and return what it could not match."""
    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(str(path)))


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("short", list(STUDENTS))
def test_converted_student_loads_exactly_and_gives_the_students_features(short, students, converted):
    with open(converted[short], "rb") as f:
        raw = pickle.load(f)
    assert raw["matching_heuristics"] is False
    assert raw["retro_transfer"]["arch"] == STUDENTS[short]
    assert all(k.startswith("backbone.bottom_up.body.") for k in raw["model"])

    model = build_model(config(f"shapes_frcnn_{short}.yaml")).eval()
    incompatible = load_into(model, converted[short])
    assert [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")] == []
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []

    student = students[short]
    levels = feature_levels(student.arch)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        indices = [levels[f].index for f in LEVELS]
        theirs = student.body.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert list(ours) == LEVELS
    for name, expected in zip(LEVELS, theirs):
        assert ours[name].shape == expected.shape
        assert (ours[name] - expected).abs().max().item() < 1e-4, name
    shapes = model.backbone.bottom_up.output_shape()
    assert [shapes[f].stride for f in LEVELS] == [4, 8, 16, 32]
    assert [shapes[f].channels for f in LEVELS] == [levels[f].channels for f in LEVELS]


def test_report_lists_converted_and_dropped_groups(student_files, convert_tool, tmp_path, capsys):
    assert convert_tool.main([str(student_files["effb0"]), str(tmp_path / "s.pkl")]) == 0
    out = capsys.readouterr().out
    assert "converted 352 tensors" in out and "backbone.bottom_up.body.blocks" in out
    for group in ("adapter", "student_ema", "head", "head_ema", "teacher", "queue", "conv_head"):
        assert group in out, group
    assert "build_timm_fpn_backbone" in out and "efficientnet_b0" in out


def resnet50_moco_checkpoint(path: Path) -> torchvision.models.ResNet:
    torch.manual_seed(0)
    net = randomise_norms(torchvision.models.resnet50(weights=None), seed=7)
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    state.update({f"module.encoder_k.{k}": v for k, v in backbone.items()})
    for enc in ("encoder_q", "encoder_k"):
        state.update({f"module.{enc}.fc.0.weight": torch.randn(16, 2048), f"module.{enc}.fc.0.bias": torch.zeros(16)})
        state.update({f"module.{enc}.fc.2.weight": torch.randn(8, 16), f"module.{enc}.fc.2.bias": torch.zeros(8)})
    state.update({"module.queue": torch.randn(8, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, path)
    return net


def test_moco_v2_resnet50_converts_to_detectron2_resnet_for_c4_and_fpn(convert_tool, tmp_path, capsys):
    net = resnet50_moco_checkpoint(tmp_path / "moco.pth.tar")
    pkl = tmp_path / "moco_d2.pkl"
    assert convert_tool.main([str(tmp_path / "moco.pth.tar"), str(pkl)]) == 0
    out = capsys.readouterr().out
    assert "moco_v2 teacher" in out and "encoder_k" in out and "projection head" in out
    with open(pkl, "rb") as f:
        raw = pickle.load(f)
    assert raw["matching_heuristics"] is True
    assert "stem.conv1.norm.running_var" in raw["model"] and "res5.2.conv3.norm.weight" in raw["model"]

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        expected = {"res2": net.layer1(stem)}
        expected["res3"] = net.layer2(expected["res2"])
        expected["res4"] = net.layer3(expected["res3"])
        expected["res5"] = net.layer4(expected["res4"])

    c4 = build_model(config("voc_frcnn_r50_c4.yaml")).eval()
    incompatible = load_into(c4, pkl)
    backbone_missing = [k for k in incompatible.missing_keys if k.startswith("backbone.") or ".res5.2." in k]
    assert backbone_missing == [] and incompatible.unexpected_keys == []
    with torch.no_grad():
        res4 = c4.backbone(x)["res4"]
        res5 = c4.roi_heads.res5[:3](res4)  # the three Bottleneck blocks; [3] is the new norm
    assert (res4 - expected["res4"]).abs().max() < 1e-4
    assert (res5 - expected["res5"]).abs().max() < 1e-4

    fpn = build_model(config("voc_frcnn_r50_fpn.yaml")).eval()
    incompatible = load_into(fpn, pkl)
    assert [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")] == []
    with torch.no_grad():
        ours = fpn.backbone.bottom_up(x)
    for name in LEVELS:
        assert (ours[name] - expected[name]).abs().max() < 1e-4, name


# --------------------------------------------------------------------------- backbone options


def test_norm_choices_keep_the_function_and_gn_builds(students):
    state = students["mbv3"].body.state_dict()
    backbone_state = {k: v for k, v in state.items() if not k.startswith("conv_head.")}
    x = torch.randn(1, 3, 64, 64)
    outputs = {}
    for norm in ("BN", "SyncBN", "FrozenBN"):
        backbone = TimmBackbone("mobilenetv3_large_100", LEVELS, norm=norm)
        backbone.body.load_state_dict(backbone_state)
        with torch.no_grad():
            outputs[norm] = backbone.eval()(x)
    for norm in ("SyncBN", "FrozenBN"):
        for f in LEVELS:
            # FrozenBN folds the statistics into one scale and shift: same function, other rounding.
            torch.testing.assert_close(outputs[norm][f], outputs["BN"][f], rtol=1e-4, atol=1e-4)
    gn = TimmBackbone("mobilenetv3_large_100", LEVELS, norm="GN")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert gn(x)["res5"].shape[1] == 960


@pytest.mark.exact
def test_a_seeded_backbone_is_the_same_whether_or_not_it_is_the_first_in_the_process():
    """The first TimmBackbone of an architecture probes timm for its feature levels (then cached); that probe
    must not draw from the random state the real weights are drawn from, or a seeded run's initial weights
    would depend on what the process built before (the pipeline's first Detectron2 stage differed from its
    command). Same operations on the same shapes in one process: equal bit for bit."""
    feature_levels.cache_clear()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        weights.append(TimmBackbone("resnet18", LEVELS, norm="BN").body.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    "arch, frozen, trainable",
    [
        ("resnet18", ("conv1.", "bn1.", "layer1."), "layer2."),
        ("efficientnet_b0", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1."), "blocks.2."),
    ],
)
def test_freeze_at_2_freezes_stem_and_stride_4_stage(arch, frozen, trainable):
    backbone = TimmBackbone(arch, LEVELS, norm="BN", freeze_at=2)
    params = dict(backbone.body.named_parameters())
    assert all(not p.requires_grad for k, p in params.items() if k.startswith(frozen))
    assert all(p.requires_grad for k, p in params.items() if k.startswith(trainable))
    assert not any(k.startswith(frozen) for k, p in params.items() if p.requires_grad)
    frozen_bn = [n for n, m in backbone.body.named_modules() if type(m).__name__.startswith("FrozenBatchNorm")]
    assert frozen_bn and all(n.startswith(frozen) for n in (f"{n}." for n in frozen_bn))


def small_resnet(depth: int) -> list:
    return ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


def test_c4_is_refused_for_small_resnets_and_timm_students():
    with pytest.raises(ConfigError, match=r"ResNet-18 with C4.*Bottleneck.*dropped.*FPN"):
        check_config(config("voc_frcnn_r50_c4.yaml", *small_resnet(18)))
    with pytest.raises(ConfigError, match="res5 from ResNet Bottleneck"):
        check_config(config("voc_frcnn_effb0.yaml", "MODEL.ROI_HEADS.NAME", "Res5ROIHeads"))
    check_config(config("voc_frcnn_r50_c4.yaml"))
    check_config(config("voc_frcnn_r18.yaml"))
    # Building the model directly (without train_net) is refused too, by MoCo's C4 head.
    with pytest.raises(ConfigError, match="ResNet-34 with C4"):
        build_model(config("voc_frcnn_r50_c4.yaml", *small_resnet(34)))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("short", list(STUDENTS))
def test_a_few_iterations_on_shapes_voc(short, converted, train_tool, shapes_root, tmp_path, capsys):
    args = train_tool.build_parser().parse_args(
        ["--config-file", str(CONFIGS / f"shapes_frcnn_{short}.yaml"), "MODEL.WEIGHTS", str(converted[short]),
         "DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(tmp_path), "SEED", "0",
         "SOLVER.MAX_ITER", "8", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.02", "SOLVER.WARMUP_ITERS", "0",
         "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0"]
    )  # fmt: skip
    trainer = RetroTrainer(train_tool.setup(args))  # the trainer tools/train_net.py runs
    assert isinstance(trainer.checkpointer, RetroCheckpointer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    results = trainer._last_eval_results["bbox"]
    assert set(results) == {"AP", "AP50", "AP75"} and all(v == v for v in results.values())
    assert "AP,AP50,AP75" in capsys.readouterr().out + (tmp_path / "log.txt").read_text()


def test_command_line_train_then_eval_only(converted, train_tool, shapes_root, tmp_path):
    small = ["DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2",
             "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
             "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    config_file = ["--config-file", str(CONFIGS / "shapes_frcnn_r18.yaml")]
    run = subprocess.run(
        [sys.executable, "tools/train_net.py", *config_file, "MODEL.WEIGHTS", str(converted["r18"]), *small],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in run.stdout + run.stderr
    final = tmp_path / "model_final.pth"
    assert final.is_file()
    args = train_tool.build_parser().parse_args([*config_file, "--eval-only", "MODEL.WEIGHTS", str(final), *small])
    results = train_tool.main(args)
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}


# --------------------------------------------------------------------------- errors


def test_existing_output_needs_force(student_files, convert_tool, tmp_path, capsys):
    out = tmp_path / "s.pkl"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        convert_tool.main([str(student_files["mbv3"]), str(out)])
    assert exit_info.value.code == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert convert_tool.main([str(student_files["mbv3"]), str(out), "--force"]) == 0
    assert out.read_bytes() != b"keep me"


def test_checkpoint_without_student_is_refused(convert_tool, tmp_path, capsys):
    path = tmp_path / "teacher_only.pth"
    torch.save({"format": DISTILL_FORMAT, "model": {"teacher.backbone.conv1.weight": torch.randn(4, 3, 7, 7)}}, path)
    with pytest.raises(SystemExit) as exit_info:
        convert_tool.main([str(path), str(tmp_path / "out.pkl")])
    assert exit_info.value.code == 2
    assert "no student" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()


def test_architecture_mismatch_at_conversion_is_refused(student_files, students, convert_tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_tool.main([str(student_files["effb0"]), str(tmp_path / "a.pkl"), "--arch", "mobilenetv3_large_100"])
    assert "efficientnet_b0" in capsys.readouterr().err
    # A plain timm state dict: only the tensors can tell, and they do.
    plain = tmp_path / "effb0_timm.pth"
    torch.save(students["effb0"].body.state_dict(), plain)
    with pytest.raises(SystemExit) as exit_info:
        convert_tool.main([str(plain), str(tmp_path / "b.pkl"), "--arch", "mobilenetv3_large_100"])
    assert exit_info.value.code == 2
    assert "blocks." in capsys.readouterr().err
    assert not (tmp_path / "b.pkl").exists()


def test_a_tensor_that_would_be_dropped_fails_the_conversion(convert_tool, tmp_path, capsys):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.attn.weight"] = torch.zeros(3)  # not part of any ResNet
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert_tool.main([str(tmp_path / "r18.pth"), str(tmp_path / "r18.pkl"), "--target", "resnet"])
    assert exit_info.value.code == 2
    assert "layer2.0.attn.weight" in capsys.readouterr().err
    assert not (tmp_path / "r18.pkl").exists()


def test_file_for_another_architecture_is_refused_on_load(converted, train_tool, shapes_root, tmp_path, capsys):
    args = train_tool.build_parser().parse_args(
        ["--config-file", str(CONFIGS / "shapes_frcnn_mbv3.yaml"), "MODEL.WEIGHTS", str(converted["effb0"]),
         "DATASETS.SHAPES_ROOT", str(shapes_root), "OUTPUT_DIR", str(tmp_path), "DATALOADER.NUM_WORKERS", "0"]
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        train_tool.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "efficientnet_b0" in err and "MODEL.TIMM.ARCH mobilenetv3_large_100" in err


class _Wrapper(nn.Module):
    """Just a ``backbone`` attribute: enough for the checks, without building a detector."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_resnet_depth_and_group_norm_mismatches_are_refused(converted):
    cfg = config("voc_frcnn_r50_fpn.yaml", *small_resnet(34))
    r34 = _Wrapper(build_resnet_backbone(cfg, ShapeSpec(channels=3)))
    meta = {"arch": "resnet18", "target": "resnet"}
    with pytest.raises(IncompatibleWeightsError, match=r"resnet18.*model's ResNet is resnet34"):
        RetroCheckpointer(r34)._load_model({"model": {}, "retro_transfer": meta})
    with pytest.raises(IncompatibleWeightsError, match="converted for MODEL.BACKBONE.NAME build_timm_fpn_backbone"):
        RetroCheckpointer(r34)._load_model({"model": {}, "retro_transfer": {"arch": "resnet18", "target": "timm"}})
    gn = _Wrapper(TimmBackbone("efficientnet_b0", LEVELS, norm="GN"))
    with open(converted["effb0"], "rb") as f:
        ckpt = pickle.load(f)
    with pytest.raises(IncompatibleWeightsError, match="GroupNorm cannot use"):
        RetroCheckpointer(gn)._load_model(ckpt)


def test_missing_data_sets_are_named(train_tool, tmp_path, capsys):
    args = train_tool.build_parser().parse_args(
        ["--config-file", str(CONFIGS / "shapes_frcnn_r18.yaml"), "DATASETS.SHAPES_ROOT", str(tmp_path / "nowhere")]
    )
    with pytest.raises(SystemExit):
        train_tool.setup(args)
    assert "make_shapes.py" in capsys.readouterr().err
    args = train_tool.build_parser().parse_args(["--config-file", str(CONFIGS / "voc_frcnn_r18.yaml")])
    with pytest.raises(SystemExit):
        train_tool.setup(args)
    assert "DETECTRON2_DATASETS" in capsys.readouterr().err
