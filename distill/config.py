"""One configuration system for the distillation stage.

A run is described by a YAML file that may inherit others (``_base_``), plus
``key=value`` command-line overrides with dotted keys::

    cfg = load_config("configs/distill/retro_effb0_r50.yaml", ["train.max_steps=100", "train.lr=1e-4"])

The schema is a tree of frozen dataclasses. Every value is coerced to its
field's type and checked (type, choices, range) when a dataclass is built, so
an invalid ``Config`` cannot exist, and a user sees one clear message naming
the key, the bad value and what is accepted, before any network is built.
Cross-field rules (queue vs batch, teacher needed) are checked by ``Config``;
the filesystem (data folder, teacher checkpoint) only by ``validate_paths``,
so a config restored from a checkpoint on another machine still loads.

Paths inside a config (``data.train_dir``, ``teacher.checkpoint``,
``output_dir``, ``resume``) are relative to the working directory, as on the
command line; only ``_base_`` is relative to the YAML file that names it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .common import (
    ADAPTER_KINDS,
    IMAGE_EXTENSIONS,
    TEACHER_ARCHS,
    TEACHER_FAMILIES,
    TRAIN_DATA_HINT,
    has_image,
)

__all__ = [
    "ADAPTER_KINDS",
    "BASE_BATCH_SIZE",
    "IMAGE_EXTENSIONS",
    "METHODS",
    "PRECISIONS",
    "SCHEDULES",
    "TEACHER_ARCHS",
    "TEACHER_CACHE_MANIFEST",
    "TEACHER_FAMILIES",
    "TEACHER_METHODS",
    "LABELLED_METHODS",
    "AdapterConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "check_adapter_widths",
    "check_queue_against_data",
    "describe_keys",
    "dump_yaml",
    "load_config",
    "load_yaml",
    "override",
    "to_yaml",
    "valid_keys",
    "validate_paths",
]

METHODS = ("moco_v2", "seed", "disco", "retro", "supcon")
# Methods that train on labels (data.train_dir laid out train/<class>/*): teacher recipes, never students.
LABELLED_METHODS = ("supcon",)
# Methods that distil from a frozen teacher; moco_v2 trains the student alone.
TEACHER_METHODS = ("seed", "disco", "retro")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SCHEDULES = ("cosine", "constant")
# The file that makes a folder a teacher cache (distill.teacher_cache); checked here without importing torch.
TEACHER_CACHE_MANIFEST = "manifest.json"
# train.lr is the rate for this global batch; the engine uses lr * batch_size / 256.
BASE_BATCH_SIZE = 256
# A queue over this many times the data set's images x views is refused unless loss.force_queue_size.
QUEUE_DATA_BOUND = 16
BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A configuration a user can fix; the message names the key, the value and what is accepted."""


# --------------------------------------------------------------------------- schema helpers


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A scalar field; ``rules`` (choices, gt, ge, lt, le, required, hint) drive validation."""
    return field(default=default, metadata={"doc": doc, **rules})


def _section(cls: type, doc: str) -> Any:
    """A nested section; defaults to the section's own defaults."""
    return field(default_factory=cls, metadata={"doc": doc, "section": cls})


def _is_section(f: dataclasses.Field) -> bool:
    return "section" in f.metadata


