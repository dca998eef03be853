"""Checkpoint reading, writing and layout detection, on files built here with random tensors.

Random values (not zeros) make the equality checks meaningful: a loader that
took encoder_k instead of encoder_q, or left a fresh initialisation in place,
fails them.
"""

import os
import pickle

import pytest
import torch
import torchvision

from retro_transfer.checkpoints import (
    DISTILL_FORMAT,
    CheckpointError,
    extract_student_state,
    infer_resnet_arch,
    load_encoder,
    load_teacher,
    safe_load,
    save_atomic,
)
from retro_transfer.models import Student, Teacher, build_adapter

CLASSIFIER = "fc (classifier, not a projection head)"


def torchvision_state(arch: str, seed: int = 0) -> dict:
    """A torchvision ResNet state dict (classifier included) with random values, shapes read on the meta device."""
    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(weights=None)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in net.state_dict().items():
        if key.endswith("running_var"):  # a variance: negative values would turn features into NaN
            state[key] = torch.rand(meta.shape, generator=gen) + 0.5
        elif meta.dtype.is_floating_point:
            state[key] = torch.randn(meta.shape, generator=gen)
        else:  # num_batches_tracked
            state[key] = torch.tensor(1000, dtype=meta.dtype)
    return state


def moco_head(width: int, hidden: int, dim: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(hidden, width, generator=gen),
        "0.bias": torch.randn(hidden, generator=gen),
        "2.weight": torch.randn(dim, hidden, generator=gen),
        "2.bias": torch.randn(dim, generator=gen),
    }


def stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """Same shape, other values, next to no bytes on disk: for groups the loaders must ignore."""
    return torch.full((), -1.0).to(tensor.dtype).expand(tensor.shape)


def moco_checkpoint(backbone: dict, head: dict, wrapper: str = "module.", arch: str = "resnet50") -> dict:
    """The layout of the official moco_v2_800ep_pretrain.pth.tar (METHOD.md, "The teacher")."""
    query = {f"encoder_q.{k}": v for k, v in backbone.items() if not k.startswith("fc.")}
    query.update({f"encoder_q.fc.{k}": v for k, v in head.items()})
    state = {wrapper + k: v for k, v in query.items()}
    state.update({wrapper + "encoder_k." + k[len("encoder_q.") :]: stand_in(v) for k, v in query.items()})
    state[wrapper + "queue"] = torch.randn(128, 1024)
    state[wrapper + "queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": list(range(4))}]}
    return {"epoch": 800, "arch": arch, "state_dict": state, "optimizer": optimizer}


def saved(obj, path):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def r50():
    state = torchvision_state("resnet50")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, moco_head(2048, 2048, 128)


@pytest.fixture(scope="module")
def r18():
    return torchvision_state("resnet18", seed=2)


@pytest.fixture(scope="module")
def r18_path(r18, tmp_path_factory):
    """The ResNet-18 state dict on disk, written once: tests only read it."""
    return saved(r18, tmp_path_factory.mktemp("torchvision") / "resnet18.pth")


@pytest.fixture()
def r18_moco(r18):
    """A MoCo v2 ResNet-18 with an unusual head (256 hidden, 64 out) so its widths must come from the file."""
    backbone = {k: v for k, v in r18.items() if not k.startswith("fc.")}
    return moco_checkpoint(backbone, moco_head(512, 256, 64), arch="resnet18")


# --------------------------------------------------------------------------- teachers


