"""The engine on the paths users run at scale: SyncBN, split BN, gathers, the logged rate, RNG, data, monitor.

Runs are in-process ``Trainer``s at toy scale (32-px crops of the session's
shapes images, batch 8, a few steps).
"""

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist

from distill import distributed as dist_utils
from distill.config import ConfigError, load_config
from distill.data import MultiViewImages, decode_all, list_images, moco_v2_augmentation
from distill.engine import Trainer, convert_sync_batchnorm, lr_factor, resolve_bn_splits
from distill.evaluation import eval_transform, extract_features, image_folder, knn_classify, make_loader
from distill.checkpoint import load_encoder
from retro_transfer.safe_io import safe_load
from retro_transfer.models import build_student


def toy_config(shapes_root, out, method="moco_v2", *extra, teacher=None):
    overrides = [
        f"data.train_dir={shapes_root / 'unlabeled'}",
        "data.image_size=32",
        "data.num_workers=0",
        "student.arch=resnet18",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.max_steps=2",
        "loss.queue_size=16",
        "log.tensorboard=false",
        "log.every=1",
        "checkpoint.keep=0",
        f"output_dir={out}",
    ]
    if teacher is not None:
        overrides += ["teacher.arch=resnet18", f"teacher.checkpoint={teacher}"]
    return load_config(f"configs/distill/shapes_{method}_effb0.yaml", overrides + list(extra))


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- SyncBN ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_sync_bn_keeps_the_students_fused_activations(arch):
    """timm's BatchNormAct2d holds SiLU / Hardswish; after conversion the network computes the same function."""
    torch.manual_seed(0)
    student = build_student(arch).eval()
    with torch.no_grad():  # non-trivial statistics, so that BN is not an identity
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    converted = convert_sync_batchnorm(copy.deepcopy(student)).eval()
    synced = [m for m in converted.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(synced) > 40, "the student's BN layers became SyncBatchNorm"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), student(x), rtol=1e-5, atol=1e-5)


# -- split BN in one process ----------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, world, given, expected",
    [(256, 1, None, 8), (128, 1, None, 8), (64, 1, None, 4), (48, 1, None, 3), (32, 1, None, 2), (16, 1, None, 1),
     (8, 1, 2, 2), (256, 8, None, 1)],
)  # fmt: skip
def test_bn_splits_default_to_sub_batches_of_at_least_16(shapes_root, tmp_path, batch, world, given, expected):
    extra = [f"train.batch_size={batch}", f"loss.queue_size={batch * 4}"]
    if given is not None:
        extra.append(f"train.bn_splits={given}")
    cfg = toy_config(shapes_root, tmp_path, "moco_v2", *extra)
    assert resolve_bn_splits(cfg, world) == expected


def test_bn_splits_are_refused_where_they_cannot_apply(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match="sub-batches of at least 2"):
        toy_config(shapes_root, tmp_path, "moco_v2", "train.bn_splits=3")
    cfg = toy_config(shapes_root, tmp_path, "moco_v2", "train.bn_splits=2")
    with pytest.raises(ConfigError, match="shuffled BN across them"):
        resolve_bn_splits(cfg, 2)


def test_the_run_says_how_the_key_encoder_normalises(shapes_root, tmp_path, capsys):
    Trainer(toy_config(shapes_root, tmp_path / "run", "moco_v2", "train.bn_splits=2", "train.max_steps=1")).fit()
    assert "key encoder BN: split BN, batch shuffled into 2 sub-batches of 4 (one process)" in capsys.readouterr().out


# -- all-gather -----------------------------------------------------------------------------


@pytest.mark.exact
def test_all_gather_buffers_are_contiguous_for_channels_last_input(monkeypatch):
    """NCCL writes row-major bytes: buffers copied from a channels_last input would be misread.

    Exact on any CPU: a one-process all-gather copies the tensor.
    """
    seen = []
    real_all_gather = dist.all_gather

    def spy(outputs, tensor, *args, **kwargs):
        seen.append([t.is_contiguous() for t in outputs] + [tensor.is_contiguous()])
        return real_all_gather(outputs, tensor, *args, **kwargs)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_gather", spy)
        x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
        gathered = dist_utils.concat_all_gather(x)
    finally:
        dist.destroy_process_group()
    assert seen == [[True, True]]
    assert torch.equal(gathered, x)


# -- what the log says ----------------------------------------------------------------------


