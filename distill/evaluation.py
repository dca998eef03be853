"""Evaluation of frozen representations: linear probe and k-NN (METHOD.md, "Evaluation protocols").

Both protocols measure what a self-supervised encoder learned without touching
its weights:

* **Standardised linear probe** (the default, :func:`linear_probe`): features
  extracted once, standardised with training-split statistics, multinomial
  logistic regression by full-batch L-BFGS, its L2 strength chosen on a
  held-out fifth of the training split. Independent of the backbone's feature
  scale, so it compares a ResNet teacher with EfficientNet students.
* **MoCo linear probe** (``main_lincls.py``, for papers' ImageNet tables): the encoder is frozen, in eval
  mode (BN running statistics, not batch statistics), and one ``nn.Linear`` on
  its global-pooled features is trained with SGD, lr 30, momentum 0.9, wd 0,
  100 epochs, lr x 0.1 at 60 % and 80 % of the epochs, batch 256, random-resized
  crops and flips for training and a centre crop for evaluation.
* **k-NN** (InstDisc / MoCo's k-NN monitor): cosine similarity between
  L2-normalised features, the k = 200 nearest training images vote for their
  class with weight ``exp(sim / 0.07)``.

For Retro students the same functions serve both linear-probe variants of
METHOD.md (student backbone features, or the 2048-d adapter output): the
encoder passed in decides which, and callers report which one they used
(:func:`describe_features`).

Everything here is a plain function over modules, loaders and tensors (no
argparse); ``tools/linear_eval.py`` and ``tools/knn_eval.py`` are the CLIs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from retro_transfer.utils.progress import progress_bar

from .common import EVAL_DATA_HINT, IMAGENET_MEAN, IMAGENET_STD, has_image

Device = Union[str, torch.device]

#: MoCo / torchvision evaluation: resize the short side to 256, centre-crop 224.
CENTER_CROP_FRACTION = 0.875

# Linear-probe defaults (MoCo v2 main_lincls.py, METHOD.md "Evaluation protocols").
LINEAR_EPOCHS = 100
LINEAR_LR = 30.0
LINEAR_MOMENTUM = 0.9
LINEAR_WEIGHT_DECAY = 0.0
LINEAR_BATCH_SIZE = 256
LR_STEP_FRACTIONS = (0.6, 0.8)
LR_STEP_GAMMA = 0.1

# k-NN defaults (InstDisc / MoCo k-NN monitor; METHOD.md allows k = 20 too).
KNN_K = 200
KNN_TEMPERATURE = 0.07
# exp(1 / T) must stay finite in float64 (max ~ e^709), so T >= 1/700.
KNN_MIN_TEMPERATURE = 1.0 / 700.0
# Bound on the (test chunk x train) similarity matrix: 2^26 floats = 256 MiB.
KNN_MAX_SIM_ELEMENTS = 1 << 26

class DataError(ValueError):
    """A data folder that cannot be used, with a one-line reason a user can act on."""


# --------------------------------------------------------------------------- transforms


def eval_transform(image_size: int = 224) -> transforms.Compose:
    """Centre-crop evaluation (MoCo/torchvision): resize the short side to ``size / 0.875``, crop ``size``."""
    _check_image_size(image_size)
    return transforms.Compose(
        [
            transforms.Resize(int(round(image_size / CENTER_CROP_FRACTION))),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(image_size: int = 224) -> transforms.Compose:
    """Linear-probe training augmentation of MoCo's ``main_lincls.py``: random-resized crop and flip."""
    _check_image_size(image_size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image size must be an integer of at least 8 pixels, got {image_size!r}")


# --------------------------------------------------------------------------- data


def check_split(root: Union[str, Path], split: str) -> List[str]:
    """Check that ``root/split`` is an ImageFolder split; return its sorted class names.

    ``ImageFolder`` would fail later with a traceback (or, worse, silently
    re-number labels); this raises :class:`DataError` naming the folder instead.
    """
    root = Path(root)
    folder = root / split
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {EVAL_DATA_HINT}")
    if not folder.is_dir():
        hint = f" (did you mean --data {root / 'classification'}?)" if (root / "classification" / split).is_dir() else ""
        raise DataError(f"no {split}/ folder in {root}{hint}; {EVAL_DATA_HINT}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; {EVAL_DATA_HINT}")
    for name in classes:
        if not has_image(folder / name, IMG_EXTENSIONS):
            raise DataError(
                f"class folder {folder / name} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...); {EVAL_DATA_HINT}"
            )
    return classes


def check_image_folder(root: Union[str, Path], splits: Sequence[str] = ("train", "val")) -> List[str]:
    """Check every split and that they share one class list (labels are indices into it)."""
    class_lists = {split: check_split(root, split) for split in splits}
    first, classes = splits[0], class_lists[splits[0]]
    for split in splits[1:]:
        if class_lists[split] != classes:
            only_first = sorted(set(classes) - set(class_lists[split]))
            only_other = sorted(set(class_lists[split]) - set(classes))
            raise DataError(
                f"{Path(root) / first} and {Path(root) / split} have different class folders "
                f"(only in {first}: {', '.join(only_first[:5]) or '-'}; only in {split}: {', '.join(only_other[:5]) or '-'})"
            )
    return classes


def image_folder(root: Union[str, Path], split: str, transform) -> ImageFolder:
    """``ImageFolder(root/split)`` after :func:`check_split` has vetted it."""
    check_split(root, split)
    return ImageFolder(str(Path(root) / split), transform=transform)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A loader whose order and worker seeds follow ``seed`` (reproducible augmentation too).

    ``workers`` is capped at the CPUs this process may use (more only add
    start-up time and PyTorch's freeze warning); workers persist across epochs.
    ``drop_last`` is for training a network whose BatchNorm layers use batch
    statistics: a last batch of one image would fail there or train on noise.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"number of workers must be >= 0, got {workers}")
    workers = min(workers, available_cpus())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        drop_last=drop_last,
    )


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- features


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients for ``module`` inside the block; its previous state after.

    Eval mode is what "frozen backbone" means in MoCo's linear probe: BN uses
    (and does not update) its running statistics.
    """
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def _check_features(feats: torch.Tensor, images: torch.Tensor) -> None:
    if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
        raise ValueError(
            f"the encoder must map images (B, 3, H, W) to pooled features (B, D); got {tuple(feats.shape)} "
            f"for input {tuple(images.shape)}"
        )


def extract_features(
    encoder: nn.Module, loader: DataLoader, device: Device = "cpu", desc: str = "features"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen encoder over ``loader``: ``(features (N, D) float32, labels (N,) int64)`` on the CPU.

    Runs under ``torch.inference_mode`` (no autograd bookkeeping) with the
    encoder in eval mode (``encoder`` must already be on ``device``); the result
    is returned as ordinary tensors, so a linear classifier can train on it.
    """
    device = torch.device(device)
    feats: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    with frozen(encoder), torch.inference_mode():
        for images, targets in progress_bar(loader, desc=desc, total=len(loader)):
            out = encoder(images.to(device, non_blocking=True))
            _check_features(out, images)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    if not feats:
        raise ValueError("the data loader yielded no images")
    # Concatenating outside inference mode gives normal tensors (usable by autograd).
    return torch.cat(feats).clone(), torch.cat(labels).clone()