@pytest.mark.exact
@pytest.mark.parametrize("wrapper", ["module.", ""], ids=["ddp", "single-gpu"])
def test_official_moco_v2_layout_loads_bit_exactly(r50, tmp_path, wrapper):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    backbone, head = r50
    path = saved(moco_checkpoint(backbone, head, wrapper), tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    teacher, report = load_teacher(path, require_head=True)

    assert (report.format, report.arch, report.has_head) == ("moco_v2", "resnet50", True)
    n_query = len(backbone) + len(head)
    assert report.ignored == {"encoder_k": n_query, "queue": 1, "queue_ptr": 1}
    assert report.loaded == n_query and report.missing == [] and report.unexpected == []
    assert "encoder_k" in report.summary() and "queue" in report.summary()
    for key, value in head.items():
        assert torch.equal(teacher.head.state_dict()[key], value), key
    loaded = teacher.backbone.state_dict()
    for key, value in backbone.items():
        assert torch.equal(loaded[key], value), key
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_head_widths_come_from_the_file(r18_moco, tmp_path):
    teacher, report = load_teacher(saved(r18_moco, tmp_path / "r18.pth"))
    assert report.arch == "resnet18"
    assert (teacher.head.in_dim, teacher.head.hidden_dim, teacher.head.out_dim) == (512, 256, 64)
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.exact
def test_torchvision_classifier_loads_without_head(r18, r18_path):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    teacher, report = load_teacher(r18_path)
    assert (report.format, report.arch, report.has_head) == ("torchvision", "resnet18", False)
    assert teacher.head is None
    assert report.ignored == {CLASSIFIER: 2}
    assert torch.equal(teacher.backbone.conv1.weight, r18["conv1.weight"])
    with pytest.raises(CheckpointError, match="projection head") as err:
        load_teacher(r18_path, require_head=True)
    assert "supervised torchvision classifier" in str(err.value)


def test_weights_older_than_num_batches_tracked_load(r18, tmp_path):
    """torchvision's first model-zoo ResNets predate BatchNorm's num_batches_tracked buffer."""
    old = {k: v for k, v in r18.items() if not k.endswith("num_batches_tracked")}
    _, report = load_teacher(saved(old, tmp_path / "resnet18-5c106cde.pth"))
    assert report.loaded == len(old) - 2 and report.missing == []


def test_torchvision_state_under_state_dict_with_module_prefix(r18, tmp_path):
    supervised = {"arch": "resnet18", "epoch": 90, "state_dict": {"module." + k: v for k, v in r18.items()}}
    _, report = load_teacher(saved(supervised, tmp_path / "sup.pth.tar"))
    assert (report.format, report.arch, report.ignored) == ("torchvision", "resnet18", {CLASSIFIER: 2})


@pytest.mark.exact
def test_teacher_from_a_distillation_checkpoint(r18, tmp_path):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    teacher = Teacher("resnet18", head_hidden=512, dim=128)
    model = {"teacher." + k: v for k, v in teacher.state_dict().items()}
    model.update({"student.body.conv1.weight": torch.randn(4, 3, 3, 3), "queue.queue": torch.randn(128, 16)})
    path = saved({"format": DISTILL_FORMAT, "model": model}, tmp_path / "distill.pth")
    loaded, report = load_teacher(path, require_head=True)
    assert (report.format, report.arch, report.has_head) == ("retro_transfer_teacher", "resnet18", True)
    assert report.ignored == {"student": 1, "queue": 1}
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "key", ["module.encoder_q.layer2.1.bn2.running_var", "module.encoder_q.fc.2.bias"], ids=["backbone", "head"]
)
def test_missing_key_is_named(r18_moco, tmp_path, key):
    del r18_moco["state_dict"][key]
    with pytest.raises(CheckpointError, match="lacks 1 weight") as err:
        load_teacher(saved(r18_moco, tmp_path / "ckpt.pth"))
    assert key in str(err.value)


def test_unexpected_key_is_reported_by_name(r18_moco, tmp_path):
    extra = "module.encoder_q.extra_norm.weight"
    r18_moco["state_dict"][extra] = torch.ones(3)
    _, report = load_teacher(saved(r18_moco, tmp_path / "ckpt.pth"))
    assert report.unexpected == [extra]
    assert extra in report.summary()


def test_shape_mismatch_names_key_and_both_shapes(r18_moco, tmp_path):
    r18_moco["state_dict"]["module.encoder_q.fc.0.weight"] = torch.randn(256, 500)
    with pytest.raises(CheckpointError, match=r"module\.encoder_q\.fc\.0\.weight: file \(256, 500\) vs model \(256, 512\)"):
        load_teacher(saved(r18_moco, tmp_path / "ckpt.pth"))


def test_arch_mismatch_is_an_error(r18_path):
    with pytest.raises(CheckpointError, match="holds a resnet18 but the config asks for resnet50"):
        load_teacher(r18_path, arch="resnet50")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_arch_is_inferred_from_torchvision_layouts(arch):
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert infer_resnet_arch(state) == arch
    assert infer_resnet_arch({"module.encoder_q." + k: v for k, v in state.items()}, "module.encoder_q.") == arch


def test_unknown_layout_lists_keys_and_accepted_layouts(tmp_path):
    path = saved({"state_dict": {"encoder.blocks.0.weight": torch.ones(1)}}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="accepted layouts") as err:
        load_teacher(path)
    assert "encoder.blocks.0.weight" in str(err.value)


# --------------------------------------------------------------------------- safe reading


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        safe_load(tmp_path / "nope.pth")


def test_truncated_file(r18_path, tmp_path):
    data = r18_path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or not a PyTorch checkpoint"):
        safe_load(cut)