def test_logged_learning_rate_is_the_one_the_step_used(shapes_root, tmp_path):
    cfg = toy_config(shapes_root, tmp_path / "run", "moco_v2", "train.warmup_steps=4", "train.max_steps=3")
    Trainer(cfg).fit()
    logged = [r["lr"] for r in read_log(tmp_path / "run")]
    used = [cfg.train.scaled_lr * lr_factor(step, 3, 4, "cosine") for step in range(3)]  # 1/4, 2/4, 3/4 of the rate
    assert logged == pytest.approx(used, rel=1e-6)


@pytest.mark.exact
def test_resume_restores_the_torch_rng(shapes_root, tmp_path):
    """Split BN's permutations (and shuffle BN's under torchrun) come from the global RNG.

    Exact on any CPU: it compares the generator's state bytes, no float arithmetic.
    """
    out = tmp_path / "run"
    Trainer(toy_config(shapes_root, out, "moco_v2", "train.bn_splits=2")).fit()
    saved = safe_load(out / "checkpoint_last.pth")["rng"]["torch"]
    torch.manual_seed(12345)
    Trainer(toy_config(shapes_root, out, "moco_v2", "train.bn_splits=2", "resume=auto", "train.max_steps=3"))
    assert torch.equal(torch.get_rng_state(), saved)


# -- data: decoded once, the same pixels ----------------------------------------------------


@pytest.mark.exact
def test_in_memory_images_give_the_streamed_views(shapes_root):
    """Exact on any CPU: both paths decode with the same function and run the same seeded augmentation on the same uint8 image."""
    files = list_images(shapes_root / "unlabeled")
    decoded = decode_all(files, limit_mb=64)
    assert decoded is not None and len(decoded) == len(files) and decoded[0].dtype == torch.uint8
    augmentation = moco_v2_augmentation(32)
    streamed = MultiViewImages(files, augmentation, views=2, seed=3)
    in_memory = MultiViewImages(files, augmentation, views=2, seed=3, decoded=decoded)
    for key in [(0, 0), (5, 0), (5, 1), (len(files) - 1, 7)]:
        for a, b in zip(streamed[key], in_memory[key]):
            assert torch.equal(a, b)
    assert not torch.equal(streamed[(5, 0)][0], streamed[(5, 1)][0]), "another epoch, another augmentation"


def test_a_set_over_the_memory_limit_streams(tmp_path):
    from PIL import Image

    Image.new("RGB", (1024, 1024)).save(tmp_path / "big.png")  # 3 MiB decoded
    assert decode_all([tmp_path / "big.png"], limit_mb=2) is None
    assert decode_all([tmp_path / "big.png"], limit_mb=0) is None  # 0: always stream
    assert decode_all([tmp_path / "big.png"], limit_mb=4) is not None


# -- the online k-NN monitor ------------------------------------------------------------------


def test_knn_monitor_logs_the_students_accuracy(shapes_root, teacher_ckpt, tmp_path, capsys):
    """Every eval.every steps log.jsonl holds the k-NN top-1 of the student's backbone (and Retro's adapter),
    equal to a k-NN classification recomputed from the saved student."""
    out = tmp_path / "run"
    knn_data = shapes_root / "classification"
    cfg = toy_config(
        shapes_root, out, "retro", f"eval.knn_data={knn_data}", "eval.every=2", "train.max_steps=3", "log.every=10",
        teacher=teacher_ckpt,
    )
    Trainer(cfg).fit()
    records = read_log(out)
    assert [r["step"] for r in records] == [2, 3]  # monitor steps and the last one
    for r in records:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["knn_top1_adapter"] <= 100 and r["knn_seconds"] > 0
    assert "k-NN monitor:" in capsys.readouterr().out

    encoder, _ = load_encoder(out / "checkpoint_last.pth", "backbone")
    train = image_folder(knn_data, "train", eval_transform(32))
    val = image_folder(knn_data, "val", eval_transform(32))
    train_feats, train_labels = extract_features(encoder, make_loader(train, 64, shuffle=False))
    val_feats, val_labels = extract_features(encoder, make_loader(val, 64, shuffle=False))
    scores = knn_classify(train_feats, train_labels, val_feats, len(train.classes), k=cfg.eval.knn_k)
    expected = (scores.argmax(1) == val_labels).float().mean().item() * 100
    # Within one val image: the monitor embeds the images in batches of its own size from uint8 tensors, this
    # recomputation in batches of 64 from the loader; float32 rounding that differs with the batch shape (by CPU)
    # can reorder two nearly tied neighbours of one image, while a wrong model or split moves many.
    assert abs(records[-1]["knn_top1"] - expected) <= 100 / len(val_labels) + 1e-4


def test_monitor_keys_come_together(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match="also set eval.every=N"):
        toy_config(shapes_root, tmp_path, "moco_v2", f"eval.knn_data={shapes_root / 'classification'}")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(os.environ, "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
