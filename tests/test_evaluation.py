"""Evaluation protocols (METHOD.md): weighted k-NN, top-k accuracy, frozen linear probe, and their CLIs."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from distill.evaluation import (
    DataError,
    NonFiniteFeaturesError,
    check_image_folder,
    default_milestones,
    eval_transform,
    extract_features,
    holdout_split,
    knn_classify,
    linear_probe,
    topk_accuracy,
    train_linear_probe,
    train_transform,
)

ROOT = Path(__file__).resolve().parents[1]
T = 0.07


def _tool(name):
    """Import ``tools/<name>.py`` as a module: its ``main(argv)`` runs in-process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ k-NN


def _toy():
    """4 training points of 2 classes (deliberately not unit length) and one query along x.

    Cosine similarities to the query: 1.0 (class 0), 0.9 and 0.9 (class 1), -1.0 (class 0).
    """
    s = math.sqrt(1 - 0.9**2)
    train = torch.tensor([[2.0, 0.0], [2.7, 3 * s], [0.45, -0.5 * s], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    return train, labels, torch.tensor([[5.0, 0.0]])


def test_knn_scores_are_temperature_weighted_votes():
    train, labels, query = _toy()
    scores = knn_classify(train, labels, query, num_classes=2, k=3, temperature=T)
    expected = torch.tensor([[math.exp(1.0 / T), 2 * math.exp(0.9 / T)]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    # A majority vote of the 3 neighbours says class 1; the sharp weighting says class 0 ...
    assert scores.argmax(1).item() == 0
    # ... and a flat temperature turns it back into (nearly) a majority vote.
    flat = knn_classify(train, labels, query, num_classes=2, k=3, temperature=1.0)
    torch.testing.assert_close(flat, torch.tensor([[math.e, 2 * math.exp(0.9)]], dtype=torch.float64), rtol=1e-5, atol=0)
    assert flat.argmax(1).item() == 1


def test_knn_clips_k_and_chunking_does_not_change_scores():
    train, labels, query = _toy()
    all_four = knn_classify(train, labels, query, num_classes=2, k=200, temperature=T)
    expected = torch.tensor([[math.exp(1 / T) + math.exp(-1 / T), 2 * math.exp(0.9 / T)]], dtype=torch.float64)
    torch.testing.assert_close(all_four, expected, rtol=1e-5, atol=0)

    gen = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    queries = torch.randn(11, 8, generator=gen)
    whole = knn_classify(bank, bank_labels, queries, num_classes=4, k=7)
    chunked = knn_classify(bank, bank_labels, queries, num_classes=4, k=7, chunk_size=3)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)  # float32 matmul rounding only
    assert whole.shape == (11, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k must be"), ({"temperature": 0.0}, "temperature"), ({"num_classes": 1}, "labels must lie")],
)
def test_knn_rejects_bad_values(kwargs, message):
    train, labels, query = _toy()
    args = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        knn_classify(train, labels, query, **args)


# ------------------------------------------------------------------ top-k accuracy


def test_topk_accuracy_on_a_hand_made_score_matrix():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 2, 1, 0])
    # top-1: only row 0; top-2: rows 0-2; top-5 is clipped to the 3 classes: all rows.
    assert topk_accuracy(scores, labels, ks=(1, 2, 5)) == {"top1": 25.0, "top2": 75.0, "top5": 100.0}


def test_transforms_give_the_crop_size():
    image = Image.new("RGB", (80, 50), (200, 30, 30))
    assert eval_transform(32)(image).shape == (3, 32, 32)
    assert train_transform(32)(image).shape == (3, 32, 32)
    assert default_milestones(100) == [60, 80]


# ------------------------------------------------------------------ linear probe


def _separable_loaders(seed=0, per_class=20):
    """3 classes of 3x4x4 "images" around well-separated random means; train and val loaders."""
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(3, 3, 4, 4, generator=gen)

    def split(n):
        y = torch.arange(3).repeat_interleave(n)
        return TensorDataset(means[y] + 0.5 * torch.randn(len(y), 3, 4, 4, generator=gen), y)

    return DataLoader(split(per_class), batch_size=16, shuffle=True), DataLoader(split(per_class // 2), batch_size=16)


def _fixed_encoder():
    """Flatten -> fixed random projection -> BatchNorm (in train mode: a probe must not update its statistics)."""
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16))
    return encoder.train()


@pytest.mark.exact
@pytest.mark.parametrize("precompute", [False, True])
def test_linear_probe_learns_and_leaves_the_encoder_frozen(precompute):
    """Exact on any CPU: the encoder's tensors are never written to, and the repeated probe runs the same operations on the same shapes in the same process."""
    encoder = _fixed_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train, val = _separable_loaders()
    kwargs = dict(num_classes=3, epochs=4, lr=0.5, precompute_features=precompute, seed=3)
    result = train_linear_probe(encoder, train, val, **kwargs)

    assert result["top1"] > 80.0, result  # chance is 33 %
    assert result["top5"] == 100.0 and result["epochs"] == 4 and result["lr"] == 0.5
    for key, value in encoder.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, before[key]), f"{key} changed during the linear probe"
    assert encoder.training and all(p.requires_grad for p in encoder.parameters()), "caller's state not restored"
    # Same seed, same numbers.
    again = train_linear_probe(encoder, train, val, **kwargs)
    assert again["top1"] == result["top1"] and again["final_train_loss"] == result["final_train_loss"]


