"""Build a teacher-embedding cache: the teacher run once over every view a distillation will see.

``build_cache(cfg, out)`` takes the same config as the distillation it
serves: the same data, teacher, seed, image size, augmentation, global batch
and steps. It draws the same batches and views as the run would (one global
batch per step, whatever the number of processes), embeds them with the same
function as a step does (:func:`distill.methods.base.embed_views`) under the
same autocast, and writes them to ``out`` (layout: :mod:`distill.teacher_cache`).

Under ``torchrun`` process r of W computes and writes shards r, r + W, ...:
no process waits for another until the end. Each process records what it
wrote next to the shard (``shard_000000.json``: its steps and SHA-256, written
after the shard); at the end, when every process is done, the first one moves
those records into the manifest, the only writer of that file. A build that
stops (killed, out of time) is continued by running it again: files are
written atomically, so a recorded shard is whole, and only the shards without
a record (or file) are computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from retro_transfer.safe_io import remove_stale_temporaries, save_atomic
from retro_transfer.teacher_loading import load_teacher
from retro_transfer.utils.progress import progress_bar
from retro_transfer.utils.run_lock import LOCK_FILE

from . import distributed as dist_utils
from .config import TEACHER_CACHE_MANIFEST, Config, ConfigError
from .data import StepBatchSampler, step_loader
from .methods import METHODS
from .methods.base import embed_views
from .precision import autocast, resolve_precision
from .teacher_cache import (
    DTYPES,
    ROWS,
    default_steps_per_shard,
    encode,
    num_shards,
    read_manifest,
    run_fields,
    shard_name,
    shard_record,
    shard_steps,
)
from .training_data import training_dataset, training_images

_RECORD_SUFFIX = ".json"


def check_buildable(cfg: Config, dtype: str, steps_per_shard: Optional[int]) -> None:
    """Refusals that need no file: what a cache cannot hold, and settings it cannot take."""
    if not cfg.uses_teacher:
        raise ConfigError(f"method {cfg.method} has no teacher, so there is nothing to cache; use a seed, disco or retro config")
    if cfg.teacher.bn_train_mode:
        raise ConfigError(
            "teacher.bn_train_mode=true normalises with the statistics of each batch, so an image's embedding depends on "
            "the rest of its batch and cannot be cached; build the cache (and run) with teacher.bn_train_mode=false"
        )
    if cfg.teacher.cache:
        raise ConfigError(f"teacher.cache={cfg.teacher.cache} is set; this tool writes the cache to --out: set teacher.cache=null")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if steps_per_shard is not None and steps_per_shard < 1:
        raise ConfigError(f"--steps-per-shard must be at least 1, got {steps_per_shard}")


def _manifest(cfg: Config, files, autocast_dtype, views: int, dim: int, dtype: str, steps_per_shard: int, report) -> Dict:
    return {
        "run": run_fields(cfg, files, autocast_dtype, views),
        "storage": {
            "dtype": dtype,
            "steps_per_shard": steps_per_shard,
            "num_shards": num_shards(cfg.train.max_steps, steps_per_shard),
            "dim": dim,
            "rows": ROWS,
        },
        "about": {
            "teacher_file": str(cfg.teacher.checkpoint),
            "teacher_arch": report.arch,
            "teacher_layout": report.format,
            "data_dir": str(cfg.data.train_dir),
            "torch": torch.__version__,
        },
    }


def _check_existing(out: Path, manifest: Dict) -> bool:
    """Whether ``out`` already holds this cache (to continue); refuses a folder that holds another one."""
    if not (out / TEACHER_CACHE_MANIFEST).exists():
        if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ConfigError(f"--out {out} is a folder that holds other files and no teacher cache; choose an empty or new folder")
        return False
    held = read_manifest(out)
    for part in ("run", "storage"):
        for key, value in manifest[part].items():
            if held[part].get(key) != value:
                raise ConfigError(
                    f"--out {out} holds a teacher cache of another run or layout: {key} differs (there: {held[part].get(key)!r}, "
                    f"this build: {value!r}); choose another --out, or delete {out} to rebuild it"
                )
    return True


def build_cache(cfg: Config, out, dtype: str = "float16", steps_per_shard: Optional[int] = None) -> Dict:
    """Write the teacher's embeddings of every view of the run ``cfg`` describes to ``out``; returns a summary.

    Continues a cache that a stopped build left in ``out``. Every process of
    a ``torchrun`` job calls this; each computes its own shards.
    """
    check_buildable(cfg, dtype, steps_per_shard)
    out = Path(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed = dist_utils.init_from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world, main = dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main_process()
    views = METHODS[cfg.method].num_views
    files = training_images(cfg, views)
    autocast_dtype = resolve_precision(cfg.train.precision, device)
    teacher, report = load_teacher(cfg.teacher.checkpoint, arch=cfg.teacher.arch, require_head=True, family=cfg.teacher.family)
    teacher = teacher.to(device).eval()
    dim = teacher.head.out_dim
    steps_per_shard = steps_per_shard or default_steps_per_shard(cfg.train.batch_size, views, dim, dtype)
    manifest = _manifest(cfg, files, autocast_dtype, views, dim, dtype, steps_per_shard, report)
    # One process checks and writes the folder: another would see the manifest's temporary file meanwhile.
    if main:
        stale = remove_stale_temporaries(out)  # before any process writes: a temporary now is a killed build's
        if stale:
            print(f"removed {len(stale)} partial file(s) a stopped build left in {out}")
        continuing = _check_existing(out, manifest)
        out.mkdir(parents=True, exist_ok=True)
        if not continuing:
            _save_json(manifest, out / TEACHER_CACHE_MANIFEST)
    if distributed:
        dist.barrier()

    total = manifest["storage"]["num_shards"]
    recorded = _written_shards(out)
    todo = [k for k in range(rank, total, world) if shard_name(k) not in recorded]
    if main:
        done = sum(1 for k in range(total) if shard_name(k) in recorded)
        print(f"teacher cache {out}: {done} of {total} shard(s) already written; {world} process(es) compute the rest", flush=True)
    _compute_shards(cfg, out, teacher, files, views, todo, steps_per_shard, dtype, device, autocast_dtype, show=main)
    if distributed:
        dist.barrier()  # every shard is written when all processes are here
    if main:
        _record_shards_in_manifest(out)
    if distributed:
        dist.barrier()  # the cache is complete (and readable) when every process returns
    size = sum((out / shard_name(k)).stat().st_size for k in range(total))
    return {"shards": total, "computed_here": len(todo), "steps": cfg.train.max_steps, "views": views, "dim": dim,
            "dtype": dtype, "megabytes": size / 2**20}  # fmt: skip


def _record_path(out: Path, shard: int) -> Path:
    return out / (shard_name(shard)[: -len(".pth")] + _RECORD_SUFFIX)


def _save_json(obj: Dict, path: Path) -> None:
    save_atomic(obj, path, dump=lambda o, f: f.write((json.dumps(o, indent=2) + "\n").encode()))


def _written_shards(out: Path) -> Dict[str, Dict]:
    """The shards whose file is there and recorded, in the manifest or (a build not finished yet) in a record file."""
    records = dict(read_manifest(out).get("shards") or {})
    for path in out.glob("shard_*" + _RECORD_SUFFIX):
        records[path.name[: -len(_RECORD_SUFFIX)] + ".pth"] = json.loads(path.read_text())
    return {name: record for name, record in records.items() if (out / name).is_file()}


def _record_shards_in_manifest(out: Path) -> None:
    """Move every process's shard records into the manifest (one writer, all processes done); drop the record files."""
    manifest = read_manifest(out)
    manifest["shards"] = dict(sorted(_written_shards(out).items()))
    _save_json(manifest, out / TEACHER_CACHE_MANIFEST)
    for path in out.glob("shard_*" + _RECORD_SUFFIX):
        path.unlink()


