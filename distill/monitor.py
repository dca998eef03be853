"""The online k-NN monitor: is the student learning, while it trains?

Every ``eval.every`` steps the engine asks :class:`KnnMonitor` for the k-NN
top-1 accuracy of the online student's features on a small labelled
ImageFolder (``eval.knn_data``): training images are the memory bank, and
validation images are classified by their nearest neighbours (the InstDisc /
MoCo monitor, ``distill.evaluation.knn_classify``). It answers the question
every self-supervised run raises, "is my loss normal?", with a number that
moves from chance towards the linear probe's.

Cost is bounded: at most ``eval.max_images`` images per split, decoded and
centre-cropped once at start-up (uint8 in memory); each call is two forward
passes over them in eval mode, which the log reports (``knn_seconds``).
The monitor reads labels, but only to score: nothing it computes reaches
the training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torchvision import transforms

from .common import IMAGENET_MEAN, IMAGENET_STD
from .config import ConfigError
from .evaluation import CENTER_CROP_FRACTION, DataError, check_image_folder, knn_classify
from .methods import DistillMethod

BATCH = 256


def _load_split(root: Path, split: str, image_size: int, max_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_images`` centre-cropped images of ``root/split`` (every n-th, so all classes stay) and labels."""
    from torchvision.datasets import ImageFolder

    crop = transforms.Compose(
        [
            transforms.Resize(int(round(image_size / CENTER_CROP_FRACTION))),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )
    folder = ImageFolder(str(root / split), transform=crop)
    step = max(1, -(-len(folder) // max_images))
    indices = range(0, len(folder), step)
    images = torch.stack([folder[i][0] for i in indices])
    labels = torch.tensor([folder.targets[i] for i in indices])
    return images, labels


class KnnMonitor:
    """k-NN top-1 (%) of the online student's pooled features, and Retro's adapter features.

    ``monitor(method)`` returns ``{"knn_top1": ..., ["knn_top1_adapter": ...,] "knn_seconds": ...}``
    and keeps it as ``monitor.last`` for the progress bar.
    """

    def __init__(self, root, image_size: int, k: int, max_images: int, device: torch.device) -> None:
        root = Path(root)
        try:
            self.classes = check_image_folder(root)
        except DataError as err:  # a one-line refusal from the tool, as for every other config value
            raise ConfigError(f"eval.knn_data: {err}") from err
        self.train = _load_split(root, "train", image_size, max_images)
        self.val = _load_split(root, "val", image_size, max_images)
        self.k, self.device = k, device
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.last: Dict[str, float] = {}
        print(
            f"k-NN monitor: {len(self.train[1])} train and {len(self.val[1])} val images of {len(self.classes)} classes "
            f"from {root}, k={k}",
            flush=True,
        )

    def _features(self, method: DistillMethod, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        parts: Dict[str, List[torch.Tensor]] = {}
        for start in range(0, len(images), BATCH):
            batch = (images[start : start + BATCH].float() / 255 - self.mean) / self.std
            for name, feats in method.monitored_features(batch.to(self.device)).items():
                parts.setdefault(name, []).append(feats.float().cpu())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def __call__(self, method: DistillMethod) -> Dict[str, float]:
        start = time.perf_counter()
        was_training = method.training
        method.eval()
        try:
            with torch.inference_mode():
                train, val = self._features(method, self.train[0]), self._features(method, self.val[0])
        finally:
            method.train(was_training)
        result = {}
        for name in train:
            scores = knn_classify(train[name], self.train[1], val[name], len(self.classes), k=self.k)
            top1 = (scores.argmax(dim=1) == self.val[1]).float().mean().item() * 100
            result["knn_top1" if name == "backbone" else f"knn_top1_{name}"] = top1
        result["knn_seconds"] = time.perf_counter() - start
        self.last = result
        return result
