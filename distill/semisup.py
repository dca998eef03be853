"""Semi-supervised evaluation: fine-tune the whole network on a small labelled fraction of the training split.

SEED and DisCo report it next to the linear probe (METHOD.md, "Evaluation
protocols": fine-tune on 1 % / 10 % of the ImageNet labels). The recipe here is
the one SwAV released for those splits (``eval_semisup.py``), which trains
every weight, unlike the frozen linear probe:

* **Labelled subset**: per class, ``round(fraction x n_c)`` training images (at
  least one), drawn with a seed, or a list file as the ImageNet 1 %/10 % splits
  are distributed (SimCLR's ``1percent.txt``: one file name per line). The
  subset is written out next to the results, so a run can be repeated exactly.
* **Model**: the pretrained backbone, global average pooling, and a new
  ``nn.Linear`` (MoCo's N(0, 0.01) initialisation); BatchNorm in train mode.
* **Optimiser**: SGD, momentum 0.9, weight decay 0, batch 256, 20 epochs, two
  learning rates: backbone 0.01 and classifier 0.2 at 10 % labels, 0.02 and 5
  at 1 % labels; x 0.2 at 60 % and 80 % of the epochs (SwAV: 12 and 16 of 20),
  or a cosine decay.
* **Data**: random-resized crops and flips for training, the centre crop for
  evaluation; top-1/top-5 of the *final* model on the validation split (SwAV
  logs the best epoch on it, which selects on the evaluation data).

:func:`finetune_semisup` is the one call from a checkpoint to numbers, for
``tools/semisup_eval.py`` and the pipeline alike; :func:`fine_tune` is the
training loop on any encoder.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from distill.checkpoint import load_encoder
from retro_transfer.utils.progress import progress_bar

from .evaluation import (
    DataError,
    NonFiniteFeaturesError,
    check_finite_features,
    check_image_folder,
    default_milestones,
    eval_transform,
    extract_features,
    fit_probe,
    image_folder,
    make_classifier,
    make_loader,
    resolve_device,
    topk_accuracy,
    train_transform,
)

PathLike = Union[str, Path]

# SwAV's eval_semisup.py, the released recipe for the ImageNet 1 % / 10 % splits.
SEMISUP_EPOCHS = 20
SEMISUP_BATCH_SIZE = 256
SEMISUP_MOMENTUM = 0.9
SEMISUP_WEIGHT_DECAY = 0.0
SEMISUP_GAMMA = 0.2
SEMISUP_LABEL_FRACTION = 0.1
#: (backbone, classifier) learning rates for 1 % and for 10 % of the labels.
LRS_1_PERCENT = (0.02, 5.0)
LRS_10_PERCENT = (0.01, 0.2)
#: Below this labelled fraction the 1 % rates apply (3 % is about halfway between 1 % and 10 % on a log scale).
LOW_LABEL_FRACTION = 0.03
SCHEDULES = ("step", "cosine")
#: How the classifier starts: "random" (SwAV: N(0, 0.01)) or "probe" (the standardised linear probe
#: fitted on the labelled images: linear probing, then fine-tuning).
HEAD_INITS = ("random", "probe")
#: BatchNorm while fine-tuning: "train" (SwAV: batch statistics) or "frozen" (running statistics kept,
#: affine weights still train), for batches too small for good statistics.
BN_MODES = ("train", "frozen")
#: "sgd" (SwAV, with ``momentum``) or "adamw": Adam's steps do not grow with the gradient's size, which
#: a probe head's standardisation multiplies by one over the features' spread (10^5 for EfficientNet-B0).
OPTIMIZERS = ("sgd", "adamw")

LIST_HINT = (
    "a label list has one training image per line, as a path relative to train/ (<class>/<file>) or a bare file "
    "name as in SimCLR's 1percent.txt; blank lines and lines starting with # are skipped"
)


# --------------------------------------------------------------------------- the labelled subset


def default_learning_rates(fraction: float) -> Tuple[float, float]:
    """SwAV's (backbone, classifier) learning rates for the label setting ``fraction`` is closer to."""
    return LRS_1_PERCENT if fraction < LOW_LABEL_FRACTION else LRS_10_PERCENT