class _Section:
    """Base of the schema dataclasses: coerce and check every scalar field on construction.

    Coercion happens here (not only in ``load_config``) so that ``from_dict``,
    ``dataclasses.replace`` and direct construction all give valid objects.
    """

    _prefix = ""  # dotted prefix of this section's keys in messages ("train.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not _is_section(f):
                value = _check_scalar(self._prefix + f.name, getattr(self, f.name), f, _hints(type(self))[f.name])
                object.__setattr__(self, f.name, value)  # frozen: coerced value, e.g. int -> float


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class StudentConfig(_Section):
    """The trained network: a timm convolutional model and, except for Retro, its projection head."""

    _prefix = "student."
    arch: str = _opt("efficientnet_b0", "timm model name (e.g. efficientnet_b0, mobilenetv3_large_100, resnet18)")
    head_hidden: Optional[int] = _opt(
        None, "hidden width of the student MLP head; null: the method's default (C_s for moco_v2 and seed, 2048 for disco)", gt=0
    )
    head_dim: int = _opt(128, "embedding width of the student head", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_timm_arch(self.arch)


@dataclass(frozen=True)
class TeacherConfig(_Section):
    """The frozen self-supervised teacher (seed, disco, retro); moco_v2 ignores this section."""

    _prefix = "teacher."
    arch: str = _opt("resnet50", "torchvision ResNet of the teacher checkpoint (w2: twice as wide)", choices=TEACHER_ARCHS)
    checkpoint: Optional[str] = _opt(
        None,
        "self-supervised teacher file as released (e.g. moco_v2_800ep_pretrain.pth.tar; README 'Teachers' lists them); "
        "required by seed/disco/retro",
    )
    family: str = _opt(
        "auto",
        "layout of teacher.checkpoint; auto recognises it from the keys, a name forces that family",
        choices=("auto",) + TEACHER_FAMILIES,
    )
    bn_train_mode: bool = _opt(
        False,
        "run the teacher's BN on batch statistics; reproduces a bug of the released DisCo/Retro code "
        "(which call model.train() on the wrapper); the faithful method uses running statistics",
    )
    cache: Optional[str] = _opt(
        None,
        "folder of the teacher's embeddings of every view of this run, written once by tools/cache_teacher.py "
        "(seed, disco, retro; README 'Teacher-embedding cache'); the teacher's backbone then does not run; null: run it",
    )


@dataclass(frozen=True)
class AdapterConfig(_Section):
    """Retro's dimension adapter from the student's C_s channels to the teacher's feature width."""

    _prefix = "adapter."
    kind: str = _opt(
        "auto", "auto: bottleneck for ResNet students, inverted_residual otherwise (paper Figure 5)", choices=ADAPTER_KINDS
    )
    ema: bool = _opt(
        True,
        "the mean student averages the adapter too (EMA of backbone and adapter, the teacher's frozen head shared), "
        "as DisCo's released builder averages every trainable part; false: only the backbone is averaged and the keys "
        "go through the online adapter",
    )


@dataclass(frozen=True)
class LossConfig(_Section):
    """Contrastive and consistency terms shared by the four methods."""

    _prefix = "loss."
    temperature: float = _opt(0.2, "InfoNCE / SEED student temperature", gt=0)
    teacher_temperature: float = _opt(0.01, "SEED teacher temperature (paper 0.01; released code 1e-4)", gt=0)
    queue_size: int = _opt(65536, "negatives queue length K; a multiple of train.batch_size", gt=0)
    momentum: float = _opt(0.999, "EMA momentum of the key / mean student", ge=0, lt=1)
    mse_weight: float = _opt(
        32.0,
        "weight of each teacher-consistency MSE term (disco, retro), a per-image mean (summed over embedding dims, "
        "averaged over images); 32 is the released DisCo/Retro recipe (MSELoss(reduction='sum') over 32 images a GPU), "
        "on any number of processes",
        ge=0,
    )
    force_queue_size: bool = _opt(
        False, f"accept a queue over {QUEUE_DATA_BOUND}x the data set's images x views (refused otherwise: it only repeats images)"
    )


@dataclass(frozen=True)
class DataConfig(_Section):
    """Unlabeled training images and MoCo v2 augmentation."""

    _prefix = "data."
    train_dir: str = _opt(
        None, "image folder: flat, or class subfolders one level down (ImageNet train/)", required=True
    )
    # 1024: four times ImageNet's 224 already takes 16x its memory per view; beyond it a batch cannot be allocated.
    image_size: int = _opt(
        224, "crop side in pixels", ge=32, le=1024, hint="the backbones downsample 32x; ImageNet uses 224"
    )
    num_workers: int = _opt(4, "data loader processes per training process", ge=0)
    crop_min_scale: float = _opt(0.2, "RandomResizedCrop minimum area fraction", gt=0, le=1)
    in_memory_mb: int = _opt(
        2048,
        "decode the whole image set once and keep it in memory as uint8 when it takes at most this many MiB "
        "(the shapes data: a few MiB); larger sets (ImageNet) stream from disk; 0: always stream",
        ge=0,
    )
    skip_bad_images: bool = _opt(
        False, "train without the image files that do not read whole (refused otherwise, listing them)"
    )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimiser, schedule and execution settings."""

    _prefix = "train."
    batch_size: int = _opt(256, "global batch size, summed over all processes", gt=0)
    max_steps: int = _opt(None, "optimiser steps of the run (200 ImageNet epochs at batch 256: 1001000)", required=True, gt=0)
    lr: float = _opt(0.03, f"base SGD learning rate for batch {BASE_BATCH_SIZE}; used as lr * batch_size / {BASE_BATCH_SIZE}", gt=0)
    momentum: float = _opt(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _opt(1e-4, "SGD weight decay", ge=0)
    warmup_steps: int = _opt(0, "linear warm-up steps before the schedule", ge=0)
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    grad_clip: Optional[float] = _opt(None, "max gradient norm; null: no clipping", gt=0)
    precision: str = _opt("auto", "auto: bf16 on a CUDA GPU that supports it, fp32 on the CPU", choices=PRECISIONS)
    channels_last: bool = _opt(False, "channels-last memory format")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes (GPUs only)")
    shuffle_bn: bool = _opt(
        True, "keep the key encoder's BN statistics apart from the query's: shuffled BN across processes, split BN in one"
    )
    bn_splits: Optional[int] = _opt(
        None,
        "sub-batches of the key encoder's split BN in one process (MoCo's one-GPU remedy); "
        "null: as many as the batch allows with at least 16 images each, up to 8; 1: off",
        ge=1,
    )
    compile: bool = _opt(False, "torch.compile the trainable networks")

    @property
    def scaled_lr(self) -> float:
        """The rate the optimiser uses: linear scaling of ``lr`` from batch 256 (MoCo v2)."""
        return self.lr * self.batch_size / BASE_BATCH_SIZE


@dataclass(frozen=True)
class EvalConfig(_Section):
    """The online k-NN monitor: accuracy of the online student's features while it trains."""

    _prefix = "eval."
    knn_data: Optional[str] = _opt(
        None, "labelled ImageFolder with train/ and val/ class folders (e.g. data/shapes/classification); null: off"
    )
    every: int = _opt(0, "run the k-NN monitor every this many steps (and at the last step); 0: off", ge=0)
    knn_k: int = _opt(20, "neighbours that vote (cosine similarity, weights exp(sim / 0.07))", gt=0)
    max_images: int = _opt(1000, "cap on the images of each split used by the monitor (bounds its cost)", gt=0)


@dataclass(frozen=True)
class LogConfig(_Section):
    """Console and TensorBoard logging."""

    _prefix = "log."
    every: int = _opt(10, "log every this many steps", gt=0)
    tensorboard: bool = _opt(True, "write TensorBoard events under output_dir")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Periodic checkpoints in output_dir."""

    _prefix = "checkpoint."
    every: int = _opt(500, "save a step checkpoint every this many steps", gt=0)
    keep: int = _opt(2, "earlier checkpoints kept besides checkpoint_last.pth (checkpoint_<step>.pth), fallbacks should it be damaged", ge=0)


@dataclass(frozen=True)
class Config(_Section):
    """A whole distillation run. Build it with ``load_config`` or ``Config.from_dict``."""

    _prefix = ""
    method: str = _opt(None, "distillation method", required=True, choices=METHODS)
    output_dir: str = _opt("runs/distill", "folder for checkpoints, logs and config.yaml")
    seed: int = _opt(0, "random seed", ge=0, le=2**32 - 1)
    resume: Optional[str] = _opt(None, "null: start fresh; auto: continue from output_dir's last checkpoint if any; or a checkpoint path")
    overwrite: bool = _opt(
        False,
        "start a new run in an output_dir that holds one, deleting its checkpoints, log.jsonl, config.yaml and "
        "tensorboard/ first (refused otherwise, so two runs never mix)",
    )
    student: StudentConfig = _section(StudentConfig, "the trained network")
    teacher: TeacherConfig = _section(TeacherConfig, "the frozen teacher")
    adapter: AdapterConfig = _section(AdapterConfig, "Retro's adapter")
    loss: LossConfig = _section(LossConfig, "loss terms")
    data: DataConfig = _section(DataConfig, "training data")
    train: TrainConfig = _section(TrainConfig, "optimisation")
    eval: EvalConfig = _section(EvalConfig, "online k-NN monitor")
    log: LogConfig = _section(LogConfig, "logging")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpoints")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_section_types(self)
        _check_required(self, "")
        _check_queue(self)
        _check_teacher_given(self)
        _check_teacher_cache(self)
        _check_bn_splits(self)
        _check_monitor(self)
        _check_overwrite(self)

    @property
    def uses_teacher(self) -> bool:
        """Whether the method distils from ``teacher.checkpoint`` (moco_v2 does not)."""
        return self.method in TEACHER_METHODS

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict of every key (what a checkpoint stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], check_paths: bool = False, source: str = "") -> "Config":
        """Build and validate from a nested dict; missing keys take their defaults.

        ``check_paths`` is off by default: a config restored from a checkpoint
        must load on a machine without the original data folder.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a mapping of keys, got {d!r}")
        _check_keys(d, cls, "", source)
        cfg = _build(cls, d)
        if check_paths:
            validate_paths(cfg)
        return cfg


# --------------------------------------------------------------------------- coercion and field checks


@lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    """Resolved field types (the module uses postponed annotations)."""
    return get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Tuple[type, bool]:
    """``Optional[int]`` -> (int, True); ``int`` -> (int, False)."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _as_int(key: str, value: Any) -> int:
    """Integers, integral floats and their strings ("100", "1e5"); never booleans."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = _float_or_none(value)
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{key} must be an integer, got {value!r}")


def _float_or_none(text: str) -> Optional[float]:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _as_float(key: str, value: Any) -> float:
    """Numbers and numeric strings: YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        number = _float_or_none(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _as_str(key: str, value: Any) -> str:
    """Strings; numbers become their text (``output_dir: 2024``), other types are errors."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key} must be a string, got {value!r}")


