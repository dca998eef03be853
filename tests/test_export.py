"""Export of distilled students to timm, torchvision and ONNX, each loaded back in its own library.

The students come from real 2-step distillation runs (``distilled`` in
conftest.py). Every format is loaded with the exact line the tool prints:
here, and once more in a fresh Python process with the network cut off.
"""

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import timm
import torch
import torchvision

from distill.checkpoint import load_student
from distill.common import DISTILL_FORMAT
from retro_transfer.export import ExportError, check_outputs

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # input side of the checks and of the ONNX graph


def _run(argv):
    """``tools/export.py main(argv)`` in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("_tool_export", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _export(checkpoint, fmt, out, *extra):
    """Run the tool; the line it prints last (the one that loads the file)."""
    code, stdout, err = _run([checkpoint, "--format", fmt, out, "--image-size", SIZE, *extra])
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[-2] == "load it with:", stdout
    return lines[-1]


def _images(batch):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(scope="module")
def r18(distilled):
    return distilled("resnet18")


@pytest.fixture(scope="module")
def effb0(distilled):
    return distilled("efficientnet_b0")


@pytest.fixture(scope="module")
def exported(r18, tmp_path_factory):
    """format -> (file, printed load line) of the ResNet-18 student, each exported once (ONNX with its maps)."""
    folder = tmp_path_factory.mktemp("exported")
    files = {"timm": folder / "r18.pth", "torchvision": folder / "r18_tv.pth", "onnx": folder / "r18.onnx"}
    extra = {"onnx": ["--features"]}
    return {fmt: (path, _export(r18, fmt, path, *extra.get(fmt, []))) for fmt, path in files.items()}


# ------------------------------------------------------------------ timm


@pytest.mark.exact
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_timm_export_loads_with_no_missing_or_unexpected_key(arch, distilled, exported, tmp_path, caplog):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    checkpoint = distilled(arch)
    line = exported["timm"][1] if arch == "resnet18" else _export(checkpoint, "timm", tmp_path / "student.pth")
    assert line.startswith(f"model = timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file=")
    student, _ = load_student(checkpoint)
    scope = {"timm": timm}
    with caplog.at_level(logging.INFO, logger="timm"):
        exec(line, scope)
    assert not [r.message for r in caplog.records if "keys" in r.message], "timm reported missing or unexpected keys"
    loaded, expected = scope["model"].state_dict(), student.body.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    # A new classifier for the user's task: timm reports exactly its weights as missing, nothing else.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        exec(line.replace("num_classes=0", "num_classes=7"), scope)
    reports = [r.message for r in caplog.records if "keys" in r.message]
    classifier = scope["model"].pretrained_cfg["classifier"]
    assert len(reports) == 1 and reports[0].startswith(f"Missing keys ({classifier}.weight, {classifier}.bias) "), reports


# ------------------------------------------------------------------ torchvision


def test_torchvision_export_loads_strictly_and_computes_the_student(r18, exported):
    line = exported["torchvision"][1]
    assert "model.fc is untrained" in line
    scope = {"torch": torch, "torchvision": torchvision}
    exec(line, scope)  # load_state_dict is strict: any missing or unexpected key raises
    model = scope["model"].eval()
    model.fc = torch.nn.Identity()
    student, _ = load_student(r18)
    with torch.no_grad():
        torch.testing.assert_close(model(_images(2)), student.features(_images(2)), rtol=1e-5, atol=1e-6)


def test_torchvision_export_refuses_a_student_that_is_no_resnet(effb0, tmp_path):
    code, _, err = _run([effb0, "--format", "torchvision", tmp_path / "e.pth"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "efficientnet_b0" in err and "--format timm" in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ ONNX


def test_onnx_export_has_a_dynamic_batch_and_the_student_s_outputs(r18, exported):
    out, line = exported["onnx"]
    assert line.startswith(f"session = onnxruntime.InferenceSession({str(out.resolve())!r})")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str), "the batch axis is fixed"
    names = [o.name for o in session.get_outputs()]
    assert names == ["features", "stride4", "stride8", "stride16", "stride32"]
    student, _ = load_student(r18)
    # The maps a detector reads, from timm's own multi-scale model with the student's weights.
    pyramid = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    pyramid.load_state_dict(student.body.state_dict())
    for batch in (1, 5):
        images = _images(batch)
        outputs = session.run(names, {"images": images.numpy()})
        with torch.no_grad():
            expected = [student.features(images), *pyramid.eval()(images)]
        for name, got, want in zip(names, outputs, expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4, msg=name)
    scope = {"onnxruntime": onnxruntime, "images": _images(4).numpy()}
    exec(line, scope)
    assert scope["features"].shape == (4, 512)


def test_onnx_export_refuses_outputs_beyond_the_tolerance(r18, tmp_path):
    # float32 kernels of two libraries never agree to 1e-12 over a ResNet-18.
    code, _, err = _run([r18, "--format", "onnx", tmp_path / "r18.onnx", "--image-size", SIZE, "--tolerance", 1e-12])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "beyond the tolerance 1e-12; nothing was written" in err
    assert not list(tmp_path.iterdir())


def test_check_outputs_measures_error_relative_to_the_output_scale():
    f64 = dict(dtype=torch.float64)
    reference = {"features": torch.tensor([[2.0, -4.0]], **f64), "maps": torch.full((1, 2), 1e-6, **f64)}
    close = {"features": torch.tensor([[2.0, -4.0002]], **f64), "maps": torch.full((1, 2), 1.00001e-6, **f64)}
    errors = check_outputs(close, reference, 1e-4, "ONNX")
    assert errors["features"] == pytest.approx(0.0002 / 4, rel=1e-3) and errors["maps"] == pytest.approx(1e-5, rel=1e-2)
    with pytest.raises(ExportError, match=r"output 'maps' differs .* by 1 of its largest magnitude"):
        check_outputs({**close, "maps": torch.full((1, 2), 2e-6, **f64)}, reference, 1e-4, "ONNX")
    with pytest.raises(ExportError, match=r"shape \(1, 3\) vs \(1, 2\)"):
        check_outputs({**close, "features": torch.zeros(1, 3, **f64)}, reference, 1e-4, "ONNX")
    with pytest.raises(ExportError, match=r"output 'maps' differs .* by inf"):  # NaN after a good output
        check_outputs({**close, "maps": torch.full((1, 2), float("nan"), **f64)}, reference, 1e-4, "ONNX")


# ------------------------------------------------------------------ a clean process


CLEAN_LOAD = """
import socket, sys
def no_network(*args, **kwargs):
    raise OSError("the network was used")