# --------------------------------------------------------------------------- k-NN


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Weighted k-NN class scores (N_test, C), as in the InstDisc / MoCo k-NN monitor.

    For each test feature: cosine similarities to all training features (both
    L2-normalised), the ``k`` most similar (``k`` clipped to the training-set
    size), and ``score[c] = sum over those neighbours of class c of
    exp(sim / temperature)``. Weights are computed in float64 so that small
    temperatures do not overflow. Test features are processed in chunks so the
    similarity matrix stays within ``KNN_MAX_SIM_ELEMENTS`` unless ``chunk_size``
    says otherwise.
    """
    _check_knn_inputs(train_feats, train_labels, test_feats, num_classes, k, temperature)
    k = min(k, train_feats.shape[0])
    train_n = F.normalize(train_feats.float(), dim=1)
    test_n = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(train_n.device).long()
    if chunk_size is None:
        chunk_size = max(1, KNN_MAX_SIM_ELEMENTS // train_n.shape[0])
    scores = []
    for start in range(0, test_n.shape[0], chunk_size):
        sim = test_n[start : start + chunk_size] @ train_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim.double() / temperature).exp()
        chunk = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64, device=sim.device)
        scores.append(chunk.scatter_add_(1, labels[top_idx], weights))
    return torch.cat(scores)


def _check_knn_inputs(train_feats, train_labels, test_feats, num_classes, k, temperature) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"k-NN needs 2-D features of one width, got train {tuple(train_feats.shape)} and test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"{train_feats.shape[0]} training features but labels of shape {tuple(train_labels.shape)}")
    low, high = int(train_labels.min()), int(train_labels.max())
    if num_classes < 1 or low < 0 or high >= num_classes:
        raise ValueError(f"training labels must lie in [0, {num_classes}), got [{low}, {high}]")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature >= KNN_MIN_TEMPERATURE:
        raise ValueError(
            f"k-NN temperature must be at least {KNN_MIN_TEMPERATURE:.4f} (exp(1/T) overflows below), got {temperature}"
        )


# --------------------------------------------------------------------------- metrics


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"top1": %, "top5": %}``: how often the label is among the ``k`` highest scores.

    ``k`` is clipped to the number of classes (top-5 of a 2-class problem is
    100 %), but the key keeps the requested ``k`` so reports line up.
    """
    if scores.ndim != 2 or labels.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"need scores (N, C) and labels (N,) with N > 0, got {tuple(scores.shape)} and {tuple(labels.shape)}")
    labels = labels.to(scores.device).long()
    result = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        pred = scores.topk(min(k, scores.shape[1]), dim=1).indices
        result[f"top{k}"] = 100.0 * (pred == labels[:, None]).any(dim=1).double().mean().item()
    return result


