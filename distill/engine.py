"""The training engine: devices, processes, precision, the loop, logging and checkpoints.

Methods (``distill.methods``) know what to compute; this module knows how to
run it: one process or many under ``torchrun`` (DDP), autocast, channels_last,
an optimiser and schedule, atomic checkpoints every N steps, exact resume,
a progress bar, TensorBoard scalars and a JSON-lines log.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retro_transfer.safe_io import CheckpointError, remove_stale_temporaries, safe_load, save_atomic
from retro_transfer.teacher_loading import load_teacher
from retro_transfer.utils.run_lock import LOCK_FILE, lock_run_folder
from retro_transfer.models import build_student
from retro_transfer.utils.progress import progress_bar

from . import distributed as dist_utils
from .checkpoint import build_checkpoint, check_model_keys, check_resumable, restore_rng, rng_state
from .config import Config, ConfigError, dump_yaml
from .data import StepBatchSampler, step_loader
from .methods import METHODS, DistillMethod
from .monitor import KnnMonitor
from .precision import autocast, resolve_precision
from .teacher_cache import TeacherCache
from .training_data import training_dataset, training_images

LAST = "checkpoint_last.pth"
# What a run writes into output_dir (tools/pretrain_teacher.py adds checkpoint_last.pth.tar).
RUN_FILES = ("checkpoint_*.pth*", "config.yaml", "log.jsonl", "tensorboard")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving over good checkpoints."""


# Split BN: sub-batches of the key encoder in one process have at least this many images.
MIN_SPLIT_BATCH = 16
MAX_BN_SPLITS = 8


