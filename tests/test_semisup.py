"""Semi-supervised evaluation: the labelled subset, fine-tuning with two learning rates, and the CLI."""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from distill.evaluation import DataError, extract_features, linear_probe
from distill.semisup import default_learning_rates, draw_labelled, fine_tune, read_label_list, write_label_list

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv, capsys):
    """``tools/semisup_eval.py main(argv)`` in this process: (exit code, stdout, stderr)."""
    try:
        code = _tool("semisup_eval").main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ the labelled subset


def _listing(sizes):
    """``<class>/<file>`` paths and labels of a training split with ``sizes[c]`` images in class c."""
    classes = [f"c{c}" for c in range(len(sizes))]
    paths, labels = [], []
    for label, size in enumerate(sizes):
        paths += [f"{classes[label]}/img_{i:03d}.jpg" for i in range(size)]
        labels += [label] * size
    return paths, labels, classes


def _chosen(paths, labels, classes, fraction, seed):
    return [paths[i] for i in draw_labelled(paths, labels, classes, fraction, seed)]


def test_subset_is_drawn_per_class_from_the_seed():
    paths, labels, classes = _listing([20, 3, 1])
    chosen = _chosen(paths, labels, classes, 0.1, seed=0)
    # round(0.1 x n) per class, at least one: 2 of 20, 1 of 3 (0.3 rounds to 0), 1 of 1.
    assert [sum(p.startswith(f"{c}/") for p in chosen) for c in classes] == [2, 1, 1]
    assert chosen == _chosen(paths, labels, classes, 0.1, seed=0)
    assert len({tuple(_chosen(paths, labels, classes, 0.1, seed)) for seed in range(5)}) > 1, "the seed is ignored"
    # Neither the order of the listing nor the other classes change a class's draw.
    order = list(range(len(paths)))
    random.Random(1).shuffle(order)
    assert sorted(_chosen([paths[i] for i in order], [labels[i] for i in order], classes, 0.1, 0)) == sorted(chosen)
    alone = _chosen(paths[:20], labels[:20], classes, 0.1, seed=0)
    assert alone == [p for p in chosen if p.startswith("c0/")]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        draw_labelled(paths, labels, classes, 0.0, 0)


def test_label_list_round_trip_and_its_errors(tmp_path):
    paths, labels, classes = _listing([4, 4])
    written = write_label_list(tmp_path / "run.labels.txt", paths, [1, 5, 6], "three images")
    assert read_label_list(written, paths) == [1, 5, 6]
    # SimCLR's lists name bare files; comments and blank lines are skipped.
    (tmp_path / "simclr.txt").write_text("# a comment\n\nimg_001.jpg\n")
    with pytest.raises(DataError, match=r"line 3: 'img_001.jpg' names 2 images in different class folders"):
        read_label_list(tmp_path / "simclr.txt", paths)
    (tmp_path / "bare.txt").write_text("img_001.jpg\n")
    assert read_label_list(tmp_path / "bare.txt", paths[:4]) == [1]
    cases = {
        "c0/img_000.jpg\nc0/nope.jpg\n": r"1 entries of .* are not images of the training split \(line 2: 'c0/nope.jpg'\)",
        "c1/img_002.jpg\nc1/img_002.jpg\n": r"line 2: 'c1/img_002.jpg' repeats line 1",
        "# nothing\n": "names no images",
    }
    for text, message in cases.items():
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(DataError, match=message):
            read_label_list(tmp_path / "bad.txt", paths)
    with pytest.raises(DataError, match="does not exist"):
        read_label_list(tmp_path / "absent.txt", paths)


def test_default_learning_rates_follow_the_closer_label_setting():
    assert default_learning_rates(0.01) == (0.02, 5.0)  # SwAV, 1 % labels
    assert default_learning_rates(0.1) == (0.01, 0.2)  # SwAV, 10 % labels
    assert default_learning_rates(0.5) == (0.01, 0.2)


# ------------------------------------------------------------------ fine-tuning


