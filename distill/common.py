"""What reading a config and running a network both need, defined once, without importing torch.

The config reader (:mod:`distill.config`) checks values against these names
before any network is built, and must answer in milliseconds, so it cannot
import torch; the modules that build and run networks import the same names
from here. Nothing in this module imports more than the standard library.
"""

import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Optional, Tuple

#: The ``"format"`` entry of every checkpoint the distillation engine writes
#: (read back by the teacher, student and converter loaders).
DISTILL_FORMAT = "retro-transfer/distill"

#: Files the training-image lister and the data-folder checks count as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: ImageNet statistics, as torchvision's and MoCo's transforms normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Retro's adapter kinds (:func:`retro_transfer.models.adapters.build_adapter`).
ADAPTER_KINDS = ("auto", "inverted_residual", "bottleneck")

#: The teacher backbones the loader builds: torchvision ResNets, and wider ones.
#: ``resnet50w2`` is a ResNet-50 with every width doubled: stem, bottleneck and
#: output channels (4096 features). SwAV releases it under this name (its
#: src/resnet50.py after the "fix bug with wider models" commit) and SimCLR's
#: ResNet-50 (2x) is the same network; torchvision's wide_resnet50_2 is not (it
#: widens only the inner 3x3 convolutions).
TEACHER_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet50w2", "resnet50w4", "resnet50w5", "resnet101w2", "resnet152w2",
)  # fmt: skip

#: Where an unlabeled training set comes from, for errors about ``data.train_dir``.
TRAIN_DATA_HINT = (
    "generate the shapes data with `python tools/make_shapes.py --out data/shapes` and use "
    "data/shapes/unlabeled, or point it at an ImageNet train/ folder"
)
#: Where a labelled evaluation set comes from, for errors about an ImageFolder root.
EVAL_DATA_HINT = (
    "expected an ImageFolder root with train/<class>/*.jpg and val/<class>/*.jpg, as ImageNet is laid out; "
    "`python tools/make_shapes.py --out DIR` writes one at DIR/classification"
)


def _teacher_families() -> Tuple[str, ...]:
    """The modules of :mod:`retro_transfer.teacher_families` (one a family), listed without importing them."""
    spec = importlib.util.find_spec("retro_transfer.teacher_families")
    locations = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return tuple(sorted(info.name for info in pkgutil.iter_modules(locations) if not info.name.startswith("_")))


#: The released checkpoint layouts the teacher loader knows, one module each.
TEACHER_FAMILIES = _teacher_families()


def has_image(folder, extensions: Tuple[str, ...] = IMAGE_EXTENSIONS, depth: Optional[int] = None) -> bool:
    """Whether ``folder`` or a subfolder (down to ``depth`` levels; ``None``: any) holds an image file.

    Stops at the first one, and looks at a folder's files before its
    subfolders, so that an ImageNet ``train/`` (1000 class folders) is answered
    after listing one class. Hidden entries are skipped; symlinked folders are
    followed. An unreadable ``folder`` raises ``OSError``.
    """
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name.lower().endswith(extensions) and entry.is_file():
                return True
            if (depth is None or depth > 0) and entry.is_dir():
                subfolders.append(entry.path)
    below = None if depth is None else depth - 1
    return any(has_image(Path(sub), extensions, below) for sub in subfolders)
