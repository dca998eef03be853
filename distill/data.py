"""Unlabeled images, MoCo v2 augmentation, and a sampler that can resume mid-epoch exactly.

Images are uint8 (3, H, W) tensors and are augmented as tensors
(``torchvision.transforms.v2``). A set small enough (``data.in_memory_mb``) is
decoded once and kept in memory, so a step on small images pays for neither
file reads nor JPEG decoding; larger sets (ImageNet) are read and decoded per
sample, as usual. Both give the same pixels.
"""

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from retro_transfer.utils.progress import progress_bar

from .common import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD
from .config import ConfigError

MIB = 2**20
# Images whose headers are read to estimate the decoded size of a whole set.
SIZE_SAMPLE = 64


def list_images(root) -> List[Path]:
    """Images directly in ``root`` (a flat folder) or one level down (ImageNet's ``train/<wnid>/``).

    Every entry named like an image is listed, a FIFO or a broken link too:
    :func:`unreadable_images` names those without opening them (opening a FIFO
    blocks), so that they are refused or skipped like any other bad file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    for sub in root.iterdir():
        if sub.is_dir():
            files.extend(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its sub-folders")
    return sorted(files)


def read_rgb(path: Path) -> torch.Tensor:
    """The image at ``path`` as a uint8 (3, H, W) RGB tensor; an undecodable file is named in the error."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))  # a writable copy
    except Exception as err:  # a file changed since the check (unreadable_images) ran
        raise OSError(f"cannot decode image {path} ({type(err).__name__}: {err})") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def folder_labels(root, files: Sequence[Path]) -> Tuple[List[int], List[str]]:
    """Each file's class index from its class folder (ImageFolder's rule: sorted folder names), and the class names.

    Refused in one line unless every file sits in a class folder one level
    below ``root`` and there are at least two classes.
    """
    root = Path(root)
    loose = [path for path in files if path.parent == root]
    if loose:
        raise ConfigError(
            f"data.train_dir {root} must hold the images in class folders (train/<class>/*.jpg) for a recipe that "
            f"trains on labels, but {len(loose)} image(s) lie directly in it, e.g. {loose[0].name}; "
            "use a labelled split such as the shapes data's classification/train"
        )
    classes = sorted({path.parent.name for path in files})
    if len(classes) < 2:
        raise ConfigError(f"data.train_dir {root} has {len(classes)} class folder(s); training on labels needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    return [index[path.parent.name] for path in files], classes


#: The bytes a complete file of a format ends with: JPEG's end-of-image marker, PNG's IEND chunk.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def image_error(path: Path) -> str:
    """Why ``path`` is not a whole, decodable image ("" when it is).

    The header is parsed and the file's last bytes compared with its format's
    end marker: a file cut short (a copy stopped half way) fails here, at the
    check, rather than with "image file is truncated" at the first batch that
    decodes it. Only a file whose end does not look complete (or of a format
    without a marker) is decoded in full, so a clean ImageNet costs a header and
    a few bytes per file. Anything but a regular file (a FIFO named ``x.jpg``)
    is refused without being opened: reading a FIFO waits for a writer forever.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file (a FIFO, socket or device named like an image)"
        with Image.open(path) as image:
            if not _ends_with_marker(path, image.format):
                image.load()  # raises OSError "image file is truncated" on a file cut short
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        return f"{type(err).__name__}: {err}"
    return ""


def _ends_with_marker(path: Path, image_format: Optional[str]) -> bool:
    marker = END_MARKERS.get(image_format or "")
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - len(marker)))
        return f.read() == marker


def unreadable_images(files: Sequence[Path], threads: int = 16) -> List[Tuple[Path, str]]:
    """The files that are not whole images (:func:`image_error`), with the reason, in the order of ``files``.

    Run when the data list is built, so that a corrupt file stops a run in
    seconds rather than at the first batch that meets it, hours in. A check
    reads a few kilobytes; threads overlap the reads on network disks.
    """
    with ThreadPoolExecutor(threads) as pool:
        errors = list(pool.map(image_error, files))
    return [(path, error) for path, error in zip(files, errors) if error]


def check_batch_fits(num_samples: int, global_batch: int, world_size: int) -> None:
    """A step takes one whole global batch of distinct images, split evenly over the processes."""
    if global_batch % world_size:
        raise ConfigError(f"train.batch_size {global_batch} must be divisible by the number of processes {world_size}")
    if num_samples < global_batch:
        raise ConfigError(
            f"the data set has {num_samples} images, fewer than one batch of {global_batch}; "
            "lower train.batch_size or add images"
        )


def decoded_size_mb(files: Sequence[Path]) -> float:
    """Estimated MiB of the whole set decoded to uint8 RGB, from the headers of a sample of it."""
    step = max(1, len(files) // SIZE_SAMPLE)
    sample = list(files[::step])[:SIZE_SAMPLE]
    pixels = []
    for path in sample:
        with Image.open(path) as image:  # reads the header only
            pixels.append(image.width * image.height)
    return len(files) * 3 * sum(pixels) / len(pixels) / MIB


def decode_all(files: Sequence[Path], limit_mb: int) -> Optional[List[torch.Tensor]]:
    """Every image decoded, when the set takes at most ``limit_mb`` MiB; else None (stream from disk)."""
    if limit_mb <= 0 or decoded_size_mb(files) > limit_mb:
        return None
    images, total = [], 0
    for path in progress_bar(files, desc="decoding images", total=len(files)):
        images.append(read_rgb(path))
        total += images[-1].numel()
        if total > limit_mb * MIB:  # the sample underestimated: give the memory back and stream
            return None
    return images


def moco_v2_augmentation(image_size: int, min_scale: float = 0.2) -> v2.Compose:
    """MoCo v2's augmentation (Chen et al., 2020, "Improved baselines", section 3), on uint8 tensors.

    The crop is taken and resized on uint8 (cheap); the colour operations run
    on the small float crop. The blur kernel is ~10% of the image side, as in
    SimCLR, so that small images are blurred in proportion.
    """
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MultiViewImages(Dataset):
    """``views`` augmentations of each image, drawn from a seed fixed by (seed, epoch, index).

    Seeding per sample makes the augmented batch of a step independent of the
    number of processes and data-loader workers, and of whether the run was
    interrupted: a resumed run sees exactly the pixels the uninterrupted one did.
    Keys are ``(index, epoch)`` pairs, as :class:`StepBatchSampler` yields.
    """

    def __init__(
        self,
        files: Sequence[Path],
        transform,
        views: int = 2,
        seed: int = 0,
        decoded: Optional[Sequence[torch.Tensor]] = None,
        labels: Optional[Sequence[int]] = None,
    ) -> None:
        """``decoded``: the images of ``files`` already decoded (:func:`decode_all`), else read per sample.

        ``labels``: a class index per file (teacher recipes that train on
        labels); each sample then ends with its label after the views.
        """
        if decoded is not None and len(decoded) != len(files):
            raise ValueError(f"{len(decoded)} decoded images for {len(files)} files")
        if labels is not None and len(labels) != len(files):
            raise ValueError(f"{len(labels)} labels for {len(files)} files")
        self.files, self.transform, self.views, self.seed = list(files), transform, views, seed
        self.decoded = decoded
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
        index, epoch = key
        image = self.decoded[index] if self.decoded is not None else read_rgb(self.files[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            views = tuple(self.transform(image) for _ in range(self.views))
        return views if self.labels is None else (*views, self.labels[index])


class StepBatchSampler(Sampler):
    """This process's share of each global batch, step by step, from ``start_step``.

    Epoch e is a permutation of the data set drawn from (seed, e); step s of
    an epoch is the s-th slice of ``global_batch`` indices (the incomplete last
    slice is dropped), and process r takes the r-th contiguous part of it, so
    gathering the parts in rank order rebuilds the one-process batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        max_steps: int,
        steps: Optional[Sequence[int]] = None,
    ):
        """``steps``: only these steps, in increasing order (the teacher cache's missing shards); default all from ``start_step``."""
        check_batch_fits(num_samples, global_batch, world_size)
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps: Sequence[int] = range(start_step, max_steps) if steps is None else list(steps)
        self.steps_per_epoch = num_samples // global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        local = self.global_batch // self.world_size
        perm, perm_epoch = None, None
        for step in self.steps:
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(epoch), epoch
            batch = perm[within * self.global_batch : (within + 1) * self.global_batch]
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(int(i), epoch) for i in mine]

    def __len__(self) -> int:
        return len(self.steps)


def step_loader(dataset: MultiViewImages, sampler: StepBatchSampler, num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    """The training loader: one batch per step from ``sampler``, augmented in ``num_workers`` processes."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: the loader draws a worker base seed per iterator, and from
        # the global RNG that would put a resumed run one draw off the uninterrupted one
        # (split BN's permutation, dropout). Samples are seeded per index anyway.
        generator=torch.Generator().manual_seed(seed),
    )