_COERCE = {int: _as_int, float: _as_float, bool: _as_bool, str: _as_str}


def _check_scalar(key: str, value: Any, f: dataclasses.Field, tp: Any) -> Any:
    """Coerce ``value`` to the field's type, then check its choices and range."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional or f.metadata.get("required"):  # required: reported once by Config
            return None
        raise ConfigError(f"{key} must be {_TYPE_NAMES[base]}, got null")
    value = _COERCE[base](key, value)
    _check_choice(key, value, f.metadata.get("choices"))
    _check_range(key, value, f.metadata)
    return value


def _check_choice(key: str, value: Any, choices: Optional[Sequence[str]]) -> None:
    if choices is None or value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}{hint}")


_RANGE_RULES = (
    ("gt", ">", lambda v, b: v > b),
    ("ge", ">=", lambda v, b: v >= b),
    ("lt", "<", lambda v, b: v < b),
    ("le", "<=", lambda v, b: v <= b),
)


def _check_range(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    """Bounds from the field metadata; the message states every bound of the field."""
    bounds = [(sym, rules[name]) for name, sym, _ in _RANGE_RULES if name in rules]
    if all(ok(value, rules[name]) for name, _, ok in _RANGE_RULES if name in rules):
        return
    accepted = " and ".join(f"{sym} {bound}" for sym, bound in bounds)
    hint = f" ({rules['hint']})" if "hint" in rules else ""
    raise ConfigError(f"{key} must be {accepted}{hint}, got {value!r}")


# --------------------------------------------------------------------------- cross-field checks


def _check_section_types(cfg: Config) -> None:
    """Sections must be their dataclasses (a dict here means ``from_dict`` was bypassed)."""
    for f in dataclasses.fields(cfg):
        if _is_section(f) and not isinstance(getattr(cfg, f.name), f.metadata["section"]):
            raise ConfigError(f"{f.name} must be a {f.metadata['section'].__name__}; build configs with Config.from_dict")


def _check_required(obj: Any, prefix: str) -> None:
    """Keys with no default (method, data.train_dir, train.max_steps) must be set."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_section(f):
            _check_required(value, f"{prefix}{f.name}.")
        elif f.metadata.get("required") and value is None:
            key = prefix + f.name
            example = f"<one of {', '.join(f.metadata['choices'])}>" if "choices" in f.metadata else "..."
            raise ConfigError(f"missing required key '{key}': set it in the YAML file or override it with {key}={example}")


