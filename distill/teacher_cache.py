"""The teacher-embedding cache: what it holds, how a run checks it, and how a run reads it.

A run takes the images of step s from a permutation fixed by (seed, epoch) and
draws each view from a seed fixed by (seed, epoch, image) (:mod:`distill.data`);
the teacher runs in eval mode, so an image's embedding depends on that image
alone. The teacher's embedding of every view a run will see is therefore a
function of the data, the teacher file and a few settings, and can be computed
once (:mod:`distill.cache_builder`, ``tools/cache_teacher.py``) for any number
of students: a distillation with ``teacher.cache=DIR`` reads it instead of
running the teacher's backbone.

A cache folder holds

* ``manifest.json``: ``run``, everything the embeddings depend on
  (:data:`RUN_FIELDS`), compared with the run that reads it; ``storage``, how
  they are stored; ``about``, where they came from (not compared); ``shards``,
  each shard's steps and the SHA-256 of its file as written, checked when a
  run opens the shard (a shard swapped for another, even of the same shape,
  is refused);
* ``shard_000000.pth``, ...: shard k holds steps [k S, (k + 1) S) as
  ``embeddings`` (steps, batch, views, dim): float16, or int8 with a per-row
  ``scale``. Row b of step s is the b-th image of the global batch of step s
  in the order :class:`~distill.data.StepBatchSampler` draws it, and process
  r of W reads rows [r B / W, (r + 1) B / W), the share its loader gets.

The key is the step, so a resumed run, any number of processes, and the key
encoder's batch shuffling (split or shuffled BN, which never touches the
teacher) all read the rows of their own images. The stored embeddings are the
teacher's unit vectors rounded to the storage type; a run renormalises them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision

from retro_transfer.safe_io import CheckpointError, safe_load

from .config import TEACHER_CACHE_MANIFEST, Config, ConfigError
from .data import moco_v2_augmentation

# v2: the manifest records each shard's SHA-256 (v1 caches hold none, so they are rebuilt).
FORMAT = "retro-transfer/teacher-cache v2"
DTYPES = {"float16": torch.float16, "int8": torch.int8}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# What the embeddings depend on, in the order a mismatch is reported (the first one found).
RUN_FIELDS = (
    "format", "teacher_sha256", "num_images", "data_list_sha256", "image_size", "crop_min_scale", "augmentation",
    "torchvision", "seed", "batch_size", "max_steps", "views", "teacher_precision",
)  # fmt: skip
# Fields where the cache may hold more than a run reads: more steps, more views per image.
COVERING = ("max_steps", "views")
ROWS = (
    "row b of step s is image b of the global batch of step s (StepBatchSampler order); "
    "process r of W reads rows [r*B/W, (r+1)*B/W)"
)
INT8_MAX = 127
_HASH_CHUNK = 2**20


# --------------------------------------------------------------------------- what the embeddings depend on


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (the teacher checkpoint: a few seconds for the widest ResNets)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_list_sha256(files: Sequence[Path], root) -> str:
    """SHA-256 of the image list: each path relative to ``root`` and its size, in the run's order.

    The order sets which image each index is; the relative paths let the data
    folder move; the sizes catch a file replaced under the same name. Pixels
    are not read (1.28 M ImageNet files would take an hour).
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\t{Path(path).stat().st_size}\n".encode())
    return digest.hexdigest()


def run_fields(cfg: Config, files: Sequence[Path], autocast_dtype: Optional[torch.dtype], views: int) -> Dict[str, Any]:
    """The :data:`RUN_FIELDS` of the run ``cfg`` describes over ``files``, with ``views`` views per image.

    The augmentation is fingerprinted by the text of the transform (its
    parameters) and the torchvision version (its random draws); the teacher's
    precision is the autocast it runs under (bf16 embeddings differ from fp32
    ones by more than the float16 rounding of the cache).
    """
    augmentation = repr(moco_v2_augmentation(cfg.data.image_size, cfg.data.crop_min_scale))
    return {
        "format": FORMAT,
        "teacher_sha256": file_sha256(cfg.teacher.checkpoint),
        "num_images": len(files),
        "data_list_sha256": data_list_sha256(files, cfg.data.train_dir),
        "image_size": cfg.data.image_size,
        "crop_min_scale": cfg.data.crop_min_scale,
        "augmentation": hashlib.sha256(augmentation.encode()).hexdigest()[:16],
        "torchvision": torchvision.__version__,
        "seed": cfg.seed,
        "batch_size": cfg.train.batch_size,
        "max_steps": cfg.train.max_steps,
        "views": views,
        "teacher_precision": PRECISION_NAMES[autocast_dtype],
    }


