"""Export a distilled student in the formats other libraries load: timm, torchvision, ONNX.

Each export is written to a temporary file beside ``out`` and loaded back in
the library that will read it before it takes ``out``'s name; a check that
fails leaves no file (and any previous ``out`` untouched):

* ``timm``: the student's state dict under timm's names, which
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), num_classes=0)``
  loads with no missing or unexpected key (checked: every tensor of the
  built model equals the student's). The file has no classifier, as the
  student has none: with ``num_classes=N`` timm adds a new one and logs that
  only its weights are missing; with timm's default 1000 classes it refuses.
* ``torchvision`` (ResNet students): a state dict that
  ``torchvision.models.resnetXX().load_state_dict(...)`` loads strictly. The
  student has no ``fc``, so the file carries torchvision's default (untrained)
  ``fc`` initialisation; the check compares torchvision's pooled features with
  the student's.
* ``onnx``: the pooled backbone features ``(N, C)`` (and with ``features``
  the stride-4..32 maps a detector or segmenter reads), batch size dynamic,
  input fixed at ``image_size``. onnxruntime runs the graph at a batch size
  other than the traced one, and every output must match PyTorch within
  ``tolerance`` times its largest magnitude.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from distill.checkpoint import load_student

from .models.students import Student
from .safe_io import write_failure

PathLike = Union[str, os.PathLike]

FORMATS = ("timm", "torchvision", "onnx")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: Largest accepted |exported - PyTorch| as a fraction of an output's largest magnitude.
DEFAULT_TOLERANCE = 1e-4
# The ONNX graph is traced at one batch size and checked at another, which
# exercises its dynamic batch axis.
TRACE_BATCH = 2
CHECK_BATCH = 3
ONNX_INPUT = "images"
ONNX_POOLED = "features"


class ExportError(Exception):
    """An export that cannot be done or did not check out; the message says why and what to do."""


@dataclass
class Exported:
    """What was written, how to load it, and what was checked."""

    path: Path
    format: str
    arch: str
    load_line: str
    checked: str
    notes: List[str] = field(default_factory=list)
    errors: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` (same suffix) that replaces ``out`` only if the block succeeds.

    A write that fails on the OS's say (a full disk, a read-only folder) is
    one ExportError; nothing partial is left and a previous ``out`` is unchanged.
    """
    tmp = out.parent / f".{out.stem}.{os.getpid()}.{secrets.token_hex(4)}{out.suffix}"
    try:
        yield tmp
        os.replace(tmp, out)
    except Exception as e:
        message = write_failure(out, e)
        if message is None:
            raise
        raise ExportError(message) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _random_images(batch: int, image_size: int) -> torch.Tensor:
    """A fixed random batch (its own generator: the caller's RNG state is left alone)."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def relative_error(exported: torch.Tensor, reference: torch.Tensor) -> float:
    """max |exported - reference| / max |reference|: a tolerance that means the same at any activation scale.

    A shape mismatch or a NaN anywhere is infinitely wrong (NaN would compare as "not above" any tolerance).
    """
    if exported.shape != reference.shape:
        return float("inf")
    scale = reference.abs().max().item()
    error = (exported.double() - reference.double()).abs().max().item() / max(scale, 1e-12)
    return error if math.isfinite(error) else float("inf")


def check_outputs(
    exported: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor], tolerance: float, what: str
) -> Dict[str, float]:
    """Per-output relative errors; an ``ExportError`` naming the worst output beyond ``tolerance``."""
    errors = {name: relative_error(exported[name], ref) for name, ref in reference.items()}
    name, worst = max(errors.items(), key=lambda item: item[1])
    if not worst <= tolerance:
        shapes = ""
        if worst == float("inf"):
            shapes = f" (shape {tuple(exported[name].shape)} vs {tuple(reference[name].shape)})"
        raise ExportError(
            f"{what} output {name!r} differs from the PyTorch student by {worst:.3g} of its largest magnitude{shapes}, "
            f"beyond the tolerance {tolerance:g}; nothing was written"
        )
    return errors


def _same_keys(model_keys, state: Dict[str, torch.Tensor], what: str) -> None:
    """The model has exactly the exported tensor names: nothing missing, nothing unexpected."""
    missing, unexpected = sorted(set(model_keys) - set(state)), sorted(set(state) - set(model_keys))
    if missing or unexpected:
        raise ExportError(
            f"{what} needs {len(missing)} tensor(s) the export lacks ({', '.join(missing[:4]) or '-'}) and "
            f"has no place for {len(unexpected)} ({', '.join(unexpected[:4]) or '-'}); nothing was written"
        )


def _same_weights(loaded: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], what: str) -> None:
    """``loaded`` (a model's state dict after loading) has exactly ``state``'s keys and values."""
    _same_keys(loaded, state, what)
    differ = [k for k, v in state.items() if not torch.equal(loaded[k].cpu(), v.cpu())]
    if differ:
        raise ExportError(
            f"{what} did not load {len(differ)} tensor(s) as written (e.g. {differ[0]}); nothing was written"
        )


# --------------------------------------------------------------------------- timm


def export_timm(student: Student, out: Path) -> Exported:
    """The student as a timm state dict that ``timm.create_model(..., pretrained_cfg_overlay=dict(file=out))`` loads."""
    import timm

    state = {k: v.detach().clone() for k, v in student.body.state_dict().items()}
    with staged(out) as tmp:
        torch.save(state, tmp)
        try:  # exactly what the printed line does, on the staged file
            overlay = dict(file=str(tmp))
            model = timm.create_model(student.arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
        except RuntimeError as e:
            raise ExportError(f"timm cannot load the exported {student.arch}: {str(e).strip().splitlines()[0]}") from e
        _same_weights(model.state_dict(), state, f"timm.create_model({student.arch!r}, ...)")
        classifier = model.pretrained_cfg.get("classifier", "classifier")
    line = (f"model = timm.create_model({student.arch!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out.resolve())!r}), num_classes=0)")
    notes = [f"num_classes=0 gives pooled features; num_classes=N adds a new, untrained {classifier} "
             f"(timm then logs {classifier}.weight/{classifier}.bias as missing, as expected)"]
    checked = f"timm.create_model loads all {len(state)} tensors with no missing or unexpected key"
    return Exported(out, "timm", student.arch, line, checked, notes)


# --------------------------------------------------------------------------- torchvision


def export_torchvision(student: Student, out: Path, image_size: int, tolerance: float) -> Exported:
    """A ResNet student as a state dict that ``torchvision.models.resnetXX()`` loads strictly."""
    import torchvision

    arch = student.arch
    if arch not in TORCHVISION_RESNETS:
        raise ExportError(
            f"--format torchvision is for ResNet students ({', '.join(TORCHVISION_RESNETS)}), and this one is a "
            f"timm {arch}; use --format timm (or onnx)"
        )
    builder = getattr(torchvision.models, arch)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same untrained fc in every export of this arch
        fresh = builder()
    state = {k: v.detach().clone() for k, v in student.body.state_dict().items()}
    state.update({"fc.weight": fresh.fc.weight.detach().clone(), "fc.bias": fresh.fc.bias.detach().clone()})
    _same_keys(fresh.state_dict(), state, f"torchvision.models.{arch}()")
    images = _random_images(CHECK_BATCH, image_size)
    with staged(out) as tmp:
        torch.save(state, tmp)
        model = builder()
        model.load_state_dict(torch.load(tmp, map_location="cpu", weights_only=True))  # strict, as the line says
        model.fc = nn.Identity()
        with torch.no_grad():
            errors = check_outputs({ONNX_POOLED: model.eval()(images)}, {ONNX_POOLED: student.features(images)},
                                   tolerance, f"torchvision {arch}")
    line = (f"model = torchvision.models.{arch}(); model.load_state_dict(torch.load({str(out.resolve())!r}, "
            f"weights_only=True))  # model.fc is untrained: replace it for your task")
    checked = (f"torchvision.models.{arch}() loads it strictly and its pooled features match the student's "
               f"(relative error {errors[ONNX_POOLED]:.1e}, tolerance {tolerance:g})")
    notes = ["the student has no classifier: fc holds torchvision's default initialisation (seed 0), not trained"]
    return Exported(out, "torchvision", arch, line, checked, notes, errors)


# --------------------------------------------------------------------------- ONNX


class OnnxGraph(nn.Module):
    """Images -> pooled student features, and optionally the feature maps of the given timm levels."""

    def __init__(self, student: Student, levels: Sequence[int] = ()) -> None:
        super().__init__()
        self.student = student
        self.levels = list(levels)

    def forward(self, images: torch.Tensor):
        if not self.levels:
            return self.student.features(images)
        # One pass for both: the last map comes back with the stage maps.
        final, maps = self.student.body.forward_intermediates(images, indices=self.levels)
        pooled = self.student.body.forward_head(final, pre_logits=True).mean(dim=(2, 3))
        return (pooled, *maps)


def feature_levels(student: Student) -> Tuple[List[int], List[str]]:
    """timm feature levels at stride 4..32 (what detection and segmentation heads read) and their output names."""
    info = student.body.feature_info
    levels = [i for i, level in enumerate(info) if level["reduction"] >= 4]
    return levels, [f"stride{info[i]['reduction']}" for i in levels]


def _onnx_graph(student: Student, features: bool, image_size: int, tolerance: float) -> Tuple[OnnxGraph, List[str]]:
    """The module to export; with maps, first checked to pool exactly what the student pools."""
    if not features:
        return OnnxGraph(student).eval(), [ONNX_POOLED]
    if not hasattr(student.body, "forward_intermediates"):
        raise ExportError(
            f"timm's {student.arch} has no forward_intermediates, so its feature maps cannot be exported; "
            "export without --features"
        )
    levels, names = feature_levels(student)
    graph = OnnxGraph(student, levels).eval()
    images = _random_images(CHECK_BATCH, image_size)
    with torch.no_grad():
        check_outputs({ONNX_POOLED: graph(images)[0]}, {ONNX_POOLED: student.features(images)}, tolerance,
                      f"the multi-scale graph of {student.arch}")
    return graph, [ONNX_POOLED, *names]


def _to_onnx(graph: OnnxGraph, names: List[str], image_size: int, metadata: Dict[str, str]):
    """Export with a dynamic batch axis; the ONNX ModelProto, weights inside (students are far below 2 GB)."""
    import onnx

    example = _random_images(TRACE_BATCH, image_size)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            program = torch.onnx.export(
                graph, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=names,
                dynamic_shapes={ONNX_INPUT: {0: torch.export.Dim("batch")}}, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean "this model does not export"
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed for {metadata['arch']}: {detail}") from e
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto


def _run_onnx(model_bytes: bytes, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {ONNX_INPUT: images.numpy()})
    return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def export_onnx(
    student: Student, out: Path, features: bool, image_size: int, tolerance: float, source: str
) -> Exported:
    """The student's pooled features (and maps) as ONNX, checked with onnxruntime against PyTorch."""
    graph, names = _onnx_graph(student, features, image_size, tolerance)
    metadata = {
        "arch": student.arch,
        "source": source,
        "input": f"{ONNX_INPUT}: float32 (N, 3, {image_size}, {image_size}) RGB, ImageNet mean/std normalised",
        "outputs": ", ".join(names),
    }
    proto = _to_onnx(graph, names, image_size, metadata)
    model_bytes = proto.SerializeToString()
    images = _random_images(CHECK_BATCH, image_size)
    with torch.no_grad():
        reference = graph(images)
    reference = dict(zip(names, reference if isinstance(reference, tuple) else (reference,)))
    try:
        exported = _run_onnx(model_bytes, images)
    except Exception as e:  # onnxruntime's own error types (Fail, InvalidArgument, ...)
        raise ExportError(f"onnxruntime cannot run the exported {student.arch} graph at batch {CHECK_BATCH}: "
                          f"{str(e).strip().splitlines()[0][:300]}") from e
    errors = check_outputs(exported, reference, tolerance, "ONNX")
    with staged(out) as tmp:
        tmp.write_bytes(model_bytes)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    line = (f"session = onnxruntime.InferenceSession({str(out.resolve())!r}); "
            f"features = session.run([{ONNX_POOLED!r}], {{{ONNX_INPUT!r}: images}})[0]"
            f"  # images: float32 (N, 3, {image_size}, {image_size}), ImageNet-normalised RGB")
    worst = max(errors.values())
    checked = (f"onnxruntime at batch {CHECK_BATCH} (traced at {TRACE_BATCH}) matches PyTorch on every output "
               f"(worst relative error {worst:.1e}, tolerance {tolerance:g})")
    notes = [f"opset {opset}; input {ONNX_INPUT!r} (batch dynamic, {image_size} px fixed); outputs "
             + ", ".join(f"{n!r} (N, {', '.join(str(d) for d in reference[n].shape[1:])})" for n in names)]
    return Exported(out, "onnx", student.arch, line, checked, notes, errors)


# --------------------------------------------------------------------------- entry point


def export_student(
    checkpoint: PathLike,
    out: PathLike,
    fmt: str,
    features: bool = False,
    image_size: int = 224,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Tuple[Exported, dict]:
    """Export the student of a distillation checkpoint as ``fmt``; the result and the checkpoint's info.

    Raises ``CheckpointError`` for a file with no student and ``ExportError``
    when the format does not fit the student or the written file does not
    load back as promised.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if features and fmt != "onnx":
        raise ExportError("feature maps are exported to ONNX only; drop --features or use --format onnx")
    if image_size < 8:
        raise ExportError(f"the image size must be at least 8 pixels, got {image_size}")
    if not tolerance > 0:
        raise ExportError(f"the tolerance must be positive, got {tolerance}")
    out = Path(out)
    if fmt != "onnx" and out.suffix == ".safetensors":
        raise ExportError(f"{out}: the {fmt} export is a PyTorch state dict (torch.save), not safetensors; "
                          "name it .pth")
    student, info = load_student(checkpoint)
    if fmt == "timm":
        return export_timm(student, out), info
    if fmt == "torchvision":
        return export_torchvision(student, out, image_size, tolerance), info
    return export_onnx(student, out, features, image_size, tolerance, str(checkpoint)), info