def _check_queue(cfg: Config) -> None:
    """MoCo asserts K % batch == 0: the queue is overwritten one global batch at a time."""
    queue, batch = cfg.loss.queue_size, cfg.train.batch_size
    if queue % batch:
        fit = -(-queue // batch) * batch
        raise ConfigError(
            f"loss.queue_size ({queue}) must be a multiple of the global batch size train.batch_size ({batch}), "
            f"as MoCo asserts (the queue is replaced one whole batch at a time); e.g. loss.queue_size={fit}"
        )


def _check_bn_splits(cfg: Config) -> None:
    splits, batch = cfg.train.bn_splits, cfg.train.batch_size
    if splits is not None and (batch % splits or batch // splits < 2):
        raise ConfigError(
            f"train.bn_splits={splits} must divide train.batch_size ({batch}) into sub-batches of at least 2 images; "
            "use a divisor of the batch, or null to choose automatically"
        )


def _check_monitor(cfg: Config) -> None:
    if bool(cfg.eval.knn_data) != bool(cfg.eval.every):
        given, missing = ("eval.knn_data", "eval.every=N") if cfg.eval.knn_data else ("eval.every", "eval.knn_data=FOLDER")
        raise ConfigError(f"the k-NN monitor needs both eval.knn_data and eval.every; {given} is set, so also set {missing}")


def _check_teacher_given(cfg: Config) -> None:
    if cfg.uses_teacher and not cfg.teacher.checkpoint:
        raise ConfigError(
            f"teacher.checkpoint is required for method {cfg.method!r}: set it to a self-supervised teacher file "
            "(e.g. the official moco_v2_800ep_pretrain.pth.tar) with teacher.checkpoint=PATH; only moco_v2 needs no teacher"
        )


def _check_teacher_cache(cfg: Config) -> None:
    """A cache holds embeddings of single views made with running BN statistics, for the methods that have a teacher."""
    cache = cfg.teacher.cache
    if cache is None:
        return
    if not cache.strip():
        raise ConfigError("teacher.cache is empty: give the folder tools/cache_teacher.py wrote, or null to run the teacher")
    if not cfg.uses_teacher:
        raise ConfigError(
            f"teacher.cache={cache} holds teacher embeddings, and method {cfg.method} has no teacher; "
            "set teacher.cache=null (or use seed, disco or retro)"
        )
    if cfg.teacher.bn_train_mode:
        raise ConfigError(
            f"teacher.cache={cache} cannot stand in for teacher.bn_train_mode=true: a teacher normalising with the "
            "statistics of each batch gives an image an embedding that depends on the rest of its batch (and on how "
            "the batch is split over processes), so it cannot be computed once; set teacher.cache=null or "
            "teacher.bn_train_mode=false"
        )


def _check_overwrite(cfg: Config) -> None:
    if cfg.overwrite and cfg.resume:
        raise ConfigError(
            f"overwrite=true starts a new run (deleting the one in output_dir) and resume={cfg.resume} continues one; "
            "set only one of them"
        )


def check_queue_against_data(cfg: Config, num_images: int, views: int) -> Optional[str]:
    """A warning when the queue outgrows the data set's images x views, an error far beyond it.

    A step enqueues one key per image of its batch, so a queue that long holds
    stale keys of the same images again as negatives; far beyond it, it only
    costs memory and checkpoint size (an 8-million queue on 40 images made
    4 GB checkpoints). Known only once the images are listed, so the engine
    calls this before it writes anything.
    """
    queue, limit = cfg.loss.queue_size, num_images * views
    if queue <= limit:
        return None
    what = f"loss.queue_size {queue} exceeds the data set's {num_images} images x {views} views = {limit}"
    fit = max(cfg.train.batch_size, limit // cfg.train.batch_size * cfg.train.batch_size)
    if queue > QUEUE_DATA_BOUND * limit and not cfg.loss.force_queue_size:
        raise ConfigError(
            f"{what} more than {QUEUE_DATA_BOUND} times over, so it holds each image many times and only makes "
            f"checkpoints large; use e.g. loss.queue_size={fit}, or set loss.force_queue_size=true to run it anyway"
        )
    return f"warning: {what}, so the queue holds some images more than once as negatives; e.g. loss.queue_size={fit} does not"


# --------------------------------------------------------------------------- timm names


def _check_timm_arch(arch: str) -> None:
    names = _timm_model_names()
    if arch in names:
        return
    close = _close_names(arch, names)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"student.arch {arch!r} is not a timm model name{hint}")


def _close_names(name: str, names: frozenset) -> List[str]:
    """Nearest timm names, ignoring case and -/_ (``EfficientNet-B0`` -> ``efficientnet_b0``)."""
    by_key = {n.lower().replace("-", "_"): n for n in sorted(names)}
    close = difflib.get_close_matches(name.lower().replace("-", "_"), list(by_key), n=3)
    return [by_key[c] for c in close]


@lru_cache(maxsize=1)
def _timm_model_names() -> frozenset:
    """The names ``timm.list_models()`` returns.

    timm (and with it torch, seconds) is imported here, when a student name is
    checked, and not when this module is: reading a config file, ``--help``
    and the other checks stay fast.
    """
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"student.arch needs timm, which is not importable: {err}") from err
    return frozenset(timm.list_models())


# --------------------------------------------------------------------------- keys and suggestions


@lru_cache(maxsize=1)
def _key_fields() -> Dict[str, dataclasses.Field]:
    """Every dotted key (sections and leaves) -> its dataclass field."""
    keys: Dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(Config):
        keys[f.name] = f
        if _is_section(f):
            for sub in dataclasses.fields(f.metadata["section"]):
                keys[f"{f.name}.{sub.name}"] = sub
    return keys


def _key_type(key: str) -> Any:
    section, _, name = key.rpartition(".")
    owner = _key_fields()[section].metadata["section"] if section else Config
    return _hints(owner)[name]


def valid_keys() -> List[str]:
    """All dotted leaf keys, in schema order (e.g. 'train.max_steps')."""
    return [k for k, f in _key_fields().items() if not _is_section(f)]


def describe_keys() -> List[str]:
    """One line per key: ``key = default  # doc``, for command-line help."""
    lines = []
    for key, f in _key_fields().items():
        if _is_section(f):
            continue
        default = "(required)" if f.metadata.get("required") else _yaml_text(f.default)
        lines.append(f"{key} = {default}  # {f.metadata['doc']}")
    return lines


def _yaml_text(value: Any) -> str:
    """A default as it would be written in YAML (null, true, 0.2, text)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _suggest(key: str) -> Optional[str]:
    """Nearest valid key: first among the siblings of ``key``, then anywhere, then by last component."""
    keys = list(_key_fields())
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    for pool in (siblings, keys):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    leaf = key.rpartition(".")[2]
    scored = [(difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio(), k) for k in keys]
    best = max(scored)
    return best[1] if best[0] >= 0.8 else None


#: Keys that no longer exist, with what replaced them: a config written for an
#: older version gets this line instead of a guess at the nearest key.
RETIRED_KEYS = {
    "loss.consistency_weight": "renamed loss.mse_weight (the same weight of the per-image MSE terms)",
    "loss.mse_reduction": (
        "removed: the consistency MSE is always the per-image mean; the released code's per-GPU sum over 32 images "
        "is loss.mse_weight=32 (mse_reduction=sum at B images a process: loss.mse_weight=B)"
    ),
}


def _unknown_key(key: str, source: str = "") -> ConfigError:
    where = f" (in {source})" if source else ""
    if key in RETIRED_KEYS:
        return ConfigError(f"{key} was {RETIRED_KEYS[key]}{where}")
    match = _suggest(key)
    if match:
        return ConfigError(f"unknown key {key!r}; did you mean {match!r}?{where}")
    parent = key.rpartition(".")[0]
    known = [k for k in _key_fields() if k.rpartition(".")[0] == parent] or [k for k in _key_fields() if "." not in k]
    return ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(known)}{where}")


def _check_keys(d: Mapping[str, Any], cls: type, prefix: str, source: str) -> None:
    """Reject unknown keys anywhere in a (possibly partial) config dict."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in d.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, source)
        if _is_section(fields[name]):
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{key!r} is a section: give a mapping of its keys (e.g. {key}.<key>: ...), got {value!r}")
            _check_keys(value or {}, fields[name].metadata["section"], f"{key}.", source)


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    """Instantiate ``cls`` from a key-checked dict; sections recursively."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            value = d[f.name]
            kwargs[f.name] = _build(f.metadata["section"], value or {}) if _is_section(f) else value
    return cls(**kwargs)


# --------------------------------------------------------------------------- YAML files and inheritance


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; the child wins, and a child's mapping merges into a base mapping."""
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse config file '{path}': {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _base_paths(path: Path, bases: Any) -> List[Path]:
    """``_base_`` is one path or a list, relative to the file that names it."""
    items = [bases] if isinstance(bases, str) else bases
    if not isinstance(items, list) or not all(isinstance(b, str) for b in items):
        raise ConfigError(f"_base_ in '{path}' must be a file name or a list of file names, got {bases!r}")
    return [path.parent / b for b in items]


def load_yaml(path: Union[str, Path], _chain: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """The merged raw dict of a YAML file and its ``_base_`` chain (bases in order, then the file).

    Keys are checked per file so that an unknown key names the file it is in.
    """
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases = _base_paths(path, data.pop(BASE_KEY)) if BASE_KEY in data else []
    _check_keys(data, Config, "", str(path))
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, load_yaml(base, (*_chain, real)))
    return _merge(merged, data)


# --------------------------------------------------------------------------- overrides


def _parse_override(text: str) -> Tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ("train.lr", value); values are YAML (null, numbers, bools, lists)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=100")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key.startswith("-"):
        raise ConfigError(f"override {text!r}: write key=value without leading dashes, e.g. {key.lstrip('-')}={raw}")
    if key not in _key_fields():
        raise _unknown_key(key, f"override {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if _key_type(key) in (str, Optional[str]) and value is not None and not isinstance(value, str):
        value = raw  # output_dir=2024, resume=yes: the text as typed, not YAML's int or bool
    return key, value


def apply_overrides(d: Mapping[str, Any], overrides: Optional[Sequence[str]]) -> Dict[str, Any]:
    """A copy of raw config dict ``d`` with ``key=value`` overrides applied in order."""
    out = copy.deepcopy(dict(d))
    for text in overrides or ():
        key, value = _parse_override(text)
        *sections, name = key.split(".")
        node = out
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node = node[section]
        node[name] = _merge(node[name], value) if isinstance(value, Mapping) and isinstance(node.get(name), Mapping) else value
    return out


# --------------------------------------------------------------------------- public entry points


def load_config(path: Union[str, Path], overrides: Optional[Sequence[str]] = None, check_paths: bool = True) -> Config:
    """Read a YAML config (with its ``_base_`` chain), apply overrides, validate everything.

    ``check_paths`` also checks the filesystem: the data folder holds images,
    the teacher checkpoint exists (seed/disco/retro) and so does ``resume``.
    """
    raw = apply_overrides(load_yaml(path), overrides)
    return Config.from_dict(raw, check_paths=check_paths, source=str(path))


def override(cfg: Config, overrides: Optional[Sequence[str]], check_paths: bool = False) -> Config:
    """A new validated config: ``cfg`` with ``key=value`` overrides (e.g. after restoring from a checkpoint)."""
    return Config.from_dict(apply_overrides(cfg.to_dict(), overrides), check_paths=check_paths)


def to_yaml(cfg: Config) -> str:
    """The full config as YAML that ``load_config`` reads back to an equal ``Config``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def dump_yaml(cfg: Config, path: Union[str, Path]) -> Path:
    """Write the full resolved config (no ``_base_``) to ``path``; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved distillation config (distill.config.dump_yaml); reload with load_config.\n"
    path.write_text(header + to_yaml(cfg), encoding="utf-8")
    return path


def validate_paths(cfg: Config) -> None:
    """Filesystem checks, run before a long job rather than failing inside it."""
    _check_train_dir(cfg.data.train_dir)
    if cfg.uses_teacher:
        _check_file("teacher.checkpoint", cfg.teacher.checkpoint, f"method {cfg.method} needs the frozen teacher's checkpoint")
    if cfg.teacher.cache:
        _check_teacher_cache_folder(cfg.teacher.cache)
    if cfg.resume not in (None, "auto"):
        _check_file("resume", cfg.resume, "use resume=auto to continue output_dir's run if there is one, or resume=null")
    if cfg.eval.knn_data:
        for split in ("train", "val"):
            if not (Path(cfg.eval.knn_data) / split).is_dir():
                raise ConfigError(
                    f"eval.knn_data '{cfg.eval.knn_data}' has no {split}/ folder; the k-NN monitor needs an ImageFolder "
                    "with train/<class>/ and val/<class>/ (e.g. data/shapes/classification)"
                )


def _check_file(key: str, value: str, advice: str) -> None:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"{key} '{value}' does not exist; {advice}")
    if not path.is_file():
        raise ConfigError(f"{key} '{value}' is not a file; {advice}")


def _check_teacher_cache_folder(value: str) -> None:
    advice = "build it with `python tools/cache_teacher.py --config CONFIG [key=value ...] --out FOLDER`, or set teacher.cache=null"
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"teacher.cache '{value}' is not a folder; {advice}")
    if not (path / TEACHER_CACHE_MANIFEST).is_file():
        raise ConfigError(f"teacher.cache '{value}' has no {TEACHER_CACHE_MANIFEST}, so it is not a teacher cache; {advice}")


def _check_train_dir(value: str) -> None:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"data.train_dir '{value}' does not exist; {TRAIN_DATA_HINT}")
    if not path.is_dir():
        raise ConfigError(f"data.train_dir '{value}' is not a directory; {TRAIN_DATA_HINT}")
    try:
        found = has_image(path, depth=1)
    except OSError as err:
        raise ConfigError(f"data.train_dir: cannot read '{value}': {err}") from err
    if not found:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise ConfigError(
            f"data.train_dir '{value}' contains no images ({exts}) directly or in class subfolders one level down; {TRAIN_DATA_HINT}"
        )


def check_adapter_widths(c_student: int, c_teacher: int, adapter_out: int) -> None:
    """Retro feeds the adapter's output into the teacher's frozen head; widths must agree.

    Known only once the networks are built, so the engine calls this.
    """
    for name, value in (("c_student", c_student), ("c_teacher", c_teacher), ("adapter_out", adapter_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive channel count, got {value!r}")
    if adapter_out != c_teacher:
        raise ConfigError(
            f"the adapter maps the student's {c_student} channels to {adapter_out}, but the teacher's projection head "
            f"takes {c_teacher} (the teacher's feature width); Retro reuses the teacher's head on the adapter output, "
            "so they must match: check teacher.arch (resnet18/34: 512, resnet50/101/152: 2048) against the teacher "
            "checkpoint, and adapter.kind"
        )