socket.socket.connect = socket.create_connection = no_network
import onnxruntime, timm, torch, torchvision
timm_line, tv_line, onnx_line, reference = sys.argv[1:5]
expected = torch.load(reference, weights_only=True)
images = expected["images"].numpy()
exec(timm_line)
timm_features = model.eval()(expected["images"])
exec(tv_line)
model.fc = torch.nn.Identity()
tv_features = model.eval()(expected["images"])
exec(onnx_line)
for got in (timm_features, tv_features, torch.from_numpy(features)):
    torch.testing.assert_close(got, expected["features"], rtol=1e-4, atol=1e-5)
print("loaded all three")
"""


def test_each_format_loads_in_a_fresh_process_without_network(r18, exported, tmp_path):
    lines = [exported[fmt][1] for fmt in ("timm", "torchvision", "onnx")]
    student, _ = load_student(r18)
    images = _images(3)
    with torch.no_grad():
        torch.save({"images": images, "features": student.features(images)}, tmp_path / "reference.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, *lines, str(tmp_path / "reference.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded all three" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------ refusals


def test_checkpoints_without_a_student_are_refused_in_one_line(r18, tmp_path):
    teacher = tmp_path / "moco_v2_r18.pth.tar"
    net = torchvision.models.resnet18()
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}}, teacher)
    teacher_only = tmp_path / "teacher_only.pth"
    torch.save({"format": DISTILL_FORMAT, "model": {"teacher.backbone.conv1.weight": torch.zeros(1)}}, teacher_only)
    cases = [
        (teacher, "no student in"),
        (teacher_only, "no student in this checkpoint"),
        (tmp_path / "absent.pth", "does not exist"),
    ]
    for fmt in ("timm", "torchvision", "onnx"):
        for checkpoint, message in cases:
            code, _, err = _run([checkpoint, "--format", fmt, tmp_path / "out" / "x.pth"])
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert message in err and checkpoint.name in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    existing = tmp_path / "taken.pth"
    existing.write_text("keep me")
    for argv, message in [
        ([r18, "--format", "timm", existing], "--force"),
        ([r18, "--format", "timm", tmp_path / "x.pth", "--features"], "--features applies to --format onnx only"),
        ([r18, "--format", "timm", tmp_path / "x.safetensors"], "name it .pth"),
    ]:
        code, _, err = _run(argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert existing.read_text() == "keep me"