def check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"the labelled fraction must lie in (0, 1], e.g. 0.01 or 0.1; got {fraction!r}")


def relative_paths(dataset: ImageFolder) -> List[str]:
    """The training images as ``<class>/<file>`` paths: how label lists name them."""
    root = Path(dataset.root)
    return [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples]


def draw_labelled(
    paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], fraction: float, seed: int
) -> List[int]:
    """Indices of a labelled subset: ``round(fraction x n_c)`` images of each class (at least one).

    Each class draws from its own generator, seeded by ``seed`` and the class
    name, over its images in sorted order: the subset of one class does not
    change when another class gains or loses images, and the file order on
    disk does not matter.
    """
    check_fraction(fraction)
    by_class: Dict[int, List[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    chosen: List[int] = []
    for label, indices in sorted(by_class.items()):
        indices = sorted(indices, key=lambda i: paths[i])
        count = max(1, math.floor(fraction * len(indices) + 0.5))
        chosen += random.Random(f"{seed}/{classes[label]}").sample(indices, count)
    return sorted(chosen)


def read_label_list(path: PathLike, paths: Sequence[str]) -> List[int]:
    """Indices into ``paths`` of the images a label list names; any entry that is not one is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label list {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"label list {path} is not a UTF-8 text file; {LIST_HINT}") from None
    index_of = {p: i for i, p in enumerate(paths)}
    by_name: Dict[str, List[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        by_name[p.rsplit("/", 1)[-1]].append(i)
    chosen: Dict[int, int] = {}  # index -> line number
    unknown: List[str] = []
    # A link may point at any file the user can read (a key, a password file): name it, never quote it.
    quote = not path.is_symlink()
    for number, raw in enumerate(lines, 1):
        entry = raw.strip().replace("\\", "/")
        if not entry or entry.startswith("#"):
            continue
        matches = [index_of[entry]] if entry in index_of else by_name.get(entry, []) if "/" not in entry else []
        if len(matches) > 1:
            raise DataError(f"{path}, line {number}: {entry!r} names {len(matches)} images in different class folders; "
                            f"write it as <class>/{entry}")
        if not matches:
            unknown.append(f"line {number}: {entry!r}" if quote else f"line {number}")
        elif matches[0] in chosen:
            raise DataError(f"{path}, line {number}: {entry!r} repeats line {chosen[matches[0]]}")
        else:
            chosen[matches[0]] = number
    if unknown:
        named = path if quote else f"{path} (a link to {path.resolve()})"
        raise DataError(f"{len(unknown)} entries of {named} are not images of the training split "
                        f"({'; '.join(unknown[:3])}{'; ...' if len(unknown) > 3 else ''}); {LIST_HINT}")
    if not chosen:
        raise DataError(f"label list {path} names no images; {LIST_HINT}")
    return sorted(chosen)


def write_label_list(path: PathLike, paths: Sequence[str], indices: Sequence[int], header: str) -> Path:
    """Write the subset as a list :func:`read_label_list` reads back (one ``<class>/<file>`` a line)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the label list a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + "".join(f"{paths[i]}\n" for i in indices), encoding="utf-8")
    return path


def select_labelled(
    train: ImageFolder, label_fraction: Optional[float], label_list: Optional[PathLike], seed: int
) -> Tuple[List[int], str]:
    """The labelled indices, from a list file or drawn, and a sentence saying which."""
    paths = relative_paths(train)
    if label_list is not None:
        return read_label_list(label_list, paths), f"listed in {label_list}"
    fraction = SEMISUP_LABEL_FRACTION if label_fraction is None else label_fraction
    indices = draw_labelled(paths, train.targets, train.classes, fraction, seed)
    return indices, f"drawn per class: fraction {fraction:g}, seed {seed}"


# --------------------------------------------------------------------------- fine-tuning


def _check_finetune_args(num_classes, epochs, lr_backbone, lr_classifier, momentum, weight_decay, schedule) -> None:
    if num_classes < 2:
        raise ValueError(f"fine-tuning a classifier needs at least 2 classes, got {num_classes}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    for name, lr in (("backbone", lr_backbone), ("classifier", lr_classifier)):
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"the {name} learning rate must be a finite number >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _set_train_mode(model: nn.Module, bn: str) -> None:
    """Train mode, except BatchNorm layers when ``bn == "frozen"`` (they keep normalising with running statistics)."""
    model.train()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _optimizer(name: str, groups, momentum: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def _make_head(encoder: nn.Module, feature_dim: int, num_classes: int, head_init: str, probe_loader, device, seed: int):
    """The classifier: MoCo's random Linear, or the standardised probe fitted on the labelled images' features."""
    if head_init == "random":
        return make_classifier(feature_dim, num_classes), None
    feats, labels = extract_features(encoder.to(device), probe_loader, device, desc="features (labelled)")
    head, choice = fit_probe(feats, labels, num_classes, seed=seed)
    return head, {"weight_decay": choice["weight_decay"], "num_holdout": choice["num_holdout"]}


def _scheduler(optimizer, schedule: str, epochs: int, milestones: Sequence[int]):
    """Per-epoch schedule: x SEMISUP_GAMMA at each milestone (SwAV), or cosine decay to zero."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=SEMISUP_GAMMA)


def _train_epoch(model: nn.Module, optimizer, loader: DataLoader, device: torch.device, epoch: int, bn: str = "train") -> float:
    """One SGD pass over the labelled images; the mean loss, stopping on a non-finite one."""
    _set_train_mode(model, bn)
    total, count = 0.0, 0
    for images, labels in progress_bar(loader, desc=f"fine-tune epoch {epoch + 1}", total=len(loader)):
        labels = torch.as_tensor(labels).long().to(device, non_blocking=True)
        loss = F.cross_entropy(model(images.to(device, non_blocking=True)), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"fine-tuning diverged (loss {loss.item()} in epoch {epoch + 1}); lower the learning rates"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * labels.shape[0]
        count += labels.shape[0]
    return total / max(count, 1)


def _predict(model: nn.Module, loader: DataLoader, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    scores, labels = [], []
    with torch.inference_mode():
        for images, targets in progress_bar(loader, desc="evaluate (val)", total=len(loader)):
            scores.append(model(images.to(device, non_blocking=True)).float().cpu())
            check_finite_features(scores[-1], "the fine-tuned network's class scores")
            labels.append(torch.as_tensor(targets).long())
    if not scores:
        raise ValueError("the validation loader yielded no images")
    return torch.cat(scores), torch.cat(labels)


def fine_tune(
    encoder: nn.Module,
    feature_dim: int,
    num_classes: int,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int = SEMISUP_EPOCHS,
    lr_backbone: float = LRS_10_PERCENT[0],
    lr_classifier: float = LRS_10_PERCENT[1],
    momentum: float = SEMISUP_MOMENTUM,
    weight_decay: float = SEMISUP_WEIGHT_DECAY,
    schedule: str = "step",
    milestones: Optional[Sequence[int]] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    head_init: str = "random",
    bn: str = "train",
    probe_loader: Optional[DataLoader] = None,
    optimizer_name: str = "sgd",
) -> Dict[str, object]:
    """Train ``encoder`` (images -> (B, feature_dim)) and a new classifier; top-1/top-5 (%) on ``val_loader``.

    Every weight trains, with one learning rate for the encoder and another
    for the classifier (SGD parameter groups). ``bn="train"`` (SwAV) uses batch
    statistics while training; ``"frozen"`` keeps the running statistics (a
    batch of 16 small images estimates them badly). ``head_init="probe"``
    starts the classifier from the standardised linear probe fitted on
    ``probe_loader``'s features (the labelled images, centre-cropped; default
    ``train_loader``), so fine-tuning starts where the probe ends and its
    classifier learning rate does not depend on the backbone's feature scale.
    ``optimizer_name="adamw"`` replaces SGD (``momentum`` then unused): the
    standardisation divides the gradient reaching the backbone by the
    features' spread, and Adam's step size does not follow the gradient's.
    ``encoder`` is modified in place and left in eval mode. Deterministic given
    ``seed`` (the global RNG is forked and re-seeded for the duration); seed the
    loaders too (:func:`make_loader`).
    """
    _check_finetune_args(num_classes, epochs, lr_backbone, lr_classifier, momentum, weight_decay, schedule)
    _check_finite_weights(encoder)
    _check_choice("head initialisation", head_init, HEAD_INITS)
    _check_choice("BatchNorm mode", bn, BN_MODES)
    _check_choice("optimizer", optimizer_name, OPTIMIZERS)
    device = torch.device(device)
    if schedule == "cosine":
        milestones = []
    milestones = default_milestones(epochs) if milestones is None else list(milestones)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        classifier, probe = _make_head(encoder, feature_dim, num_classes, head_init, probe_loader or train_loader, device, seed)
        model = nn.Sequential(encoder, classifier).to(device).requires_grad_(True)
        if probe is not None:  # where fine-tuning starts: the probe on the labelled images alone (read, not selected on)
            probe["start_top1"] = topk_accuracy(*_predict(model, val_loader, device), ks=(1,))["top1"]
        groups = [
            {"params": encoder.parameters(), "lr": lr_backbone},
            {"params": classifier.parameters(), "lr": lr_classifier},
        ]
        optimizer = _optimizer(optimizer_name, groups, momentum, weight_decay)
        scheduler = _scheduler(optimizer, schedule, epochs, milestones)
        loss = float("nan")
        for epoch in range(epochs):
            loss = _train_epoch(model, optimizer, train_loader, device, epoch, bn)
            scheduler.step()
        scores, labels = _predict(model, val_loader, device)
    return {
        **topk_accuracy(scores, labels),
        "epochs": epochs,
        "lr_backbone": lr_backbone,
        "lr_classifier": lr_classifier,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "milestones": milestones,
        "gamma": SEMISUP_GAMMA if schedule == "step" else None,
        "seed": seed,
        "optimizer": optimizer_name,
        "head_init": head_init,
        "head_probe": probe,
        "bn": bn,
        "final_train_loss": loss,
        "num_val": int(labels.shape[0]),
        # Per validation image, in loader order: 1 if the top-1 class was right (for intervals).
        "val_correct": (scores.argmax(dim=1) == labels).int().tolist(),
    }


def _check_finite_weights(encoder: nn.Module) -> None:
    """Refuse a backbone with NaN or infinite weights: its features are NaN, and the first loss would blame the lr."""
    state = encoder.state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteFeaturesError(
            f"the backbone's weights are not finite ({len(bad)} of {len(state)} tensors, e.g. {bad[0]}), so its "
            "features are too; fine-tune another checkpoint"
        )


def _describe_subset(train: ImageFolder, indices: Sequence[int], how: str, requested: Optional[float]) -> Dict:
    """What the results report about the labelled subset (its file is added once written)."""
    per_class = Counter(train.classes[train.targets[i]] for i in indices)
    return {
        "count": len(indices),
        "num_train": len(train),
        "fraction": len(indices) / len(train),
        "requested_fraction": requested,
        "source": how,
        "per_class": {name: per_class.get(name, 0) for name in train.classes},
        "list_file": None,
    }


def finetune_semisup(
    checkpoint: PathLike,
    data_root: PathLike,
    label_fraction: Optional[float] = None,
    *,
    label_list: Optional[PathLike] = None,
    labels_out: Optional[PathLike] = None,
    epochs: int = SEMISUP_EPOCHS,
    lr_backbone: Optional[float] = None,
    lr_classifier: Optional[float] = None,
    momentum: float = SEMISUP_MOMENTUM,
    weight_decay: float = SEMISUP_WEIGHT_DECAY,
    schedule: str = "step",
    batch_size: int = SEMISUP_BATCH_SIZE,
    image_size: int = 224,
    workers: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    head_init: str = "random",
    bn: str = "train",
    optimizer_name: str = "sgd",
    say: Optional[Callable[[str], None]] = None,
) -> Dict[str, object]:
    """Semi-supervised numbers for a checkpoint's backbone on an ImageFolder ``data_root`` (train/ and val/).

    The labelled subset is ``label_list`` (a file, see :func:`read_label_list`)
    or ``label_fraction`` of each class drawn with ``seed`` (10 % when neither
    is given; giving both is an error). It is written to ``labels_out``, when
    given, before training starts. Learning rates left as None take SwAV's
    values for the label setting closer to ``label_fraction`` (for a list: to
    the share of train/ it names; :func:`default_learning_rates`). ``say``
    receives progress sentences. ``head_init``, ``bn``, ``optimizer_name``: see :func:`fine_tune`
    (the defaults are SwAV's recipe).

    Returns the metrics (``top1``, ``top5``, in %) with the recipe used, the
    labelled subset (``labelled``) and what was loaded (``info``). Raises
    ``DataError`` for unusable data or label lists, ``CheckpointError`` for
    checkpoints, ``FloatingPointError`` if training diverges, ``ValueError``
    for bad arguments.
    """
    if label_list is not None and label_fraction is not None:
        raise ValueError("give a label fraction or a label list, not both")
    if label_fraction is not None:
        check_fraction(label_fraction)
    classes = check_image_folder(data_root)
    device = resolve_device(device)
    train = image_folder(data_root, "train", train_transform(image_size))
    indices, how = select_labelled(train, label_fraction, label_list, seed)
    requested = None if label_list is not None else (label_fraction or SEMISUP_LABEL_FRACTION)
    labelled = _describe_subset(train, indices, how, requested)
    default_lrs = default_learning_rates(labelled["fraction"] if requested is None else requested)
    lr_backbone = default_lrs[0] if lr_backbone is None else lr_backbone
    lr_classifier = default_lrs[1] if lr_classifier is None else lr_classifier
    _check_finetune_args(len(classes), epochs, lr_backbone, lr_classifier, momentum, weight_decay, schedule)
    _check_choice("head initialisation", head_init, HEAD_INITS)
    _check_choice("BatchNorm mode", bn, BN_MODES)
    _check_choice("optimizer", optimizer_name, OPTIMIZERS)
    encoder, info = load_encoder(checkpoint, "backbone")
    if labels_out is not None:
        header = f"{len(indices)} labelled images of {Path(data_root) / 'train'}, {how}; relative to train/"
        labelled["list_file"] = str(write_label_list(labels_out, relative_paths(train), indices, header))
    if say:
        written = f"; list written to {labelled['list_file']}" if labelled["list_file"] else ""
        share = 100 * labelled["fraction"]
        say(f"labelled subset: {len(indices)} of {len(train)} training images ({share:.2f} %), {how}{written}")
        say(f"fine-tuning the {info['source']} {info.get('arch', '?')} ({info['dim']}-d features) from {checkpoint}")
    pin = device.type == "cuda"
    train_loader = make_loader(Subset(train, indices), batch_size, shuffle=True, workers=workers, seed=seed,
                               pin_memory=pin, drop_last=len(indices) > batch_size)
    val = image_folder(data_root, "val", eval_transform(image_size))
    val_loader = make_loader(val, batch_size, shuffle=False, workers=workers, seed=seed, pin_memory=pin)
    centre = Subset(image_folder(data_root, "train", eval_transform(image_size)), indices)
    probe_loader = make_loader(centre, batch_size, shuffle=False, workers=workers, seed=seed, pin_memory=pin)
    result = fine_tune(
        encoder, info["dim"], len(classes), train_loader, val_loader, epochs=epochs, lr_backbone=lr_backbone,
        lr_classifier=lr_classifier, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        device=device, seed=seed, head_init=head_init, bn=bn, probe_loader=probe_loader, optimizer_name=optimizer_name,
    )
    return {**result, "batch_size": batch_size, "image_size": image_size, "labelled": labelled, "info": dict(info)}