class _RunsCode:
    """What a hostile checkpoint holds: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_in_a_pickle_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"x": _RunsCode(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="weights-only loading refuses") as err:
        safe_load(path)
    assert "NOT executed" in str(err.value)
    assert not marker.exists()


def test_a_bare_tensor_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        safe_load(saved(torch.ones(3), tmp_path / "t.pth"))


# --------------------------------------------------------------------------- atomic writing


@pytest.mark.parametrize("failure, raised", [(RuntimeError, RuntimeError), (OSError, CheckpointError)])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, failure, raised):
    path = tmp_path / "last.pth"
    save_atomic({"step": 1, "w": torch.arange(4)}, path)
    assert safe_load(path)["step"] == 1

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise failure("disk went away")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", dies_halfway)
        with pytest.raises(raised):
            save_atomic({"step": 2}, path)
    assert safe_load(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    save_atomic({"step": 2}, path)
    assert safe_load(path)["step"] == 2 and sorted(os.listdir(tmp_path)) == ["last.pth"]


# --------------------------------------------------------------------------- trained students


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return Student("resnet18").eval()


@pytest.fixture(scope="module")
def adapter(student):
    torch.manual_seed(1)
    return build_adapter("resnet18", student.out_channels, 2048).eval()


def distill_checkpoint(student, method, extra_groups):
    """What the distillation engine writes: the student, its EMA, the method's parts, teacher and queue."""
    model = {"student." + k: v for k, v in student.state_dict().items()}
    model.update({"student_ema." + k: stand_in(v) for k, v in student.state_dict().items()})
    for group, module in extra_groups.items():
        model.update({f"{group}.{k}": v for k, v in module.state_dict().items()})
    model.update({f"teacher.backbone.{k}": stand_in(v) for k, v in Teacher("resnet18", with_head=False).state_dict().items()})
    model.update({"queue.queue": torch.randn(128, 64), "queue.ptr": torch.zeros(1, dtype=torch.long)})
    return {
        "format": DISTILL_FORMAT,
        "method": method,
        "student_arch": "resnet18",
        "teacher_arch": "resnet50",
        "config": {"adapter": {"kind": "auto"}},
        "epoch": 3,
        "model": model,
    }


@pytest.fixture(scope="module")
def retro_ckpt(student, adapter):
    return distill_checkpoint(student, "retro", {"adapter": adapter})


@pytest.fixture(scope="module")
def retro_path(retro_ckpt, tmp_path_factory):
    return saved(retro_ckpt, tmp_path_factory.mktemp("retro") / "retro.pth")


@pytest.fixture(scope="module")
def disco_ckpt(student):
    head = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    return distill_checkpoint(student, "disco", {"head": head, "head_ema": head})


def test_encoder_backbone_features_match_the_student(student, retro_path):
    encoder, info = load_encoder(retro_path)
    assert info == {"source": "student", "arch": "resnet18", "features": "backbone", "dim": 512}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), student.features(x))
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_encoder_adapter_features_have_teacher_width(student, adapter, retro_path):
    encoder, info = load_encoder(retro_path, which="adapter")
    assert info == {"source": "student", "arch": "resnet18", "features": "adapter", "dim": 2048}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(x)
        torch.testing.assert_close(out, adapter(student(x)).mean(dim=(2, 3)))
    assert out.shape == (2, 2048)


def test_only_retro_checkpoints_have_an_adapter(disco_ckpt, r18_path, tmp_path):
    with pytest.raises(CheckpointError, match="only Retro checkpoints have an adapter"):
        load_encoder(saved(disco_ckpt, tmp_path / "disco.pth"), which="adapter")
    with pytest.raises(CheckpointError, match="only Retro checkpoints have an adapter"):
        load_encoder(r18_path, which="adapter")


def test_encoder_from_a_teacher_checkpoint(r18_path):
    encoder, info = load_encoder(r18_path)
    assert info == {"source": "teacher", "arch": "resnet18", "features": "backbone", "dim": 512}
    teacher, _ = load_teacher(r18_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), teacher.features(x))


@pytest.mark.exact
def test_extract_student_state(student, retro_ckpt):
    """Exact on any CPU: the compared tensors are copies read from a file or state dict, with no arithmetic between them."""
    arch, state, dropped = extract_student_state(retro_ckpt)
    body = student.body.state_dict()
    assert arch == "resnet18"
    assert list(state) == list(body)
    assert all(torch.equal(state[k], body[k]) for k in body)
    n_teacher = len(Teacher("resnet18", with_head=False).state_dict())
    assert dropped == {"student_ema": len(body), "adapter": 18, "teacher": n_teacher, "queue": 2}


def test_extract_student_state_needs_a_student(r18_moco):
    with pytest.raises(CheckpointError, match="no student in this checkpoint"):
        extract_student_state(r18_moco)