def first_difference(cache: Mapping[str, Any], run: Mapping[str, Any]) -> Optional[str]:
    """The first field, in :data:`RUN_FIELDS` order, where the cache cannot serve the run; None if it can."""
    for name in RUN_FIELDS:
        held, needed = cache.get(name), run[name]
        if name in COVERING and isinstance(held, int) and held >= needed:
            continue
        if name in COVERING:
            return f"{name}: the cache holds {held} and this run needs {needed}"
        if held != needed:
            return f"{name} differs (cache: {held!r}, this run: {needed!r})"
    return None


# --------------------------------------------------------------------------- storage


def default_steps_per_shard(batch_size: int, views: int, dim: int, dtype: str, target_bytes: int = 64 * 2**20) -> int:
    """Steps per shard so that a shard is about ``target_bytes`` (64 MiB: 500 ImageNet steps of batch 256 in float16)."""
    row_bytes = dim * torch.empty(0, dtype=DTYPES[dtype]).element_size() + (4 if dtype == "int8" else 0)
    return max(1, target_bytes // (batch_size * views * row_bytes))


def num_shards(max_steps: int, steps_per_shard: int) -> int:
    return -(-max_steps // steps_per_shard)


def shard_steps(shard: int, steps_per_shard: int, max_steps: int) -> range:
    """The steps shard ``shard`` holds."""
    return range(shard * steps_per_shard, min((shard + 1) * steps_per_shard, max_steps))


def shard_name(shard: int) -> str:
    return f"shard_{shard:06d}.pth"


def shard_record(path: Path, steps: range) -> Dict[str, Any]:
    """What the manifest keeps of a written shard: its steps [start, stop) and the SHA-256 of its bytes."""
    return {"steps": [steps.start, steps.stop], "sha256": file_sha256(path)}


def rebuild_hint(folder: Path) -> str:
    return (
        f"`python tools/cache_teacher.py --config CONFIG [the same key=value ...] --out {folder}` "
        "(it rewrites only the missing shards)"
    )


def encode(t: torch.Tensor, dtype: str) -> Dict[str, torch.Tensor]:
    """Unit vectors (..., dim) in float32 -> what a shard stores: float16, or int8 with a float32 scale per row."""
    if dtype == "float16":
        return {"embeddings": t.to(torch.float16)}
    scale = t.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    quantised = torch.round(t / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"embeddings": quantised, "scale": scale}


def decode(embeddings: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stored rows -> float32 unit vectors, renormalised after the rounding (as the teacher's path normalises)."""
    t = embeddings.float()
    if scale is not None:
        t = t * scale.unsqueeze(-1)
    return F.normalize(t, dim=-1)


def read_manifest(folder: Path) -> Dict[str, Any]:
    path = Path(folder) / TEACHER_CACHE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} does not read as JSON ({err}); rebuild the cache with tools/cache_teacher.py") from err
    parts_found = isinstance(manifest, dict) and all(isinstance(manifest.get(part), dict) for part in ("run", "storage"))
    if not parts_found or manifest["storage"].get("dtype") not in DTYPES or not all(
        isinstance(manifest["storage"].get(key), int) for key in ("steps_per_shard", "dim")
    ):
        raise ConfigError(f"{path} is not a teacher-cache manifest of this version; rebuild the cache with tools/cache_teacher.py")
    return manifest


# --------------------------------------------------------------------------- reading, in a run


class TeacherCache:
    """The cache a run reads: ``embeddings(step, rank, world, device)`` are that process's teacher embeddings of the step."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any], views: int) -> None:
        """``views``: how many of the stored views per image the run reads (SEED: the first)."""
        run, storage = manifest["run"], manifest["storage"]
        self.folder, self.views = Path(folder), views
        self.batch_size, self.stored_views, self.max_steps = run["batch_size"], run["views"], run["max_steps"]
        self.steps_per_shard, self.dim, self.dtype = storage["steps_per_shard"], storage["dim"], storage["dtype"]
        self.records: Mapping[str, Any] = manifest.get("shards") or {}
        self._shard_index: Optional[int] = None
        self._shard: Dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, cfg: Config, files: Sequence[Path], autocast_dtype: Optional[torch.dtype], views: int) -> "TeacherCache":
        """The cache ``cfg.teacher.cache`` if it serves this run; else a ConfigError naming the first field that differs."""
        folder = Path(cfg.teacher.cache)
        manifest = read_manifest(folder)
        difference = first_difference(manifest["run"], run_fields(cfg, files, autocast_dtype, views))
        if difference:
            raise ConfigError(
                f"teacher.cache={folder} was built for another run: {difference}; build a cache for this run with "
                "`python tools/cache_teacher.py --config CONFIG [the same key=value ...] --out NEW_FOLDER`, "
                "or set teacher.cache=null to run the teacher"
            )
        cache = cls(folder, manifest, views)
        cache.check_complete(cfg.train.max_steps)
        return cache

    def check_complete(self, max_steps: int) -> None:
        """Every shard of steps [0, max_steps) is there and recorded (a build that stopped leaves some out)."""
        shards = range(num_shards(max_steps, self.steps_per_shard))
        missing = [k for k in shards if shard_name(k) not in self.records or not (self.folder / shard_name(k)).is_file()]
        if missing:
            raise ConfigError(
                f"teacher.cache={self.folder} is incomplete: {len(missing)} of the {len(shards)} shards this run reads "
                f"are missing (first: {shard_name(missing[0])}); finish it by running tools/cache_teacher.py again with "
                "the same config and --out (it continues where it stopped)"
            )

    def describe(self) -> str:
        return (
            f"teacher: embeddings of every view read from {self.folder} ({self.dtype}, {self.stored_views} view(s) per image, "
            f"steps 0-{self.max_steps - 1}); the teacher's backbone does not run"
        )

    def _load(self, shard: int) -> Dict[str, torch.Tensor]:
        path = self.folder / shard_name(shard)
        self._check_recorded(shard, path)
        data = safe_load(path)
        steps = len(shard_steps(shard, self.steps_per_shard, self.max_steps))
        expected = (steps, self.batch_size, self.stored_views, self.dim)
        embeddings = data.get("embeddings")
        if not torch.is_tensor(embeddings) or tuple(embeddings.shape) != expected or embeddings.dtype != DTYPES[self.dtype]:
            found = f"{tuple(embeddings.shape)} {embeddings.dtype}" if torch.is_tensor(embeddings) else "no embeddings"
            raise CheckpointError(
                f"{path} holds {found}, but the manifest says {expected} {self.dtype}; delete the shard and run "
                "tools/cache_teacher.py again with the same config and --out to rewrite it"
            )
        return data

    def _check_recorded(self, shard: int, path: Path) -> None:
        """The file is the shard the builder wrote: its steps and bytes are the manifest's record of it.

        A shard of the right shape but the wrong content (another run's, a
        neighbour's, zeros) would otherwise train silently on wrong targets.
        Hashing a 64 MiB shard takes a fraction of a second, once per shard.
        """
        steps = shard_steps(shard, self.steps_per_shard, self.max_steps)
        record = self.records.get(shard_name(shard)) or {}
        if record.get("steps") != [steps.start, steps.stop] or record.get("sha256") != file_sha256(path):
            raise CheckpointError(
                f"teacher.cache: {path} (steps {steps.start}-{steps.stop - 1}) is not the shard the cache's manifest "
                f"records (SHA-256 differs): it was replaced or damaged; delete it and run {rebuild_hint(self.folder)}"
            )

    def embeddings(self, step: int, rank: int, world: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """The teacher's unit embeddings of this process's images at ``step``, one (B / world, dim) tensor per view."""
        shard, row = divmod(step, self.steps_per_shard)
        if shard != self._shard_index:
            self._shard, self._shard_index = self._load(shard), shard
        local = self.batch_size // world
        return lookup(self._shard, row, slice(rank * local, (rank + 1) * local), self.views, device)


def lookup(shard: Mapping[str, torch.Tensor], row: int, images: slice, views: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """What a step reads from a loaded shard: step ``row``'s ``images``, the first ``views`` views, decoded on ``device``."""
    stored = shard["embeddings"][row, images, :views].to(device, non_blocking=True)
    scale = shard.get("scale")
    scale = None if scale is None else scale[row, images, :views].to(device, non_blocking=True)
    return tuple(t.contiguous() for t in decode(stored, scale).unbind(dim=1))