# ------------------------------------------------------------------ standardised linear probe (the default)


def _clusters(n_train=280, n_val=70, dim=64, classes=7, spread=2.5, seed=0):
    """Gaussian clusters that overlap (spread > 1): a probe scores well above chance, but not 100%."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y, yv = torch.arange(n_train) % classes, torch.arange(n_val) % classes
    x = centres[y] + spread * torch.randn(n_train, dim, generator=g)
    xv = centres[yv] + spread * torch.randn(n_val, dim, generator=g)
    return x, y, xv, yv


def test_probe_accuracy_does_not_depend_on_feature_scale():
    """The same features x 1e-5 (EfficientNet-B0's random features are ~5e-6) and x 1e3 score the same.

    Standardisation maps both to the same numbers up to float rounding, so the
    accuracies may differ by at most one val image (1/70 = 1.43 points here).
    """
    x, y, xv, yv = _clusters()
    small = linear_probe(x * 1e-5, y, xv * 1e-5, yv, 7)
    large = linear_probe(x * 1e3, y, xv * 1e3, yv, 7)
    one_image = 100.0 / len(yv)
    assert 100.0 / 7 + 15 < large["top1"] < 100.0, large["top1"]  # learns, and the task is not trivial
    assert abs(small["top1"] - large["top1"]) <= one_image + 1e-9, (small["top1"], large["top1"])
    assert small["weight_decay"] == large["weight_decay"]


def test_probe_reaches_100_percent_on_linearly_separable_features():
    """Each class is +1 on its own coordinate and 0 elsewhere, plus small noise: a linear classifier separates them."""
    g = torch.Generator().manual_seed(1)
    y, yv = torch.arange(210) % 7, torch.arange(70) % 7
    x = F.one_hot(y, 7).float() * 3 + 0.1 * torch.randn(210, 7, generator=g)
    xv = F.one_hot(yv, 7).float() * 3 + 0.1 * torch.randn(70, 7, generator=g)
    x, xv = torch.cat([x, torch.randn(210, 25, generator=g)], 1), torch.cat([xv, torch.randn(70, 25, generator=g)], 1)
    result = linear_probe(x, y, xv, yv, 7)
    assert result["top1"] == 100.0 and result["val_correct"] == [1] * 70


def test_poisoned_val_labels_do_not_change_the_chosen_hyper_parameters():
    """Selection reads the training split only: shuffling val labels leaves the choice and its sweep as they were."""
    x, y, xv, yv = _clusters(seed=2)
    clean = linear_probe(x, y, xv, yv, 7)
    poisoned = linear_probe(x, y, xv, yv[torch.randperm(len(yv), generator=torch.Generator().manual_seed(0))], 7)
    assert poisoned["weight_decay"] == clean["weight_decay"]
    assert poisoned["selection"] == clean["selection"]
    assert poisoned["top1"] < clean["top1"] - 20  # the poison did reach val: the accuracy fell to about chance
    assert len(clean["selection"]["sweep"]) > 1 and clean["selection"]["num_holdout"] == 56  # 20% of 280


def test_holdout_split_is_stratified_and_keeps_every_class_in_the_fit_part():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, held = holdout_split(labels, fraction=0.2, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(16))
    assert labels[held].tolist() == [0, 0, 1]  # 20% of 10, 20% of 5, none of a one-image class
    assert set(labels[fit].tolist()) == {0, 1, 2}


def test_extract_features_returns_trainable_cpu_tensors():
    encoder = _fixed_encoder()
    _, val = _separable_loaders()
    feats, labels = extract_features(encoder, val, "cpu")
    assert feats.shape == (30, 16) and labels.tolist() == sorted(labels.tolist())
    assert not feats.is_inference() and feats.dtype == torch.float32


# ------------------------------------------------------------------ data checks


def _image_folder(root, classes=("a", "b"), splits=("train", "val")):
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(root / split / name / "0.jpg")
    return root


def test_data_checks_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_image_folder(tmp_path / "nowhere")
    root = _image_folder(tmp_path / "d1", splits=("train",))
    with pytest.raises(DataError, match=r"no val/ folder .*make_shapes\.py"):
        check_image_folder(root)
    root = _image_folder(tmp_path / "d2")
    (root / "val" / "c").mkdir()
    with pytest.raises(DataError, match=r"val/c has no images"):
        check_image_folder(root)
    root = _image_folder(tmp_path / "d3")
    (root / "train" / "b" / "0.jpg").rename(root / "train" / "b" / "0.txt")
    with pytest.raises(DataError, match=r"train/b has no images"):
        check_image_folder(root)
    assert check_image_folder(_image_folder(tmp_path / "ok")) == ["a", "b"]


# ------------------------------------------------------------------ CLIs


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A torchvision-layout ResNet-18 state dict, as a user's teacher file would be."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _run(tool, argv, capsys):
    """``main(argv)``: (exit code, stdout, stderr), whether it returns or exits."""
    try:
        code = _tool(tool).main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _check_payload(path, described):
    """The JSON report: finite metrics, which features were used, and the arguments."""
    payload = json.loads(path.read_text())
    for key in ("top1", "top5"):
        assert math.isfinite(payload["metrics"][key]) and 0 <= payload["metrics"][key] <= 100
    assert payload["features"] == described
    assert payload["info"]["features"] == ("adapter" if described.startswith("Retro") else "backbone")
    assert payload["args"]["data"] and payload["data"]["num_classes"] == 7
    return payload


def test_linear_eval_cli_end_to_end(shapes_root, teacher_checkpoint, tmp_path, capsys):
    """The default (standardised) protocol, then MoCo's; MoCo's options without --protocol moco are refused."""
    common = [teacher_checkpoint, "--data", shapes_root / "classification", "--batch-size", 32, "--image-size", 16,
              "--workers", 0, "--device", "cpu"]
    out = tmp_path / "linear.json"
    code, stdout, err = _run("linear_eval", common + ["--out", out], capsys)
    assert code == 0, err
    assert "features: teacher backbone (512-d)" in stdout and "held-out training images" in stdout
    payload = _check_payload(out, "teacher backbone (512-d)")
    assert payload["probe"]["weight_decay"] in [r["weight_decay"] for r in payload["probe"]["selection"]["sweep"]]

    out = tmp_path / "moco.json"
    code, stdout, err = _run("linear_eval", common + ["--protocol", "moco", "--epochs", 2, "--lr", 1, "--out", out], capsys)
    assert code == 0, err
    assert "MoCo protocol: 2 epochs, lr 1" in stdout
    payload = _check_payload(out, "teacher backbone (512-d)")
    assert payload["probe"]["epochs"] == 2 and payload["args"]["precompute"] is False

    code, stdout, err = _run("linear_eval", common + ["--lr", 1], capsys)
    assert code == 2 and "--lr belong to --protocol moco" in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def retro_checkpoint(tmp_path_factory):
    """A Retro-style distillation checkpoint: ResNet-18 student body and a (narrow, 64-d) bottleneck adapter."""
    from distill.common import DISTILL_FORMAT
    from retro_transfer.models.adapters import BottleneckAdapter
    from retro_transfer.models.students import Student

    torch.manual_seed(0)
    student, adapter = Student("resnet18"), BottleneckAdapter(512, 64)
    model = {f"student.{k}": v for k, v in student.state_dict().items()}
    model.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
    path = tmp_path_factory.mktemp("ckpt") / "retro.pth"
    torch.save({"format": DISTILL_FORMAT, "method": "retro", "student_arch": "resnet18", "model": model}, path)
    return path


@pytest.mark.parametrize(
    "features, described", [("adapter", "Retro adapter output (64-d)"), ("backbone", "student backbone (512-d)")]
)
def test_knn_eval_cli_reports_which_features(features, described, shapes_root, retro_checkpoint, tmp_path, capsys):
    out = tmp_path / "knn.json"
    argv = [retro_checkpoint, "--data", shapes_root / "classification", "--features", features, "--k", 200,
            "--batch-size", 32, "--image-size", 16, "--workers", 0, "--device", "cpu", "--out", out]
    code, stdout, err = _run("knn_eval", argv, capsys)
    assert code == 0, err
    assert f"features: {described}" in stdout and "clipped from 200" in stdout
    payload = _check_payload(out, described)
    assert payload["info"]["source"] == "student" and payload["knn"]["k"] == 24


@pytest.mark.parametrize("tool", ["linear_eval", "knn_eval"])
def test_cli_data_errors_are_one_line_exit_2(tool, shapes_root, teacher_checkpoint, tmp_path, capsys):
    root = _image_folder(tmp_path / "d", splits=("train",))
    empty_class = _image_folder(tmp_path / "e")
    (empty_class / "val" / "c").mkdir()
    cases = [
        (tmp_path / "missing", "does not exist"),
        (root, "no val/ folder"),
        (empty_class, "val/c has no images"),
        (shapes_root, "did you mean --data"),  # the shapes root itself, not its classification/ folder
    ]
    for data, message in cases:
        code, stdout, err = _run(tool, [teacher_checkpoint, "--data", data, "--workers", 0], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err and "make_shapes.py" in err, err
    code, _, err = _run(tool, [teacher_checkpoint, "--data", root, "--batch-size", 0], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--batch-size" in err


@pytest.mark.parametrize("tool", ["linear_eval", "knn_eval"])
def test_cli_checkpoint_errors_are_one_line_exit_2(tool, shapes_root, teacher_checkpoint, tmp_path, capsys):
    data = shapes_root / "classification"
    code, _, err = _run(tool, [teacher_checkpoint, "--data", data, "--features", "adapter"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "adapter" in err, err  # teachers have none
    code, _, err = _run(tool, [tmp_path / "absent.pth", "--data", data], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "absent.pth" in err, err
    junk = tmp_path / "junk.pth"
    torch.save({"not": torch.zeros(1)}, junk)
    code, _, err = _run(tool, [junk, "--data", data], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "junk.pth" in err, err


# ------------------------------------------------------------------ hostile inputs (issue 23, points 6, 8, 10, 11)


_COMMON = ["--batch-size", 2, "--image-size", 16, "--workers", 0, "--device", "cpu"]
_QUICK = {"linear_eval": _COMMON, "knn_eval": _COMMON, "semisup_eval": ["--epochs", 1, *_COMMON]}


def _nan_teacher(tmp_path):
    """A ResNet-18 state dict with one NaN weight: every feature it gives is NaN."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan_r18.pth"
    torch.save(state, path)
    return path


def test_non_finite_features_are_refused_where_features_are_made():
    nan_encoder = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        nan_encoder[1].weight[0, 0] = float("nan")
    loader = DataLoader(TensorDataset(torch.ones(4, 3, 1, 1), torch.tensor([0, 1, 0, 1])), batch_size=2)
    with pytest.raises(NonFiniteFeaturesError, match=r"not finite \(NaN or infinite for 2 of 2 images"):
        extract_features(nan_encoder, loader)
    train, labels, query = _toy()
    with pytest.raises(NonFiniteFeaturesError, match="training features are not finite"):
        knn_classify(train.clone().fill_(float("inf")), labels, query, 2)
    with pytest.raises(NonFiniteFeaturesError, match="test features are not finite"):
        knn_classify(train, labels, torch.full_like(query, float("nan")), 2)


@pytest.mark.parametrize("tool", ["linear_eval", "knn_eval"])
def test_cli_refuses_a_teacher_with_nan_weights(tool, tmp_path, capsys):
    """It used to print "top-1 10.00" (k-NN over NaN similarities votes anyway)."""
    data = _image_folder(tmp_path / "d")
    argv = [_nan_teacher(tmp_path), "--data", data, *_QUICK[tool]]
    code, stdout, err = _run(tool, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "features are not finite" in err and "top-1" not in stdout, err


def _cut_jpeg(path):
    """A noisy JPEG cut in half: the header (tables, size) reads, the pixels do not."""
    gen = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (48, 48, 3), generator=gen, dtype=torch.uint8).numpy()).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