def _separable(seed=0, per_class=16):
    """3 classes of 3x4x4 "images" around well-separated means: train and val loaders."""
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(3, 3, 4, 4, generator=gen)

    def split(n):
        y = torch.arange(3).repeat_interleave(n)
        return TensorDataset(means[y] + 0.5 * torch.randn(len(y), 3, 4, 4, generator=gen), y)

    train = DataLoader(split(per_class), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(split(per_class // 2), batch_size=8)


def _encoder():
    """Images -> 16-d features through a Linear and a BatchNorm, frozen as load_encoder returns encoders."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16)).eval().requires_grad_(False)


def _fine_tune(encoder, lr_backbone, seed=3):
    train, val = _separable()
    return fine_tune(encoder, 16, 3, train, val, epochs=4, lr_backbone=lr_backbone, lr_classifier=0.5, seed=seed)


@pytest.mark.exact
def test_fine_tuning_trains_the_backbone_at_its_own_learning_rate():
    """Exact on any CPU: with a learning rate of 0 SGD adds 0 * update to each weight, which leaves a float unchanged (the gradients are finite)."""
    still = _encoder()
    before = {k: v.clone() for k, v in still.state_dict().items()}
    result = _fine_tune(still, lr_backbone=0.0)
    assert result["top1"] > 80.0, result  # the classifier learned (chance is 33 %)
    after = still.state_dict()
    for name, _ in still.named_parameters():
        assert torch.equal(after[name], before[name]), f"{name} moved with a backbone learning rate of 0"
    # BatchNorm trained on batch statistics: its running mean moved although its weights did not.
    assert not torch.equal(after["2.running_mean"], before["2.running_mean"])

    moving = _encoder()
    tuned = _fine_tune(moving, lr_backbone=0.1)
    assert not torch.equal(moving.state_dict()["1.weight"], before["1.weight"]), "the backbone did not train"
    assert tuned["lr_backbone"] == 0.1 and tuned["lr_classifier"] == 0.5 and tuned["milestones"] == [2, 3]
    again = _fine_tune(_encoder(), lr_backbone=0.1)
    assert (again["top1"], again["final_train_loss"]) == (tuned["top1"], tuned["final_train_loss"])


def test_fine_tuning_stops_on_divergence():
    with pytest.raises(FloatingPointError, match="lower the learning rates"):
        _fine_tune(_encoder(), lr_backbone=1e30)


class _Scaled(nn.Module):
    """An encoder whose features are ``factor`` times another's (EfficientNet-B0's random features are ~5e-6)."""

    def __init__(self, encoder, factor):
        super().__init__()
        self.encoder, self.factor = encoder, factor

    def forward(self, x):
        return self.encoder(x) * self.factor


def test_probe_initialised_head_starts_at_the_linear_probe():
    """With both learning rates 0 and BatchNorm frozen nothing moves: the result is the probe's.

    Both paths compute the same features and the same head, so at most one of
    the 24 val images may differ (float rounding at a decision boundary).
    """
    train, val = _separable()
    result = fine_tune(_encoder(), 16, 3, train, val, epochs=1, lr_backbone=0.0, lr_classifier=0.0,
                       head_init="probe", bn="frozen", seed=3)
    feats = {name: extract_features(_encoder(), loader) for name, loader in (("train", train), ("val", val))}
    probe = linear_probe(*feats["train"], *feats["val"], num_classes=3, seed=3)
    assert abs(result["top1"] - probe["top1"]) <= 100.0 / 24 + 1e-9
    assert result["head_probe"]["weight_decay"] == probe["weight_decay"]


@pytest.mark.exact
def test_frozen_batchnorm_keeps_its_running_statistics_while_the_weights_train():
    """Exact on any CPU: frozen BatchNorm layers are never written to; the trained Linear layer is compared for change only."""
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train, val = _separable()
    fine_tune(encoder, 16, 3, train, val, epochs=2, lr_backbone=0.1, lr_classifier=0.1, head_init="probe", bn="frozen")
    after = encoder.state_dict()
    assert torch.equal(after["2.running_mean"], before["2.running_mean"])
    assert torch.equal(after["2.running_var"], before["2.running_var"])
    assert not torch.equal(after["1.weight"], before["1.weight"]), "the backbone did not train"


def test_probe_initialised_fine_tuning_learns_on_tiny_features():
    """Features x 1e-5: a random head at SwAV's classifier lr barely moves, the probe-initialised one still learns.

    Chance is 33.3%; the separable clusters give the probe well above 80%.
    """
    train, val = _separable()
    tiny = fine_tune(_Scaled(_encoder(), 1e-5), 16, 3, train, val, epochs=4, lr_backbone=0.01, lr_classifier=0.2,
                     head_init="probe", bn="frozen", seed=3)
    assert tiny["top1"] > 80.0, tiny["top1"]


def test_unknown_head_init_or_bn_mode_is_refused():
    train, val = _separable()
    with pytest.raises(ValueError, match="unknown head initialisation 'zeros'"):
        fine_tune(_encoder(), 16, 3, train, val, epochs=1, head_init="zeros")
    with pytest.raises(ValueError, match="unknown BatchNorm mode 'sync'"):
        fine_tune(_encoder(), 16, 3, train, val, epochs=1, bn="sync")
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        fine_tune(_encoder(), 16, 3, train, val, epochs=1, optimizer_name="lamb")


def test_adamw_fine_tuning_trains_the_backbone_and_learns():
    """The pipeline's recipe (probe head, frozen BN, AdamW) on separable clusters: above 80% (chance 33.3%), backbone moved."""
    encoder = _encoder()
    before = encoder.state_dict()["1.weight"].clone()
    train, val = _separable()
    result = fine_tune(encoder, 16, 3, train, val, epochs=3, lr_backbone=1e-3, lr_classifier=1e-2, schedule="cosine",
                       head_init="probe", bn="frozen", optimizer_name="adamw", seed=3)
    assert result["top1"] > 80.0 and result["optimizer"] == "adamw", result
    assert not torch.equal(encoder.state_dict()["1.weight"], before), "the backbone did not train"


# ------------------------------------------------------------------ the command line, on a real student


@pytest.fixture(scope="module")
def student(distilled):
    return distilled("resnet18")


def _argv(student, shapes_root, out, *extra):
    return [student, "--data", shapes_root / "classification", "--epochs", 2, "--batch-size", 8, "--image-size", 32,
            "--workers", 0, "--device", "cpu", "--out", out, *extra]


@pytest.mark.exact
def test_cli_fine_tunes_and_its_label_list_repeats_the_run(student, shapes_root, tmp_path, capsys):
    """Exact on any CPU: the repeated run fine-tunes on the same images with the same seed, the same operations
    on the same shapes, so its metrics and loss equal the first run's."""
    code, stdout, err = _run(_argv(student, shapes_root, tmp_path / "a" / "r.json", "--label-fraction", 0.5), capsys)
    assert code == 0, err
    assert "fine-tuning the student resnet18 (512-d features)" in stdout and "top-1" in stdout
    first = json.loads((tmp_path / "a" / "r.json").read_text())
    labelled = first["labelled"]
    train = shapes_root / "classification" / "train"
    sizes = {c.name: len(list(c.iterdir())) for c in train.iterdir()}
    assert labelled["per_class"] == {c: max(1, math.floor(0.5 * n + 0.5)) for c, n in sizes.items()}
    assert labelled["list_file"] == str(tmp_path / "a" / "r.labels.txt")
    listed = [line for line in Path(labelled["list_file"]).read_text().splitlines() if not line.startswith("#")]
    assert len(listed) == labelled["count"] and all((train / p).is_file() for p in listed)
    assert first["finetune"]["lr_backbone"] == 0.01 and first["finetune"]["lr_classifier"] == 0.2
    assert all(0 <= first["metrics"][k] <= 100 for k in ("top1", "top5"))

    code, _, err = _run(_argv(student, shapes_root, tmp_path / "b" / "r.json", "--label-list", labelled["list_file"]), capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "r.json").read_text())
    assert again["labelled"]["per_class"] == labelled["per_class"] and again["labelled"]["source"].startswith("listed in")
    assert [line for line in (tmp_path / "b" / "r.labels.txt").read_text().splitlines() if not line.startswith("#")] == listed
    assert again["metrics"] == first["metrics"]
    assert again["finetune"]["final_train_loss"] == first["finetune"]["final_train_loss"]


def test_cli_errors_are_one_line_exit_2(student, shapes_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("circle/not_there.jpg\n")
    junk = tmp_path / "junk.pth"
    torch.save({"not": torch.zeros(1)}, junk)
    image = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(image)
    cases = [
        (_argv(student, shapes_root, out, "--label-fraction", 0), "--label-fraction: must lie in (0, 1]"),
        (_argv(student, shapes_root, out, "--label-fraction", 0.1, "--label-list", bad_list), "not allowed with"),
        (_argv(student, shapes_root, out)[:-2], "--out"),
        (_argv(student, shapes_root, out, "--label-list", bad_list), "line 1: 'circle/not_there.jpg'"),
        (_argv(student, shapes_root, out, "--label-list", image), "not a UTF-8 text file"),
        (_argv(junk, shapes_root, out), "junk.pth"),
        (_argv(student, shapes_root, tmp_path), "is a folder"),
    ]
    for argv, message in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not out.exists()