def _compute_shards(
    cfg, out: Path, teacher, files, views: int, shards, steps_per_shard: int, dtype: str, device, autocast_dtype, show: bool
) -> None:
    """Run the teacher over the global batches of ``shards`` and write each shard when its last step is done."""
    if not shards:
        return
    max_steps = cfg.train.max_steps
    steps = [step for k in shards for step in shard_steps(k, steps_per_shard, max_steps)]
    dataset = training_dataset(cfg, files, views)
    # The run's global batches (rank 0 of 1: the whole batch), only at the steps of this process's shards.
    sampler = StepBatchSampler(len(files), cfg.train.batch_size, 0, 1, cfg.seed, 0, max_steps, steps=steps)
    loader = step_loader(dataset, sampler, cfg.data.num_workers, cfg.seed, pin_memory=device.type == "cuda")
    bar = progress_bar(loader, desc="teacher cache", total=len(steps)) if show else loader
    pending = iter(shards)
    shard, rows = next(pending), []
    for batch in bar:
        with autocast(device.type, autocast_dtype):
            embedded = embed_views(teacher, *(view.to(device, non_blocking=True) for view in batch))
        rows.append(encode(torch.stack(embedded, dim=1).cpu(), dtype))
        if len(rows) == len(shard_steps(shard, steps_per_shard, max_steps)):
            stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
            save_atomic(stacked, out / shard_name(shard))
            # After the shard: a record names a whole file, so a build stopped in between just recomputes the shard.
            steps = shard_steps(shard, steps_per_shard, max_steps)
            _save_json(shard_record(out / shard_name(shard), steps), _record_path(out, shard))
            shard, rows = next(pending, None), []