# --------------------------------------------------------------------------- linear probe


def default_milestones(epochs: int) -> List[int]:
    """lr steps at 60 % and 80 % of the epochs (MoCo: 60 and 80 of 100)."""
    steps = {int(fraction * epochs) for fraction in LR_STEP_FRACTIONS}
    return sorted(step for step in steps if 0 < step < epochs)


def _check_probe_args(num_classes: int, epochs: int, lr: float, momentum: float, weight_decay: float) -> None:
    if num_classes < 2:
        raise ValueError(f"a linear probe needs at least 2 classes, got {num_classes}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")


def make_classifier(dim: int, num_classes: int) -> nn.Linear:
    """The probe: one Linear layer, initialised as MoCo's ``main_lincls.py`` (N(0, 0.01), zero bias)."""
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def _precomputed_batches(
    feats: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(feats.shape[0], generator=generator)
    for start in range(0, feats.shape[0], batch_size):
        idx = order[start : start + batch_size]
        yield feats[idx], labels[idx]


def _encoded_batches(encoder: nn.Module, loader: DataLoader, device: torch.device):
    """Freshly augmented images through the frozen encoder (no autograd graph kept)."""
    for images, targets in loader:
        with torch.no_grad():
            out = encoder(images.to(device, non_blocking=True))
        _check_features(out, images)
        yield out.float(), torch.as_tensor(targets).long().to(device)


def _batch_source(
    encoder: nn.Module, loader: DataLoader, device: torch.device, precompute: bool, seed: int
) -> Callable[[], Tuple[Iterator, int]]:
    """A callable giving one epoch's (features, labels) batches and their count.

    Without ``precompute`` every epoch re-reads (re-augments) the images; with
    it, features are extracted once and only their order changes per epoch.
    """
    if not precompute:
        return lambda: (_encoded_batches(encoder, loader, device), len(loader))
    feats, labels = extract_features(encoder, loader, device, desc="features (train)")
    feats, labels = feats.to(device), labels.to(device)
    batch_size = loader.batch_size or LINEAR_BATCH_SIZE
    shuffler = torch.Generator().manual_seed(seed)
    count = math.ceil(feats.shape[0] / batch_size)
    return lambda: (_precomputed_batches(feats, labels, batch_size, shuffler), count)


def _fit(classifier: nn.Linear, batches, epochs: int, lr: float, momentum: float, weight_decay: float, milestones) -> float:
    """SGD with a step schedule (x 0.1 at each milestone epoch); returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_STEP_GAMMA)
    loss = float("nan")
    for epoch in range(epochs):
        classifier.train()
        loss = _train_epoch(classifier, optimizer, *batches(), epoch)
        scheduler.step()
    return loss


def _train_epoch(classifier, optimizer, batches, total: int, epoch: int) -> float:
    """One SGD pass; returns the mean loss and stops on a non-finite one (lr too high)."""
    total_loss, count = 0.0, 0
    for feats, labels in progress_bar(batches, desc=f"linear probe epoch {epoch + 1}", total=total):
        loss = F.cross_entropy(classifier(feats), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"linear probe diverged (loss {loss.item()} in epoch {epoch + 1}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * labels.shape[0]
        count += labels.shape[0]
    return total_loss / max(count, 1)


def train_linear_probe(
    encoder: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    epochs: int = LINEAR_EPOCHS,
    lr: float = LINEAR_LR,
    momentum: float = LINEAR_MOMENTUM,
    weight_decay: float = LINEAR_WEIGHT_DECAY,
    milestones: Optional[Sequence[int]] = None,
    device: Device = "cpu",
    precompute_features: bool = False,
    seed: int = 0,
) -> Dict[str, object]:
    """Train one Linear layer on a frozen encoder's features; top-1/top-5 (%) on ``val_loader``.

    Follows MoCo's linear-classification protocol (METHOD.md): the encoder is in
    eval mode with gradients off (its weights and BN statistics do not change),
    SGD with ``momentum`` and ``weight_decay`` on the classifier only, lr x 0.1
    at ``milestones`` (default 60 % / 80 % of ``epochs``). ``train_loader``
    should apply :func:`train_transform` (fresh random crops every epoch) and
    ``val_loader`` :func:`eval_transform` (centre crop).

    ``precompute_features=True`` is a shortcut for quick runs, **not** the
    protocol: training features are extracted once from ``train_loader``
    (give it the eval transform) and the classifier trains on those fixed
    features, shuffled per epoch, in batches of ``train_loader.batch_size``.

    Deterministic given ``seed``: the global RNG is forked and re-seeded for
    the duration (classifier init, shuffling, augmentation in the main process);
    seed the loaders' generators too (:func:`make_loader`) for worker processes.
    The encoder is moved to ``device``.
    """
    _check_probe_args(num_classes, epochs, lr, momentum, weight_decay)
    device = torch.device(device)
    milestones = list(milestones) if milestones is not None else default_milestones(epochs)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        encoder.to(device)
        with frozen(encoder):
            # Validation features first: fixed (centre crop, frozen encoder), and they give the width D.
            val_feats, val_labels = extract_features(encoder, val_loader, device, desc="features (val)")
            classifier = make_classifier(val_feats.shape[1], num_classes).to(device)
            batches = _batch_source(encoder, train_loader, device, precompute_features, seed)
            loss = _fit(classifier, batches, epochs, lr, momentum, weight_decay, milestones)
            with torch.no_grad():
                scores = classifier.eval()(val_feats.to(device))
    metrics = topk_accuracy(scores, val_labels)
    return {
        **metrics,
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "milestones": milestones,
        "precompute_features": precompute_features,
        "seed": seed,
        "final_train_loss": loss,
        "feature_dim": int(val_feats.shape[1]),
        "num_val": int(val_feats.shape[0]),
        # Per validation image, in loader order: 1 if the top-1 class was right (for intervals).
        "val_correct": (scores.argmax(dim=1).cpu() == val_labels).int().tolist(),
    }


# --------------------------------------------------------------------------- standardised linear probe (the default)

#: L2 strengths (``weight_decay`` in ``mean CE + wd / 2 * ||W||^2``) the sweep tries, on standardised features.
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
#: Share of each class's training images held out to score the sweep (never the val split).
PROBE_HOLDOUT_FRACTION = 0.2
PROBE_MAX_ITERATIONS = 300
#: Used, and said so in the result, when no class has two training images to hold one out.
PROBE_FALLBACK_WEIGHT_DECAY = 0.1
# No feature is divided by less than this share of the features' mean spread: a nearly dead
# channel (a ReLU that almost never fires) would otherwise be blown up to unit variance, its
# rounding noise with it, and fine-tuning from the probe would amplify its gradients as much.
SPREAD_FLOOR = 0.01


class Standardiser:
    """Per-feature centring and scaling by training-split statistics (in float64).

    Dividing by each feature's spread makes the probe blind to the backbone's
    feature scale (EfficientNet-B0's random features are a million times
    smaller than ResNet-18's); the floor on the spread is relative to the mean
    spread, so scaling every feature by any factor changes nothing.
    """

    def __init__(self, feats: torch.Tensor):
        feats = feats.double()
        self.mean = feats.mean(dim=0)
        std = feats.std(dim=0, unbiased=False)
        floor = SPREAD_FLOOR * float(std.mean()) if std.numel() else 0.0
        self.scale = std.clamp_min(floor) if floor > 0 else torch.ones_like(std)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats.double() - self.mean) / self.scale).float()


def holdout_split(labels: torch.Tensor, fraction: float = PROBE_HOLDOUT_FRACTION, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, held_out)`` of the training split, stratified: ``fraction`` of each class is held out.

    A class with a single image stays wholly in ``fit`` (the probe must see
    every class); ``held_out`` is empty when no class has two images.
    """
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        take = int(round(fraction * members.numel())) if members.numel() >= 2 else 0
        take = min(max(take, 1 if members.numel() >= 2 else 0), members.numel() - 1)
        held.append(members[:take])
        fit.append(members[take:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_logistic_regression(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iterations: int = PROBE_MAX_ITERATIONS) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS: ``mean CE + weight_decay / 2 * ||W||^2`` (bias free).

    Full-batch L-BFGS from a zero start has no learning rate, batch order or
    initialisation to choose, so the only hyper-parameter is ``weight_decay``
    (CLIP's linear-probe protocol; the data sets here fit in memory as features).
    """
    classifier = nn.Linear(feats.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=max_iterations, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(feats), labels) + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def _score(classifier: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """(accuracy %, mean cross-entropy) of ``classifier`` on ``feats``."""
    with torch.no_grad():
        logits = classifier(feats)
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item(), F.cross_entropy(logits, labels).item()


def choose_weight_decay(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                        grid: Sequence[float] = PROBE_WEIGHT_DECAYS) -> Dict[str, object]:
    """The sweep: fit on four fifths of the training split, score each ``weight_decay`` on the held-out fifth.

    Takes only training features and labels, so the choice cannot depend on the
    val split. With one image a class there is nothing to hold out: the result
    then says so (``note``) and uses ``PROBE_FALLBACK_WEIGHT_DECAY``. The best held-out accuracy wins; ties go to the lower held-out
    cross-entropy, then to the stronger regularisation. Standardisation for the
    sweep uses the fit part's statistics only.
    """
    fit, held = holdout_split(labels, seed=seed)
    if held.numel() == 0:  # one image a class: nothing can be held out without losing a class
        return {"weight_decay": PROBE_FALLBACK_WEIGHT_DECAY, "sweep": [], "num_fit": int(fit.numel()), "num_holdout": 0,
                "note": f"no class has two training images: no sweep, weight decay {PROBE_FALLBACK_WEIGHT_DECAY:g} as set"}
    scale = Standardiser(feats[fit])
    fit_x, held_x = scale(feats[fit]), scale(feats[held])
    sweep = []
    for wd in grid:
        acc, ce = _score(fit_logistic_regression(fit_x, labels[fit], num_classes, wd), held_x, labels[held])
        sweep.append({"weight_decay": wd, "holdout_top1": acc, "holdout_loss": ce})
    best = max(sweep, key=lambda r: (r["holdout_top1"], -round(r["holdout_loss"], 6), r["weight_decay"]))
    return {"weight_decay": best["weight_decay"], "sweep": sweep, "num_fit": int(fit.numel()), "num_holdout": int(held.numel())}


class ProbeHead(nn.Module):
    """A fitted probe as one module: fixed standardisation (buffers, not trained), then the Linear layer.

    Fine-tuning from it (linear probing, then fine-tuning: Kumar et al. 2022)
    starts from the probe's accuracy, and its learning rate acts on
    standardised features whatever the backbone's feature scale.
    """

    def __init__(self, scale: Standardiser, classifier: nn.Linear):
        super().__init__()
        self.register_buffer("mean", scale.mean.float())
        self.register_buffer("scale", scale.scale.float())
        self.linear = classifier.requires_grad_(True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.scale)


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0) -> Tuple[ProbeHead, Dict[str, object]]:
    """Choose the L2 strength on held-out training images, refit on all of them: the head and the choice."""
    feats, labels = feats.cpu(), labels.long().cpu()
    choice = choose_weight_decay(feats, labels, num_classes, seed=seed)
    scale = Standardiser(feats)
    classifier = fit_logistic_regression(scale(feats), labels, num_classes, choice["weight_decay"])
    return ProbeHead(scale, classifier), choice


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
                 num_classes: int, seed: int = 0) -> Dict[str, object]:
    """The default linear probe: standardised features, L2 strength chosen on held-out training images, L-BFGS.

    1. ``weight_decay`` is chosen by :func:`choose_weight_decay` on the training
       split alone; 2. the classifier is refit on the whole training split,
       standardised by its statistics, with that value; 3. it is scored once on
       val. The result names the chosen value and the sweep behind it.
    """
    if num_classes < 2:
        raise ValueError(f"a linear probe needs at least 2 classes, got {num_classes}")
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"need 2-D features of one width, got train {tuple(train_feats.shape)} and val {tuple(val_feats.shape)}")
    train_labels, val_labels = train_labels.long().cpu(), val_labels.long().cpu()
    train_feats, val_feats = train_feats.cpu(), val_feats.cpu()
    head, choice = fit_probe(train_feats, train_labels, num_classes, seed=seed)
    with torch.no_grad():
        scores = head(val_feats.float())
        train_top1 = 100.0 * (head(train_feats.float()).argmax(dim=1) == train_labels).double().mean().item()
    return {
        **topk_accuracy(scores, val_labels),
        "protocol": "standardised",
        "weight_decay": choice["weight_decay"],
        "selection": {"scored_on": f"held-out {PROBE_HOLDOUT_FRACTION:.0%} of the training split", **choice},
        "train_top1": train_top1,
        "feature_dim": int(train_feats.shape[1]),
        "num_val": int(val_feats.shape[0]),
        "seed": seed,
        "val_correct": (scores.argmax(dim=1) == val_labels).int().tolist(),
    }


# --------------------------------------------------------------------------- reporting


def describe_features(info: Mapping[str, object]) -> str:
    """Which features a number used, as METHOD.md asks for Retro ("student backbone (1280-d)")."""
    dim = info.get("dim", "?")
    if info.get("features") == "adapter":
        return f"Retro adapter output ({dim}-d)"
    return f"{info.get('source', 'encoder')} backbone ({dim}-d)"


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``cuda`` when available unless told otherwise; a clear error when CUDA is asked for but absent."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
    return device


def check_output_path(path: Union[str, Path]) -> None:
    """Refuse an ``--out`` that is a folder before hours of work, not after."""
    if Path(path).is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name such as {Path(path) / 'results.json'}")


def write_results(path: Union[str, Path], payload: Mapping[str, object]) -> Path:
    """Write ``payload`` as JSON (parents created); non-finite numbers are refused, not written as NaN."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    return path
