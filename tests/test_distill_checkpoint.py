"""The distillation checkpoint's writer and readers, through the one module that defines its format.

A checkpoint is built by the function ``Trainer.state`` calls, written with
``save_atomic``, and read back by the student readers and the resume check of
:mod:`distill.checkpoint`; a change to the layout on one side only fails here.
A tiny MoCo v2 ResNet-18 (no teacher, a queue of 16) keeps this to seconds.
"""

from pathlib import Path

import pytest
import torch

from distill.checkpoint import (
    CHECKPOINT_VERSION,
    build_checkpoint,
    check_resumable,
    extract_student_state,
    load_encoder,
    load_student,
    rng_state,
)
from distill.common import DISTILL_FORMAT
from distill.config import load_config
from distill.engine import build_method, make_sgd
from retro_transfer.safe_io import CheckpointError, safe_load, save_atomic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    """A MoCo v2 run's config, method and training state at step 3, as the engine holds them."""
    cfg = load_config(
        REPO / "configs/distill/moco_v2_r18.yaml", ["loss.queue_size=16", "train.batch_size=8", "output_dir=unused"], check_paths=False
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    optimizer = make_sgd(method.trainable_parameters(), 0.1, 0.9, 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return cfg, method, optimizer, scheduler, scaler


@pytest.fixture
def written(run, tmp_path):
    """The checkpoint of ``run`` written to disk as ``Trainer.save`` writes it: its path and the dict."""
    cfg, method, optimizer, scheduler, scaler = run
    ckpt = build_checkpoint(cfg, method, 3, optimizer, scheduler, scaler, rng_state(torch.device("cpu")))
    path = tmp_path / "checkpoint_last.pth"
    save_atomic(ckpt, path)
    return path, ckpt


@pytest.mark.exact
def test_the_reader_returns_the_student_the_writer_saved(run, written):
    """The student read back holds the very tensors written: a save and a load, no arithmetic, so equality is exact."""
    _, method, *_ = run
    path, ckpt = written
    assert ckpt["format"] == DISTILL_FORMAT and ckpt["version"] == CHECKPOINT_VERSION
    assert ckpt["method"] == "moco_v2" and ckpt["student_arch"] == "resnet18" and ckpt["teacher_arch"] is None

    arch, state, dropped = extract_student_state(safe_load(path), str(path))
    expected = method.student.body.state_dict()
    assert arch == "resnet18" and state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert "student" not in dropped and {"head", "queue"} <= dropped.keys()

    student, info = load_student(path)
    assert info["method"] == "moco_v2" and info["step"] == 3 and info["arch"] == "resnet18"
    assert all(torch.equal(student.body.state_dict()[k], expected[k]) for k in expected)
    _, encoder_info = load_encoder(path)
    assert encoder_info == {"source": "student", "arch": "resnet18", "features": "backbone", "dim": student.out_channels}


def test_resume_accepts_its_own_run_and_refuses_another(run, written):
    cfg, *_ = run
    path, ckpt = written
    check_resumable(safe_load(path), path, cfg.method, cfg.student.arch)
    with pytest.raises(CheckpointError, match=r"is a moco_v2 run of resnet18, but this config trains retro on resnet18"):
        check_resumable(ckpt, path, "retro", "resnet18")
    with pytest.raises(CheckpointError, match="not a distillation checkpoint of this project"):
        check_resumable({**ckpt, "format": "other"}, path, cfg.method, cfg.student.arch)


def test_another_layout_version_is_refused_in_one_line(run, written, tmp_path):
    """A file of a future layout is refused by every reader, naming the file and both versions."""
    cfg, *_ = run
    _, ckpt = written
    future = tmp_path / "future.pth"
    save_atomic({**ckpt, "version": CHECKPOINT_VERSION + 1}, future)
    expected = f"{future} is a distillation checkpoint of layout version {CHECKPOINT_VERSION + 1}, but this"
    for read in (load_student, load_encoder, lambda p: check_resumable(safe_load(p), p, cfg.method, cfg.student.arch)):
        with pytest.raises(CheckpointError) as refused:
            read(future)
        message = str(refused.value)
        assert message.startswith(expected) and f"reads version {CHECKPOINT_VERSION}" in message
        assert "\n" not in message
