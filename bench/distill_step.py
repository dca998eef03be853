"""Cost of one distillation training step, and of the parts it is made of.

For each method (moco_v2, seed, disco, retro) and each student, this script
builds the method directly (``Teacher(arch)`` with random weights: the cost of
a step does not depend on the values of the weights, so no checkpoint is
needed) and times, on one fixed random batch:

* the full training step, as ``distill.engine.Trainer.train_step`` runs it:
  the method's forward under autocast (teacher, students, EMA update of the
  mean student, queue snapshot and enqueue, loss), the finiteness check,
  backward, SGD step and schedule step. Reported as images per second
  (batch / median step time);
* its parts, each timed alone, interleaved with the full steps in the same
  run so that both see the same machine state:

  (a) teacher: the frozen teacher on all the views the method uses, as one
      batch, in inference mode (seed, disco, retro);
  (b) student: forward and backward of the trainable networks on the views
      the method sends through them (student + head; for retro student +
      adapter + the teacher's frozen head), backward of the sum of the
      outputs, without any loss;
  (c) mean student: forward of the EMA copy under ``no_grad`` (moco_v2,
      disco, retro).

* an **official-style step**: the same method computed the way the released
  DisCo / Retro code runs it: the teacher in train mode (batch statistics),
  each view through the teacher separately, one student forward per view,
  the queue cloned before scoring, fp32 and no channels_last whatever the
  flags say. Reported as ``ours / official`` (img/s ratio, >1 is faster);
* the **cached step** (seed, disco, retro): the same step with the teacher's
  embeddings read from a teacher cache (``teacher.cache``, issue 14) instead
  of computed: the step's rows of an in-memory float16 shard decoded onto the
  device and passed to the method, whose teacher backbone then does not run
  (Retro's student path still goes through the teacher's head). Reported as
  img/s and ``cached / uncached`` (img/s ratio). Reading a shard from disk
  (64 MiB per ~500 ImageNet steps) is left out: well under 1 ms a step;
* the **data path** alone (``--data-path``): images per second that the
  engine's loader delivers (decoded in memory or streamed from disk, MoCo v2
  augmentation, both views) with ``num_workers`` 0 and 1, beside the step's
  img/s, to see whether data or compute bounds a run.

Why: the parts are the work a step cannot avoid. What a step costs beyond
them (``overhead = step / sum_of_parts - 1``) is bookkeeping: EMA updates,
queue copies, the loss, the optimiser, synchronisation. The target is an
overhead of at most 15%: a step should cost little more than its parts.

Also reported: the peak memory of the full step (CUDA: the allocator's peak,
``torch.cuda.max_memory_allocated``; CPU: how far the process's resident set
rose above what it was before the method was built, an approximation that
includes allocator caching) and the trainable and total parameters (total
includes the frozen teacher and the EMA copies).

Usage::

    python bench/distill_step.py --quick
    python bench/distill_step.py --students efficientnet_b0 resnet18 --iters 10
    python bench/distill_step.py --quick --data-path --image-size 48 --batch-size 64
    python bench/distill_step.py --methods seed disco retro --students efficientnet_b0 --teacher resnet50 resnet152

A markdown table is printed and every number is written to JSON (``--out``).
Times are medians over ``--iters``; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from distill.ema import ema_update
from distill.engine import forward_losses, make_sgd, optimize
from distill.losses import consistency_mse, info_nce, seed_loss
from distill.methods import METHODS, DistillMethod
from distill.methods.base import embed_views, pooled, unit
from distill.teacher_cache import encode, lookup
from retro_transfer.models import Teacher, build_student

ALL_METHODS = ("moco_v2", "seed", "disco", "retro")
DEFAULT_STUDENTS = ("efficientnet_b0", "mobilenetv3_large_100", "resnet18", "resnet34")
OVERHEAD_TARGET_PCT = 15.0
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The engine's optimiser (distill/config.py defaults): SGD, lr 0.03 per 256 images.
BASE_LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-4
MIB = 2**20


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    p.add_argument("--students", nargs="+", default=None, help=f"timm names (default: {' '.join(DEFAULT_STUDENTS)})")
    p.add_argument("--teacher", nargs="+", default=None, help="torchvision ResNets, each timed (default resnet50)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on GPU, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 16 on CPU")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--channels-last", action="store_true", help="channels-last networks and inputs")
    p.add_argument("--queue-size", type=int, default=65536, help="negatives queue length (a multiple of the batch)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5 on GPU, 2 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds; medians are reported (default 20 on GPU, 5 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 warmup, 2 iters, one student, resnet18 teacher, 32 px, batch 8"
    )
    p.add_argument("--no-official", action="store_true", help="skip the official-style step")
    p.add_argument("--no-cached", action="store_true", help="skip the step with the teacher's embeddings from a cache")
    p.add_argument("--data-path", action="store_true", help="also time the data loader alone (workers 0 and 1)")
    p.add_argument("--data", default=None, help="image folder for --data-path (default: a generated shapes set)")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/distill_step_<device>.json)")
    return p.parse_args(argv)


def resolve_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the defaults left unset: ``--quick``'s first, then the device's."""
    gpu = device.type == "cuda"
    if args.quick:  # its own defaults; flags given explicitly still win
        quick = dict(warmup=1, iters=2, image_size=32, batch_size=8, teacher=["resnet18"])
        for key, value in quick.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.students = (args.students or [DEFAULT_STUDENTS[0]])[:1]
    defaults = dict(
        students=list(DEFAULT_STUDENTS),
        teacher=["resnet50"],
        image_size=224 if gpu else 64,
        batch_size=256 if gpu else 16,
        precision="bf16" if gpu else "fp32",
        warmup=5 if gpu else 2,
        iters=20 if gpu else 5,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.queue_size % args.batch_size:
        raise SystemExit(f"--queue-size {args.queue_size} must be a multiple of --batch-size {args.batch_size}")
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be at least 1 and --warmup at least 0")
    if args.out is None:
        suffix = "_quick" if args.quick else ""
        args.out = f"bench/results/distill_step_{device_slug(device)}{suffix}.json"
    return args


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name in lower case (``nvidia_h100_80gb_hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


# --------------------------------------------------------------------------- the method under test


def build_method(name: str, student_arch: str, teacher_arch: str, queue_size: int) -> DistillMethod:
    """As ``distill.engine.build_method`` with the config defaults, but a randomly initialised teacher."""
    cls = METHODS[name]
    student = build_student(student_arch)
    if not cls.needs_teacher:
        return cls(student, queue_size=queue_size)
    teacher = Teacher(teacher_arch)
    if name == "seed":
        return cls(student, teacher, dim=teacher.head.out_dim, queue_size=queue_size)
    if name == "disco":
        return cls(student, teacher, head_hidden=2048, dim=teacher.head.out_dim, queue_size=queue_size)
    return cls(student, teacher, queue_size=queue_size)


@dataclass
class Setup:
    """A method on its device with the engine's optimiser, and the batch it is timed on."""

    method: DistillMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    views: List[torch.Tensor]
    device: torch.device
    dtype: Optional[torch.dtype]
    official: Optional[OfficialStyle] = None
    cached: Optional[Dict[str, torch.Tensor]] = None
    nonfinite_steps: int = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def make_setup(name: str, student_arch: str, teacher_arch: Optional[str], args: argparse.Namespace, device: torch.device) -> Setup:
    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    method = build_method(name, student_arch, teacher_arch, args.queue_size).to(device)
    if args.channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.train()
    optimizer = make_sgd(method.trainable_parameters(), BASE_LR * args.batch_size / 256, SGD_MOMENTUM, WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = [torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(method.num_views)]
    official = None if args.no_official else OfficialStyle(method, BASE_LR * args.batch_size / 256)
    cached = None if args.no_cached or method.teacher is None else cache_shard(method, views)
    return Setup(method, optimizer, scheduler, scaler, views, device, dtype, official, cached)


def cache_shard(method: DistillMethod, views: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A one-step float16 shard of the teacher's embeddings of ``views``, in host memory as a loaded shard is."""
    embedded = embed_views(method.teacher, *views)
    return {key: value.unsqueeze(0) for key, value in encode(torch.stack(embedded, dim=1).cpu(), "float16").items()}


# --------------------------------------------------------------------------- what is timed


class OfficialStyle:
    """The method's loss computed as the released DisCo / Retro code runs a step.

    A deep copy of the method (the teacher's BN running statistics move in
    train mode and must not leak into ours). The losses are the same formulas
    (with the released code's q2 bug fixed, so only the way of computing
    differs): teacher in train mode, one teacher call per view, one student
    call per view, MoCo's ``queue.clone().detach()``, fp32.
    """

    def __init__(self, method: DistillMethod, lr: float) -> None:
        self.m = copy.deepcopy(method).to(memory_format=torch.contiguous_format).train()
        if self.m.teacher is not None:
            self.m.teacher.train()
        self.optimizer = torch.optim.SGD(self.m.trainable_parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unit(self.m.teacher(x))

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        return m.embed(m.student(x)) if m.name == "retro" else unit(m.head(pooled(m.student(x))))

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        with torch.no_grad():
            ema_update(m.student_ema, m.student, m.momentum)
            if m.name == "retro":
                if m.adapter_ema is not None:
                    ema_update(m.adapter_ema, m.adapter, m.momentum)
                return m.embed(m.student_ema(x), m.key_adapter)
            ema_update(m.head_ema, m.head, m.momentum)
            return unit(m.head_ema(pooled(m.student_ema(x))))

    def loss(self, views: List[torch.Tensor]) -> torch.Tensor:
        m = self.m
        x1 = views[0].contiguous()
        queue = m.queue.embeddings.clone().detach()
        if m.name == "seed":
            t, s = self._teacher(x1), self._student(x1)
            loss = seed_loss(s, t, queue, m.temperature, m.teacher_temperature)
            m.queue.enqueue(t)
            return loss
        x2 = views[1].contiguous()
        q, k = self._student(x1), self._key(x2)
        loss = info_nce(q, k, queue, m.temperature)
        if m.name in ("disco", "retro"):
            t1, t2, q2 = self._teacher(x1), self._teacher(x2), self._student(x2)
            loss = loss + consistency_mse(q, t1) + consistency_mse(q2, t2)
        m.queue.enqueue(k)
        return loss

    def step(self, s: "Setup") -> None:
        loss = self.loss(s.views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def full_step(s: Setup) -> None:
    """One training step through the engine's own functions (a non-finite loss is counted, not raised)."""
    loss = forward_losses(s.method, s.views, s.device.type, s.dtype)["loss"]
    if not torch.isfinite(loss.detach()):  # a device-to-host sync, as in the engine
        s.nonfinite_steps += 1
    optimize(loss, s.optimizer, s.scaler, s.scheduler, s.method.trainable_parameters(), grad_clip=None)


def cached_step(s: Setup) -> None:
    """The full step with the teacher's embeddings read from the cache's shard (the engine's lookup) instead of computed."""
    teacher = lookup(s.cached, 0, slice(None), s.method.num_views, s.device)
    loss = forward_losses(s.method, s.views, s.device.type, s.dtype, teacher)["loss"]
    if not torch.isfinite(loss.detach()):
        s.nonfinite_steps += 1
    optimize(loss, s.optimizer, s.scaler, s.scheduler, s.method.trainable_parameters(), grad_clip=None)


def teacher_part(s: Setup) -> None:
    """(a) The frozen teacher on every view the method uses, as one batch, in inference mode."""
    with s.autocast():
        s.method.teacher_embeddings(*s.views)


def student_outputs(method: DistillMethod, views: List[torch.Tensor]) -> List[torch.Tensor]:
    """The embeddings that receive gradients in the method's forward, computed the same way."""
    if method.name == "retro":
        return [method.embed(method.student(v)) for v in views]
    used = views if method.name == "disco" else views[:1]  # moco_v2 and seed: the query view only
    return [unit(method.head(pooled(method.student(v)))) for v in used]


def student_part(s: Setup) -> None:
    """(b) Forward and backward of the trainable networks, without loss or optimiser."""
    s.optimizer.zero_grad(set_to_none=True)
    with s.autocast():
        outputs = student_outputs(s.method, s.views)
    torch.stack([o.sum() for o in outputs]).sum().backward()


def mean_part(s: Setup) -> None:
    """(c) The mean (EMA) student on the key view, without autograd."""
    m, key_view = s.method, s.views[-1]
    with torch.no_grad(), s.autocast():
        if m.name == "retro":
            m.embed(m.student_ema(key_view), m.key_adapter)
        else:
            unit(m.head_ema(pooled(m.student_ema(key_view))))


def parts_of(method: DistillMethod) -> Dict[str, Callable[[Setup], None]]:
    """The parts that apply to ``method``, by name."""
    parts: Dict[str, Callable[[Setup], None]] = {}
    if method.teacher is not None:
        parts["teacher"] = teacher_part
    parts["student"] = student_part
    if hasattr(method, "student_ema"):
        parts["mean_student"] = mean_part
    return parts


# --------------------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[Setup], None], s: Setup) -> float:
    """Seconds that ``fn(s)`` takes, the device's queue drained before and after."""
    synchronize(s.device)
    start = time.perf_counter()
    fn(s)
    synchronize(s.device)
    return time.perf_counter() - start


def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the full steps, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` over the full steps (weights,
    optimiser state, queue and activations). CPU: the peak resident set during
    the full steps minus the resident set before the method was built, read
    from ``/proc/self/status`` after resetting the peak; where that reset is
    not possible, the rise of ``getrusage``'s lifetime peak (0 when an earlier
    configuration already reached higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_rise"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.rss_before_kib = _proc_status_kib("VmRSS")
        self.maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.can_reset = device.type == "cpu" and self.rss_before_kib is not None and _reset_rss_peak()
        if device.type == "cpu" and not self.can_reset:
            self.kind = "cpu_getrusage_maxrss_rise"

    def before_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset:
            _reset_rss_peak()

    def after_step(self) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self.can_reset:
            peak = (_proc_status_kib("VmHWM") - self.rss_before_kib) / 1024
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss_before_kib) / 1024
        self.peak_mib = max(self.peak_mib, peak)


def measure(s: Setup, warmup: int, iters: int, memory: PeakMemory) -> Dict[str, List[float]]:
    """Per-round seconds of the full step and of each part, interleaved round by round."""
    parts = parts_of(s.method)
    times: Dict[str, List[float]] = {"step": [], **{name: [] for name in parts}}
    if s.official is not None:
        times["official_step"] = []
    if s.cached is not None:
        times["cached_step"] = []
    for round_index in range(warmup + iters):
        memory.before_step()
        step_seconds = timed(full_step, s)
        memory.after_step()
        part_seconds = {name: timed(fn, s) for name, fn in parts.items()}
        if s.official is not None:
            part_seconds["official_step"] = timed(s.official.step, s)
        if s.cached is not None:
            part_seconds["cached_step"] = timed(cached_step, s)
        if round_index >= warmup:
            times["step"].append(step_seconds)
            for name, seconds in part_seconds.items():
                times[name].append(seconds)
    return times


# --------------------------------------------------------------------------- one configuration


def millions(params) -> float:
    return sum(p.numel() for p in params) / 1e6


def bench_one(name: str, student_arch: str, teacher_arch: Optional[str], args: argparse.Namespace, device: torch.device) -> Dict:
    """Every number of one method x student x teacher configuration."""
    memory = PeakMemory(device)
    s = make_setup(name, student_arch, teacher_arch, args, device)
    times = measure(s, args.warmup, args.iters, memory)
    medians_ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    step_ms = medians_ms.pop("step")
    official_ms = medians_ms.pop("official_step", None)
    cached_ms = medians_ms.pop("cached_step", None)
    parts_ms = sum(medians_ms.values())
    overhead = (step_ms / parts_ms - 1.0) * 100.0
    row = {
        "method": name,
        "student": student_arch,
        "teacher": teacher_arch if s.method.teacher is not None else None,
        "img_per_s": args.batch_size / (step_ms / 1e3),
        "step_ms": step_ms,
        "parts_ms": medians_ms,
        "sum_parts_ms": parts_ms,
        "overhead_pct": overhead,
        "official_step_ms": official_ms,
        "speedup_vs_official": None if official_ms is None else official_ms / step_ms,
        "cached_step_ms": cached_ms,
        "cached_img_per_s": None if cached_ms is None else args.batch_size / (cached_ms / 1e3),
        "cached_speedup": None if cached_ms is None else step_ms / cached_ms,
        "overhead_target_pct": OVERHEAD_TARGET_PCT,
        "meets_target": overhead <= OVERHEAD_TARGET_PCT,
        "peak_memory_mib": memory.peak_mib,
        "peak_memory_kind": memory.kind,
        "trainable_params_m": millions(s.method.trainable_parameters()),
        "total_params_m": millions(s.method.parameters()),
        "student_params_m": millions(s.method.student.parameters()),
        "nonfinite_steps": s.nonfinite_steps,
        "times_ms": {key: [t * 1e3 for t in values] for key, values in times.items()},
    }
    del s
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- the data path alone

BENCH_DATA = Path("bench/results/shapes_data")


def bench_images(args: argparse.Namespace) -> Path:
    """``--data``, or a generated shapes set (1,000 images of 96 px, written once)."""
    if args.data:
        return Path(args.data)
    from retro_transfer.data.shapes import ShapesConfig, generate

    if not (BENCH_DATA / "unlabeled").is_dir():
        generate(BENCH_DATA, ShapesConfig(num_images=1000, size=96, seed=0))
    return BENCH_DATA / "unlabeled"


def bench_data_path(args: argparse.Namespace) -> List[Dict]:
    """Images per second the engine's loader delivers (two MoCo v2 views each), by storage and workers."""
    from distill.data import MultiViewImages, StepBatchSampler, decode_all, list_images, moco_v2_augmentation, step_loader

    files = list_images(bench_images(args))
    decoded = decode_all(files, limit_mb=2048)
    augmentation = moco_v2_augmentation(args.image_size)
    steps = max(6, 1024 // args.batch_size)
    rows = []
    for storage, images in (("in memory", decoded), ("from disk", None)):
        for workers in (0, 1):
            dataset = MultiViewImages(files, augmentation, views=2, seed=args.seed, decoded=images)
            sampler = StepBatchSampler(len(files), args.batch_size, 0, 1, args.seed, 0, steps + 1)
            batches = iter(step_loader(dataset, sampler, workers, args.seed))
            next(batches)  # worker start-up is not throughput
            start = time.perf_counter()
            for _ in batches:
                pass
            seconds = time.perf_counter() - start
            rows.append({"storage": storage, "num_workers": workers, "img_per_s": steps * args.batch_size / seconds})
    return rows


def format_data_table(rows: List[Dict], step_rows: List[Dict]) -> str:
    lines = ["| storage | num_workers | loader img/s | slowest step img/s | loader / step |", "|---|---|---|---|---|"]
    slowest = min((r["img_per_s"] for r in step_rows), default=None)
    for r in rows:
        ratio = "-" if slowest is None else f"{r['img_per_s'] / slowest:.1f}x"
        step = "-" if slowest is None else f"{slowest:.1f}"
        lines.append(f"| {r['storage']} | {r['num_workers']} | {r['img_per_s']:.1f} | {step} | {ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, device: torch.device) -> Dict:
    import timm

    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels_last": args.channels_last,
        "queue_size": args.queue_size,
        "teacher": args.teacher,
        "warmup": args.warmup,
        "iters": args.iters,
        "quick": args.quick,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: List[Dict], device: torch.device) -> str:
    memory_header = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS rise MiB"
    header = [
        "method", "student", "teacher", "img/s", "step ms", "teacher ms", "student f+b ms", "mean fwd ms",
        "sum parts ms", "overhead %", f"target <= {OVERHEAD_TARGET_PCT:g}%", "official-style ms", "ours / official",
        "cached img/s", "cached / uncached", memory_header, "trainable M", "total M",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        parts = r["parts_ms"]
        cells = [
            r["method"], r["student"], r["teacher"] or "-", f"{r['img_per_s']:.1f}", _ms(r["step_ms"]), _ms(parts.get("teacher")),
            _ms(parts.get("student")), _ms(parts.get("mean_student")), _ms(r["sum_parts_ms"]),
            f"{r['overhead_pct']:+.1f}", "pass" if r["meets_target"] else "fail", _ms(r["official_step_ms"]),
            "-" if r["speedup_vs_official"] is None else f"{r['speedup_vs_official']:.2f}x",
            _ms(r["cached_img_per_s"]), "-" if r["cached_speedup"] is None else f"{r['cached_speedup']:.2f}x",
            f"{r['peak_memory_mib']:.0f}", f"{r['trainable_params_m']:.2f}", f"{r['total_params_m']:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(env: Dict) -> str:
    return (
        f"{env['device_name']} ({env['device']}, {env['cpu_count']} CPUs, {env['torch_threads']} threads), "
        f"torch {env['torch']}, {env['precision']}, batch {env['batch_size']}, {env['image_size']} px, "
        f"teacher {' '.join(env['teacher'])}, queue {env['queue_size']}, channels_last {env['channels_last']}, "
        f"warmup {env['warmup']}, iters {env['iters']} (medians)"
    )


def write_json(path: Path, env: Dict, rows: List[Dict], data_rows: Optional[List[Dict]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "results": rows}
    if data_rows is not None:
        payload["data_path"] = data_rows
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    args = resolve_args(args, device)
    env = environment(args, device)
    print(describe(env), flush=True)
    rows = []
    for student_arch in args.students:
        for name in args.methods:
            for teacher_arch in args.teacher if METHODS[name].needs_teacher else [None]:
                print(f"  {name} / {student_arch} / {teacher_arch or 'no teacher'} ...", flush=True)
                rows.append(bench_one(name, student_arch, teacher_arch, args, device))
    print()
    print(format_table(rows, device))
    nonfinite = [f"{r['method']}/{r['student']}/{r['teacher']}" for r in rows if r["nonfinite_steps"]]
    if nonfinite:
        print(f"\nnote: non-finite losses (random weights and inputs) in {', '.join(nonfinite)}; timings are unaffected")
    data_rows = None
    if args.data_path:
        print("\n  data path ...", flush=True)
        data_rows = bench_data_path(args)
        print()
        print(format_data_table(data_rows, rows))
    out = Path(args.out)
    write_json(out, env, rows, data_rows)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
