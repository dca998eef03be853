"""The training engine: devices, processes, precision, the loop, logging and checkpoints.

Methods (``distill.methods``) know what to compute; this module knows how to
run it: one process or many under ``torchrun`` (DDP), autocast, channels_last,
an optimiser and schedule, atomic checkpoints every N steps, exact resume,
a progress bar, TensorBoard scalars and a JSON-lines log.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retro_transfer.checkpoints import CheckpointError, load_teacher, safe_load, save_atomic
from retro_transfer.models import build_student
from retro_transfer.utils.progress import progress_bar

from . import distributed as dist_utils
from .config import Config, ConfigError, check_adapter_widths, dump_yaml
from .data import MultiViewImages, StepBatchSampler, list_images, moco_v2_augmentation
from .methods import METHODS, DistillMethod

CHECKPOINT_FORMAT = "retro-transfer/distill"
CHECKPOINT_VERSION = 1
LAST = "checkpoint_last.pth"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving over good checkpoints."""


def build_method(cfg: Config) -> DistillMethod:
    """The method of ``cfg`` with its student, and its frozen teacher when it needs one."""
    student = build_student(cfg.student.arch)
    cls = METHODS[cfg.method]
    if not cls.needs_teacher:
        return cls(
            student,
            head_hidden=cfg.student.head_hidden,
            dim=cfg.student.head_dim,
            queue_size=cfg.loss.queue_size,
            temperature=cfg.loss.temperature,
            momentum=cfg.loss.momentum,
            shuffle_bn=cfg.train.shuffle_bn,
        )
    if not cfg.teacher.checkpoint:
        raise ConfigError(f"method {cfg.method} needs a teacher: set teacher.checkpoint=PATH")
    teacher, report = load_teacher(cfg.teacher.checkpoint, arch=cfg.teacher.arch, require_head=True, family=cfg.teacher.family)
    if dist_utils.is_main_process():
        print(report.summary())
    common = dict(teacher_bn_train=cfg.teacher.bn_train_mode, queue_size=cfg.loss.queue_size, temperature=cfg.loss.temperature)
    if cfg.method == "seed":
        return cls(
            student,
            teacher,
            head_hidden=cfg.student.head_hidden,
            dim=teacher.head.out_dim,
            teacher_temperature=cfg.loss.teacher_temperature,
            **common,
        )
    consistency = dict(
        momentum=cfg.loss.momentum,
        mse_reduction=cfg.loss.mse_reduction,
        consistency_weight=cfg.loss.consistency_weight,
        shuffle_bn=cfg.train.shuffle_bn,
    )
    if cfg.method == "disco":
        return cls(student, teacher, head_hidden=cfg.student.head_hidden or 2048, dim=teacher.head.out_dim, **common, **consistency)
    method = cls(student, teacher, adapter_kind=cfg.adapter.kind, **common, **consistency)
    adapter_out = [m for m in method.adapter.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    check_adapter_widths(student.out_channels, teacher.head.in_dim, adapter_out)
    return method


def lr_factor(step: int, max_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (MoCo v2) or a constant rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision. ``auto``: bf16 on a capable GPU."""
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def forward_losses(model: nn.Module, views, device_type: str, autocast_dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """The method's forward on a step's views, under autocast when a dtype is given."""
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        return model(*views) if len(views) > 1 else model(views[0], None)


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


def find_resume_checkpoint(cfg: Config) -> Optional[Path]:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = Path(cfg.output_dir) / LAST
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint (use resume=auto to continue {cfg.output_dir})")
    return path


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
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        if cfg.train.sync_bn and self.distributed and self.device.type != "cuda":
            raise ConfigError("train.sync_bn=true across processes needs GPUs (SyncBatchNorm runs on CUDA only); set it false")

        # The same seed on every process: identical initial weights and queues.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.method = build_method(cfg).to(self.device)
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn and self.distributed:
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        params = self.method.trainable_parameters()
        self.lr = cfg.train.lr * cfg.train.batch_size / 256
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.schedule)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self.last_saved: Optional[Path] = None

        resume_from = find_resume_checkpoint(cfg)
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
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": self.cfg.method,
            "student_arch": self.cfg.student.arch,
            "teacher_arch": self.cfg.teacher.arch if self.method.teacher is not None else None,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }

    def save(self) -> Path:
        """Write ``checkpoint_last.pth`` (and a numbered copy) atomically, on the main process."""
        path = self.out / LAST
        if dist_utils.is_main_process():
            state = self.state()
            self._check_finite(state)
            save_atomic(state, path)
            numbered = self.out / f"checkpoint_{self.step:07d}.pth"
            save_atomic(state, numbered)
            for old in sorted(self.out.glob("checkpoint_[0-9]*.pth"))[: -self.cfg.checkpoint.keep or None]:
                old.unlink()
        self.last_saved = path
        return path

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
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a distillation checkpoint of this project; cannot resume from it")
        if ckpt["method"] != self.cfg.method or ckpt["student_arch"] != self.cfg.student.arch:
            raise CheckpointError(
                f"{path} is a {ckpt['method']} run of {ckpt['student_arch']}, but this config trains "
                f"{self.cfg.method} on {self.cfg.student.arch}; use another output_dir or resume=null"
            )
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.step = int(ckpt["step"])
        self.last_saved = path
        if dist_utils.is_main_process():
            print(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        files = list_images(cfg.data.train_dir)
        dataset = MultiViewImages(
            files, moco_v2_augmentation(cfg.data.image_size, cfg.data.crop_min_scale), self.method.num_views, cfg.seed
        )
        sampler = StepBatchSampler(
            len(dataset), cfg.train.batch_size, self.rank, self.world, cfg.seed, self.step, cfg.train.max_steps
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: the loader draws a worker base seed per iterator, and from
            # the global RNG that would put a resumed run one draw off the uninterrupted one
            # (batch_shuffle's permutation, dropout). Samples are seeded per index anyway.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _to_device(self, view: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        return view.to(self.device, non_blocking=True, memory_format=memory_format)

    def train_step(self, views) -> Dict[str, float]:
        out = forward_losses(self.model, views, self.device.type, self.autocast_dtype)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step}; the run stopped and {where}. "
                "Lower train.lr, set train.grad_clip, or use train.precision=fp32"
            )
        optimize(loss, self.optimizer, self.scaler, self.scheduler, self.method.trainable_parameters(), self.cfg.train.grad_clip)
        return {k: float(v.detach()) for k, v in out.items()}

    def fit(self) -> Path:
        cfg = self.cfg
        main = dist_utils.is_main_process()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.out / "config.yaml")
        writer = None
        if main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        log_file = open(self.out / "log.jsonl", "a") if main else None
        self.model.train()
        loader = self._loader()
        bar = progress_bar(loader, desc=f"{cfg.method} {cfg.student.arch}", total=cfg.train.max_steps, initial=self.step) if main else loader
        tick = time.perf_counter()
        try:
            for views in bar:
                terms = self.train_step([self._to_device(v) for v in views])
                self.step += 1
                now = time.perf_counter()
                terms["img_per_s"] = cfg.train.batch_size / max(now - tick, 1e-9)
                terms["lr"] = self.optimizer.param_groups[0]["lr"]
                tick = now
                if main and (self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps):
                    self._log(terms, bar, writer, log_file)
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                    self.save()
            if self.step == cfg.train.max_steps and self.last_saved is None:
                self.save()  # a resumed run that had already finished
        finally:
            if writer is not None:
                writer.close()
            if log_file is not None:
                log_file.close()
        return self.out / LAST

    def _log(self, terms: Dict[str, float], bar, writer, log_file) -> None:
        record = {"step": self.step, **{k: round(v, 6) for k, v in terms.items()}}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if writer is not None:
            for key, value in terms.items():
                writer.add_scalar(f"train/{key}", value, self.step)
        shown = {k: f"{v:.4g}" for k, v in terms.items() if k != "lr"}
        if getattr(bar, "disable", True):
            # No terminal (a log file, CI): a plain line instead of a bar.
            print(f"step {self.step}/{self.cfg.train.max_steps} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        else:
            bar.set_postfix(shown, refresh=False)