def resolve_bn_splits(cfg: Config, world_size: int) -> int:
    """Sub-batches of the key encoder's split BN: 1 (none) when distributed, where shuffled BN applies."""
    if world_size > 1 or not cfg.train.shuffle_bn:
        if world_size > 1 and (cfg.train.bn_splits or 1) > 1:
            raise ConfigError(
                f"train.bn_splits={cfg.train.bn_splits} is split BN for one process; with {world_size} processes the "
                "key encoder uses shuffled BN across them: set train.bn_splits=null"
            )
        return 1
    if cfg.train.bn_splits is not None:
        return cfg.train.bn_splits
    batch = cfg.train.batch_size
    fits = [n for n in range(1, MAX_BN_SPLITS + 1) if batch % n == 0 and batch // n >= MIN_SPLIT_BATCH]
    return max(fits, default=1)


def describe_key_bn(method: DistillMethod, world_size: int, batch_size: int) -> str:
    """One line: how the key encoder's BN statistics are kept apart from the query's."""
    if not hasattr(method, "student_ema"):
        return f"key encoder: none ({method.name} has no mean student)"
    if not method.shuffle_bn:
        return "key encoder BN: over the query's own batch (train.shuffle_bn=false)"
    if world_size > 1:
        return f"key encoder BN: shuffled across {world_size} processes (MoCo's shuffle BN)"
    if method.bn_splits == 1:
        return f"key encoder BN: one batch of {batch_size} (split BN off: train.bn_splits=1 or batch < {2 * MIN_SPLIT_BATCH})"
    per = batch_size // method.bn_splits
    return f"key encoder BN: split BN, batch shuffled into {method.bn_splits} sub-batches of {per} (one process)"


def build_method(cfg: Config, bn_splits: int = 1) -> DistillMethod:
    """The method of ``cfg`` with its student, and its frozen teacher when it needs one."""
    student = build_student(cfg.student.arch)
    cls = METHODS[cfg.method]
    teacher = None
    if cls.needs_teacher:
        if not cfg.teacher.checkpoint:
            raise ConfigError(f"method {cfg.method} needs a teacher: set teacher.checkpoint=PATH")
        teacher, report = load_teacher(cfg.teacher.checkpoint, arch=cfg.teacher.arch, require_head=True, family=cfg.teacher.family)
        if dist_utils.is_main_process():
            print(report.summary())
    return cls.from_config(cfg, student, teacher, bn_splits)


def lr_factor(step: int, max_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (MoCo v2) or a constant rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def forward_losses(
    model: nn.Module, views, device_type: str, autocast_dtype: Optional[torch.dtype], teacher: Optional[Tuple[torch.Tensor, ...]] = None
) -> Dict[str, torch.Tensor]:
    """The method's forward on a step's views, under autocast when a dtype is given.

    ``teacher``: the teacher's embeddings of the views, read from a teacher
    cache; the method then does not run its teacher.
    """
    cached = {} if teacher is None else {"teacher": teacher}
    with autocast(device_type, autocast_dtype):
        return model(*views, **cached) if len(views) > 1 else model(views[0], None, **cached)


def optimize(loss: torch.Tensor, optimizer, scaler, scheduler, params, grad_clip: Optional[float]) -> None:
    """Backward, optional gradient clipping, the optimiser and schedule steps (fp16-safe)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def make_sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with the fused kernel where this torch has one for the device (CPU: ~3x faster than the loop)."""
    try:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # an older torch or a device without the fused kernel: same maths, slower
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm, keeping timm's fused activations.

    torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's
    ``BatchNormAct2d`` (BN + SiLU / Hardswish in EfficientNet and MobileNetV3)
    into a plain SyncBatchNorm and drops the activation; timm's converter
    keeps it (``SyncBatchNormAct``).
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(module)


def find_resume_checkpoint(cfg: Config) -> Optional[Path]:
    """The checkpoint to continue from, or None for a new run; refuses a new run that would mix with an old one.

    A second run into a folder that holds one would overwrite its
    checkpoints and config and append to its log, so it needs resume or
    overwrite=true. Called before anything is built or written.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    if cfg.resume == "auto":
        return _auto_resume_checkpoint(out)
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint (use resume=auto to continue {cfg.output_dir})")
        return path
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if held and not cfg.overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(
            f"output_dir {out} already holds a run ({shown}); continue it with resume=auto, "
            "replace it with overwrite=true, or choose another output_dir"
        )
    return None


def _auto_resume_checkpoint(out: Path) -> Optional[Path]:
    """resume=auto: ``checkpoint_last.pth``, or None when the folder has no checkpoint (a new run).

    Checkpoints are written atomically, so a last checkpoint that does not
    load was damaged afterwards (a copy cut short, a disk). Resuming from an
    older one would silently redo steps, so the run stops and names the
    newest intact ``checkpoint_N.pth`` with the exact setting to continue from it.
    """
    last = out / LAST
    numbered = sorted(out.glob("checkpoint_[0-9]*.pth"), reverse=True)
    if not last.is_file() and not numbered:
        return None
    if last.is_file() and _loads(last) is not None:
        return last
    problem = f"{last} does not load (truncated or damaged)" if last.is_file() else f"{last} is missing"
    for candidate in numbered:
        ckpt = _loads(candidate)
        if ckpt is not None:
            raise CheckpointError(
                f"resume=auto: {problem}; the newest intact checkpoint is {candidate} (step {ckpt.get('step')}): "
                f"continue from it with resume={candidate}"
            )
    raise CheckpointError(
        f"resume=auto: {problem} and no checkpoint_N.pth in {out} loads either; start the run again with overwrite=true"
    )


def keep_as_numbered(last: Path, numbered: Path) -> None:
    """Give the current ``last`` checkpoint the name ``numbered`` too, before it is replaced.

    A hard link costs no disk and leaves ``last`` in place, so a crash before
    the new state is renamed over it still finds a loadable last checkpoint.
    Where links are not supported the file is renamed instead: a crash then
    leaves no last checkpoint, and resume=auto names this numbered one.
    """
    if numbered.exists() or not last.is_file():
        return
    try:
        os.link(last, numbered)
    except OSError:
        os.replace(last, numbered)


def _loads(path: Path) -> Optional[Dict]:
    try:
        return safe_load(path)
    except CheckpointError:
        return None


def prepare_output_dir(out: Path, overwrite: bool, step: int) -> None:
    """Before a run writes into ``out``: no file of a replaced run, no debris of a killed one, no record of a step to redo."""
    if overwrite:
        old = [p for pattern in RUN_FILES for p in out.glob(pattern)]
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if old:
            print(f"overwrite=true: deleted the previous run's {', '.join(sorted(p.name for p in old))} in {out}")
    stale = remove_stale_temporaries(out)
    if stale:
        print(f"removed {len(stale)} partial file(s) that a killed run left in {out}: {', '.join(p.name for p in stale)}")
    _drop_replayed_records(out / "log.jsonl", step)


def _drop_replayed_records(log: Path, step: int) -> None:
    """Keep the records up to ``step``, where the run continues: the steps after it run, and are logged, again.

    A line that a kill cut short is dropped too.
    """
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    steps = [_record_step(line) for line in lines]
    kept = [line for line, recorded in zip(lines, steps) if recorded is not None and recorded <= step]
    if kept != lines:
        save_atomic("".join(kept).encode(), log, dump=lambda data, f: f.write(data))


def _record_step(line: str) -> Optional[int]:
    """The step of a whole JSON record line; None for a line cut short or not a record."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Trainer:
    """Runs one distillation: ``Trainer(cfg).fit()`` returns the final checkpoint's path."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.distributed = dist_utils.init_from_env(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.out = Path(cfg.output_dir)
        # Held until fit() ends: another process on this output_dir is refused before either looks at it.
        self.lock = lock_run_folder(self.out, "output_dir")
        try:
            self._set_up(cfg)
        except BaseException:
            self.lock.release()  # a refused start leaves the folder as it found it
            raise

    def _set_up(self, cfg: Config) -> None:
        """Check the run, then build its data, networks and optimiser (and restore them to resume)."""
        # Every refusal comes before the networks are built and before anything is written.
        resume_from = find_resume_checkpoint(cfg)
        self.files = training_images(cfg, METHODS[cfg.method].num_views)
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        if cfg.train.sync_bn and self.distributed and self.device.type != "cuda":
            raise ConfigError("train.sync_bn=true across processes needs GPUs (SyncBatchNorm runs on CUDA only); set it false")
        # The teacher stays loaded (Retro's student path goes through its head, and checkpoints keep
        # one layout), but with a cache its backbone never runs.
        self.teacher_cache: Optional[TeacherCache] = None
        if cfg.teacher.cache:
            self.teacher_cache = TeacherCache.open(cfg, self.files, self.autocast_dtype, METHODS[cfg.method].num_views)
            if dist_utils.is_main_process():
                print(self.teacher_cache.describe(), flush=True)

        # The same seed on every process: identical initial weights and queues.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.method = build_method(cfg, resolve_bn_splits(cfg, self.world)).to(self.device)
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn and self.distributed:
            self.method = convert_sync_batchnorm(self.method)
        self.monitor: Optional[KnnMonitor] = None
        if cfg.eval.every and dist_utils.is_main_process():
            self.monitor = KnnMonitor(cfg.eval.knn_data, cfg.data.image_size, cfg.eval.knn_k, cfg.eval.max_images, self.device)
        params = self.method.trainable_parameters()
        self.lr = cfg.train.scaled_lr
        self.optimizer = make_sgd(params, self.lr, cfg.train.momentum, cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.schedule)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self.last_saved: Optional[Path] = None
        # The step whose state checkpoint_last.pth holds, when this run wrote it or resumed from it.
        self.saved_step: Optional[int] = None

        if resume_from is not None:
            self._restore(resume_from)
        self.model: nn.Module = self.method
        if self.distributed:
            # Buffers are not broadcast: every process enqueues the same gathered
            # keys, so the queues agree, and resending the queue each step would
            # cost 32 MB. BN running statistics stay per process (rank 0's are
            # saved); training uses batch statistics, so it is unaffected.
            self.model = DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if cfg.train.compile:
            self.model = torch.compile(self.model)

    # -- checkpoints -------------------------------------------------------------------

    def state(self) -> Dict:
        """This run's checkpoint (:func:`distill.checkpoint.build_checkpoint`): what ``save`` writes and resume reads."""
        return build_checkpoint(
            self.cfg, self.method, self.step, self.optimizer, self.scheduler, self.scaler, rng_state(self.device)
        )

    def save(self) -> Path:
        """Write ``checkpoint_last.pth`` atomically, on the main process; the state it replaces becomes numbered.

        A numbered checkpoint is a fallback for a damaged last one, so it must
        hold an earlier step: a copy of the last would double the disk used
        and save nothing. Before the new state is written, the last one this
        run wrote or resumed from is kept as ``checkpoint_<its step>.pth`` (a
        hard link: no bytes written); the newest ``checkpoint.keep`` of those
        stay.
        """
        path = self.out / LAST
        if dist_utils.is_main_process():
            state = self.state()
            self._check_finite(state)
            if self.cfg.checkpoint.keep and self.saved_step not in (None, self.step):
                keep_as_numbered(path, self.out / f"checkpoint_{self.saved_step:07d}.pth")
            save_atomic(state, path)
            for old in sorted(self.out.glob("checkpoint_[0-9]*.pth"))[: -self.cfg.checkpoint.keep or None]:
                old.unlink()
        self.last_saved = path
        self.saved_step = self.step
        return path

    def stopped_at(self) -> str:
        """Where an interrupted run stands and how to continue it, in one sentence (for the tools' Ctrl-C line)."""
        if self.last_saved is None:
            return (f"stopped at step {self.step}, before its first checkpoint; start it again in "
                    f"{self.out} with resume=auto (or overwrite=true)")
        return (f"stopped at step {self.step}; the last checkpoint is {self.last_saved}: continue with the same "
                "command and resume=auto")

    def _check_finite(self, state: Dict) -> None:
        """Refuse to write a checkpoint whose weights, buffers or optimiser state are NaN or infinite.

        A finite loss does not imply a finite state: an update can overflow a
        weight, a BN running variance or a momentum buffer one step before the
        loss shows it. Saving that state would overwrite the last good checkpoint.
        """
        tensors = list(state["model"].items())
        for index, buffers in state["optimizer"]["state"].items():
            tensors += [(f"optimizer.state.{index}.{key}", value) for key, value in buffers.items()]
        bad = [name for name, t in tensors if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"the model state is not finite at step {self.step} ({len(bad)} tensor(s), e.g. {bad[0]}), "
                f"so it was not saved; the run stopped and {where}. "
                "Lower train.lr or train.weight_decay, set train.grad_clip, or use train.precision=fp32"
            )

    def _restore(self, path: Path) -> None:
        ckpt = safe_load(path)
        check_resumable(ckpt, path, self.cfg.method, self.cfg.student.arch)
        check_model_keys(self.method, ckpt["model"], path)
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], self.device)
        self.step = int(ckpt["step"])
        self.last_saved = path
        if Path(path).resolve() == (self.out / LAST).resolve():
            self.saved_step = self.step
        if dist_utils.is_main_process():
            print(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        dataset = training_dataset(cfg, self.files, self.method.num_views)
        sampler = StepBatchSampler(
            len(dataset), cfg.train.batch_size, self.rank, self.world, cfg.seed, self.step, cfg.train.max_steps
        )
        return step_loader(dataset, sampler, cfg.data.num_workers, cfg.seed, pin_memory=self.device.type == "cuda")

    def _to_device(self, view: torch.Tensor) -> torch.Tensor:
        if view.ndim != 4:  # a batch's labels (teacher recipes that train on them)
            return view.to(self.device, non_blocking=True)
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        return view.to(self.device, non_blocking=True, memory_format=memory_format)

    def _monitor(self) -> Dict[str, float]:
        """The k-NN monitor's numbers; non-finite features stop the run as a non-finite loss does."""
        try:
            return self.monitor(self.method)
        except FloatingPointError as err:
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise NonFiniteLossError(f"k-NN monitor at step {self.step}: {err}; the run stopped and {where}") from err

    def train_step(self, views, teacher: Optional[Tuple[torch.Tensor, ...]] = None) -> Dict[str, float]:
        """One optimiser step on ``views``; ``teacher``: the teacher's embeddings of them from the cache, if any."""
        out = forward_losses(self.model, views, self.device.type, self.autocast_dtype, teacher)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step}; the run stopped and {where}. "
                "Lower train.lr, set train.grad_clip, or use train.precision=fp32"
            )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses; optimize() moves to the next
        optimize(loss, self.optimizer, self.scaler, self.scheduler, self.method.trainable_parameters(), self.cfg.train.grad_clip)
        return {**{k: float(v.detach()) for k, v in out.items()}, "lr": lr}

    def fit(self) -> Path:
        cfg = self.cfg
        main = dist_utils.is_main_process()
        if main:
            prepare_output_dir(self.out, cfg.overwrite, self.step)
            self.out.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.out / "config.yaml")
        writer = None
        if main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops the old events from purge_step on: the steps a resumed run redoes.
            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        log_file = open(self.out / "log.jsonl", "a") if main else None
        self.model.train()
        loader = self._loader()
        if main:
            print(describe_key_bn(self.method, self.world, cfg.train.batch_size // self.world), flush=True)
        bar = progress_bar(loader, desc=f"{cfg.method} {cfg.student.arch}", total=cfg.train.max_steps, initial=self.step) if main else loader
        tick = time.perf_counter()
        try:
            for views in bar:
                teacher = self.teacher_cache.embeddings(self.step, self.rank, self.world, self.device) if self.teacher_cache else None
                terms = self.train_step([self._to_device(v) for v in views], teacher)
                self.step += 1
                now = time.perf_counter()
                terms["img_per_s"] = cfg.train.batch_size / max(now - tick, 1e-9)
                last = self.step == cfg.train.max_steps
                monitor_now = self.monitor is not None and (self.step % cfg.eval.every == 0 or last)
                if monitor_now:
                    terms.update(self._monitor())
                if main and (self.step % cfg.log.every == 0 or last or monitor_now):
                    self._log(terms, bar, writer, log_file)
                tick = time.perf_counter()  # the monitor's and the log's time are not the step's
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                    self.save()
            if self.step == cfg.train.max_steps and self.last_saved is None:
                self.save()  # a resumed run that had already finished
        finally:
            if writer is not None:
                writer.close()
            if log_file is not None:
                log_file.close()
            self.lock.release()
        return self.out / LAST

    def _log(self, terms: Dict[str, float], bar, writer, log_file) -> None:
        record = {"step": self.step, **{k: round(v, 6) for k, v in terms.items()}}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if writer is not None:
            for key, value in terms.items():
                writer.add_scalar(f"train/{key}", value, self.step)
        if self.monitor is not None and self.monitor.last:
            terms = {**terms, **self.monitor.last}  # the bar keeps showing the latest k-NN accuracy
        shown = {k: f"{v:.4g}" for k, v in terms.items() if k not in ("lr", "knn_seconds")}
        if getattr(bar, "disable", True):
            # No terminal (a log file, CI): a plain line instead of a bar.
            print(f"step {self.step}/{self.cfg.train.max_steps} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        else:
            bar.set_postfix(shown, refresh=False)