@pytest.mark.timeout(120)  # opening the FIFO would wait forever
@pytest.mark.parametrize("bad", ["empty", "cut", "fifo"])
@pytest.mark.parametrize("tool", ["linear_eval", "knn_eval"])
def test_cli_names_a_val_image_that_does_not_read_whole(tool, bad, teacher_checkpoint, tmp_path, capsys):
    """A 0-byte file (UnidentifiedImageError), a JPEG cut short (OSError: image file is truncated), a FIFO (a hang)."""
    data = _image_folder(tmp_path / "d")
    path = data / "val" / "b" / "1.jpg"
    {"empty": lambda p: p.write_bytes(b""), "cut": _cut_jpeg, "fifo": os.mkfifo}[bad](path)
    argv = [teacher_checkpoint, "--data", data, *_QUICK[tool]]
    code, _, err = _run(tool, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"image {path} is not readable" in err, err


def test_the_knn_monitor_names_a_train_image_cut_short(tmp_path):
    """The distillation run's monitor reads eval.knn_data itself: a ConfigError, one line from tools/distill.py."""
    from distill.config import ConfigError
    from distill.monitor import KnnMonitor

    data = _image_folder(tmp_path / "d")
    _cut_jpeg(data / "train" / "a" / "0.jpg")
    with pytest.raises(ConfigError, match=rf"eval.knn_data: image {data / 'train' / 'a' / '0.jpg'} is not readable"):
        KnnMonitor(data, image_size=16, k=1, max_images=4, device=torch.device("cpu"))


def test_the_knn_monitor_refuses_non_finite_features(tmp_path):
    """A student whose features went NaN stops the run (the engine turns this into its non-finite-loss stop)."""
    from distill.monitor import KnnMonitor

    class NanStudent(nn.Module):
        def monitored_features(self, images):
            return {"backbone": torch.full((images.shape[0], 4), float("nan"))}

    monitor = KnnMonitor(_image_folder(tmp_path / "d"), image_size=16, k=1, max_images=4, device=torch.device("cpu"))
    with pytest.raises(NonFiniteFeaturesError, match="training features are not finite"):
        monitor(NanStudent())
