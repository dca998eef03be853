"""Backbone weights in Detectron2's pickle format, and a checkpointer that checks them on load.

Two targets, one per kind of Detectron2 backbone:

``timm``
    ``build_timm_fpn_backbone`` (and its RetinaNet sibling). Tensors keep
    timm's names under the exact module path they have in Detectron2's model,
    ``backbone.bottom_up.body.<timm key>``, and ``matching_heuristics`` is off:
    loading is by exact name, so nothing can land in the wrong place.
``resnet``
    Detectron2's built-in ResNet (C4 and FPN), renamed as MoCo's converter
    does (METHOD.md, "Transfer"): ``conv1`` -> ``stem.conv1``, ``bn1`` ->
    ``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``,
    ``downsample.0/1`` -> ``shortcut`` / ``shortcut.norm``. The names carry no
    module path, because C4 keeps res5 in the ROI head and FPN in the backbone;
    Detectron2's ``matching_heuristics`` places them by suffix, so one file
    serves both.

The file also records what it holds (``retro_transfer``: arch, target,
source), which :class:`RetroCheckpointer` compares with the model it loads
into, so a file for the wrong architecture is an error, not a warning.
"""

import io
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock, build_resnet_backbone

from distill.common import DISTILL_FORMAT

from ..safe_io import CheckpointError, safe_load, save_atomic
from ..teacher_loading import RESNET_LAYOUTS
from ..convert import BackboneSource, ConversionError, check_complete
from .backbone import TimmBackbone, feature_levels
from .config import ConfigError
from .pickles import load_weights_pickle

TARGETS = ("timm", "resnet")
META_KEY = "retro_transfer"
AUTHOR = "retro-transfer"
TIMM_PREFIX = "backbone.bottom_up.body."

RESNET_DEPTHS = {arch: int(arch[len("resnet") :]) for _, arch in RESNET_LAYOUTS.items()}
_LAYOUT_OF = {arch: layout for layout, arch in RESNET_LAYOUTS.items()}
# Teachers go to Detectron2's ResNet (C4 or FPN, MoCo's recipe); smaller ResNets
# are students, which use the timm backbone with FPN (C4 would drop their res5).
DEFAULT_RESNET_TARGET = ("resnet50", "resnet101", "resnet152")


class IncompatibleWeightsError(Exception):
    """MODEL.WEIGHTS does not fit the model's backbone; the message says which config or file to use."""


@dataclass
class D2Weights:
    """A converted backbone: Detectron2 names -> tensors, and what the file says about it."""

    model: Dict[str, torch.Tensor]
    arch: str
    target: str
    source_format: str
    source: str

    @property
    def matching_heuristics(self) -> bool:
        return self.target == "resnet"

    def groups(self) -> Dict[str, int]:
        """Tensor counts by top module (``backbone.bottom_up.body.blocks``, ``res4``...) for the report."""
        if self.target == "timm":
            return dict(Counter(TIMM_PREFIX + k[len(TIMM_PREFIX) :].split(".", 1)[0] for k in self.model))
        return dict(Counter(k.split(".", 1)[0] for k in self.model))


# --------------------------------------------------------------------------- names


def choose_target(arch: str, target: str = "auto") -> str:
    """``auto``: ResNet-50/101/152 -> Detectron2's ResNet, everything else -> the timm backbone."""
    if target == "auto":
        return "resnet" if arch in DEFAULT_RESNET_TARGET else "timm"
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; choose auto, {', '.join(TARGETS)}")
    if target == "resnet" and arch not in RESNET_DEPTHS:
        raise ConversionError(
            f"--target resnet is Detectron2's built-in ResNet ({', '.join(RESNET_DEPTHS)}); {arch} is not one, "
            "use --target timm"
        )
    return target


_RESNET_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(.+)")


def resnet_to_d2(key: str) -> Optional[str]:
    """torchvision ResNet name -> Detectron2 ResNet name, or None for a name that is not a backbone's."""
    block = _RESNET_BLOCK.fullmatch(key)
    if block is None:
        stem = re.fullmatch(r"(conv1\.weight)|bn1\.(.+)", key)
        if stem is None:
            return None
        return "stem." + (stem[1] or "conv1.norm." + stem[2])
    stage, index, rest = int(block[1]) + 1, block[2], block[3]
    for pattern, repl in (
        (r"conv(\d)\.weight", r"conv\1.weight"),
        (r"bn(\d)\.(.+)", r"conv\1.norm.\2"),
        (r"downsample\.0\.weight", "shortcut.weight"),
        (r"downsample\.1\.(.+)", r"shortcut.norm.\1"),
    ):
        if re.fullmatch(pattern, rest):
            return f"res{stage}.{index}.{re.sub(pattern, repl, rest)}"
    return None


def target_state(arch: str, target: str) -> Dict[str, torch.Tensor]:
    """State dict (Detectron2 names) of a freshly built target backbone: the names and shapes to fill."""
    if target == "timm":
        try:
            levels = feature_levels(arch)
        except ConfigError as e:
            raise ConversionError(str(e)) from None
        backbone = TimmBackbone(arch, list(levels), norm="BN")
        return {TIMM_PREFIX + k[len("body.") :]: v for k, v in backbone.state_dict().items()}
    depth = RESNET_DEPTHS[arch]
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()


def to_detectron2(source: BackboneSource, target: str = "auto") -> D2Weights:
    """Rename ``source``'s backbone for ``target`` and check every tensor lands on a key of the same shape."""
    target = choose_target(source.arch, target)
    if target == "timm":
        renamed = {k: TIMM_PREFIX + k for k in source.state}
    else:
        renamed = {k: n for k in source.state if (n := resnet_to_d2(k)) is not None}
    check_complete(source, renamed, target_state(source.arch, target))
    model = {renamed[k]: v.detach().cpu() for k, v in source.state.items()}
    return D2Weights(model, source.arch, target, source.source_format, source.path)


# --------------------------------------------------------------------------- files


def _as_array(t: torch.Tensor):
    # Detectron2's model-zoo pickles hold numpy arrays; numpy has no bfloat16.
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def save_d2(weights: D2Weights, out: os.PathLike) -> None:
    """Write Detectron2's pickle format atomically: the old file or the new one, never half of one."""
    out = Path(out)
    obj = {
        "model": {k: _as_array(v) for k, v in weights.model.items()},
        "__author__": AUTHOR,
        "matching_heuristics": weights.matching_heuristics,
        META_KEY: {
            "arch": weights.arch,
            "target": weights.target,
            "source_format": weights.source_format,
            "source": weights.source,
        },
    }
    try:
        save_atomic(obj, out, dump=lambda o, f: pickle.dump(o, f, protocol=pickle.HIGHEST_PROTOCOL))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


# --------------------------------------------------------------------------- loading


def _bottom_up(model: nn.Module) -> Optional[nn.Module]:
    backbone = getattr(model, "backbone", None)
    return backbone.bottom_up if isinstance(backbone, FPN) else backbone


def _config_for(meta: Mapping) -> str:
    if meta.get("target") == "timm":
        return f"MODEL.BACKBONE.NAME build_timm_fpn_backbone with MODEL.TIMM.ARCH {meta.get('arch')}"
    depth = RESNET_DEPTHS.get(meta.get("arch"), "?")
    return f"Detectron2's ResNet with MODEL.RESNETS.DEPTH {depth} (C4 or FPN)"


def check_model_matches(model: nn.Module, meta: Mapping, path: str = "MODEL.WEIGHTS") -> None:
    """Refuse a converted file whose architecture or norm does not fit ``model``'s backbone."""
    bottom = _bottom_up(model)
    arch, target = meta.get("arch"), meta.get("target")
    holds = f"{path} holds {arch} weights converted for {_config_for(meta)}"
    if target == "timm":
        if not isinstance(bottom, TimmBackbone):
            raise IncompatibleWeightsError(f"{holds}, but the model's backbone is {type(bottom).__name__}")
        if bottom.arch != arch:
            raise IncompatibleWeightsError(
                f"{holds}, but the model is built with MODEL.TIMM.ARCH {bottom.arch}; use the config for {arch} "
                f"or convert a {bottom.arch} checkpoint"
            )
        norm = bottom.norm
    elif target == "resnet":
        if not isinstance(bottom, ResNet):
            raise IncompatibleWeightsError(f"{holds}, but the model's backbone is {type(bottom).__name__}")
        kind, blocks = _LAYOUT_OF[arch]
        model_kind = "bottleneck" if isinstance(bottom.stages[0][0], BottleneckBlock) else "basic"
        model_blocks = tuple(len(stage) for stage in bottom.stages)
        if model_kind != kind or model_blocks != blocks[: len(model_blocks)]:
            n = len(model_blocks)  # 3 stages in a C4 backbone (res5 is in the ROI head), 4 with FPN
            same = [a for (k, b), a in RESNET_LAYOUTS.items() if k == model_kind and b[:n] == model_blocks]
            model_arch = same[0] if same else "a different ResNet"
            raise IncompatibleWeightsError(
                f"{holds}, but the model's ResNet is {model_arch} ({model_kind} blocks {model_blocks}); "
                f"set MODEL.RESNETS.DEPTH {RESNET_DEPTHS[arch]} or convert a {model_arch} checkpoint"
            )
        norm = "GN" if any(isinstance(m, nn.GroupNorm) for m in bottom.modules()) else "BN"
    else:
        raise IncompatibleWeightsError(f"{path} names an unknown target {target!r}; convert it again")
    if norm == "GN":
        raise IncompatibleWeightsError(
            f"{path} holds BatchNorm statistics, which GroupNorm cannot use: loading it into a GN backbone would "
            "start from different features than the pretrained ones. Use NORM SyncBN (or BN / FrozenBN) for a "
            "pretrained backbone; GN is for training from scratch (MODEL.WEIGHTS '')"
        )


def _backbone_keys(model: nn.Module):
    """A predicate: is this model key part of the pretrained backbone that MODEL.WEIGHTS must fill?

    The bottom-up network (under FPN ``backbone.bottom_up.``, else
    ``backbone.``) and, for C4, the res5 blocks that live in the ROI head;
    not C4's extra norm (``roi_heads.res5.norm``, a new layer) and not
    BatchNorm's ``num_batches_tracked`` counters (FrozenBN has none).
    """
    prefix = "backbone.bottom_up." if isinstance(getattr(model, "backbone", None), FPN) else "backbone."
    res5_block = re.compile(r"roi_heads\.res5\.\d+\.")

    def is_backbone(key: str) -> bool:
        if key.endswith("num_batches_tracked"):
            return False
        return key.startswith(prefix) or res5_block.match(key) is not None

    return is_backbone


def _what_the_file_holds(checkpoint: Mapping, path: str) -> str:
    """Why a file fits nothing: the few words that tell a user which file they passed."""
    if checkpoint.get("format") == DISTILL_FORMAT:
        return (
            f"it is a retro-transfer distillation checkpoint, which must be converted first: "
            f"python tools/convert_to_d2.py {path} OUT.pkl, then MODEL.WEIGHTS OUT.pkl"
        )
    meta = checkpoint.get(META_KEY)
    if isinstance(meta, Mapping):
        return f"it is a {meta.get('arch')} backbone converted by tools/convert_to_d2.py, which fills the backbone only"
    model = checkpoint.get("model")
    keys = list(model)[:3] if isinstance(model, Mapping) else list(checkpoint)[:3]
    return f"its tensors are named like {', '.join(map(str, keys)) or '(none)'}"


def _check_holds_weights(checkpoint: Mapping, path: str) -> None:
    """Refuse a file whose ``model`` is not names -> arrays, before fvcore's "Unsupported type found in checkpoint".

    DetectionCheckpointer takes a file without a ``model`` entry as the model
    itself, so a teacher's ``.pth.tar`` ({"state_dict", "arch", ...}) or an
    MMSegmentation checkpoint ({"meta", "state_dict", ...}) arrives here whole.
    """
    model = checkpoint.get("model")
    if isinstance(model, Mapping) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in model.values()):
        return
    entries = ", ".join(repr(k) for k in list(model if isinstance(model, Mapping) else checkpoint)[:5])
    if isinstance(model, Mapping) and "meta" in model and "state_dict" in model:
        what = "an MMEngine (MMSegmentation, MMDetection) checkpoint"
    elif isinstance(model, Mapping) and "state_dict" in model:
        what = "a training checkpoint (a teacher's .pth.tar, say)"
    else:
        what = "not a Detectron2 weights file"
    raise CheckpointError(
        f"MODEL.WEIGHTS {path} is {what}, with entries {entries}, not Detectron2 weights; convert a teacher or "
        "student with `python tools/convert_to_d2.py FILE OUT.pkl` and pass MODEL.WEIGHTS OUT.pkl"
    )


class AtomicWrites:
    """An fvcore path manager whose files opened for writing reach the disk through ``save_atomic``.

    fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` open the target
    itself and write into it, so a full disk left a truncated
    ``model_final.pth`` (and an ``OSError`` traceback). Here the data is staged
    in memory and written when the file is closed: the old file or the whole
    new one, and a failed write is a one-line CheckpointError.
    """

    def __init__(self, path_manager) -> None:
        self._path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs):
        if not set(mode) & set("wax+"):
            return self._path_manager.open(path, mode, **kwargs)
        return _StagedFile(path)

    def __getattr__(self, name: str):
        return getattr(self._path_manager, name)


class _StagedFile(io.BytesIO):
    """What ``AtomicWrites.open`` returns: bytes (or text, as UTF-8) kept until the ``with`` block ends well."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def write(self, data) -> int:
        return super().write(data.encode() if isinstance(data, str) else data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                save_atomic(self.getvalue(), self.path, dump=lambda data, f: f.write(data))
        finally:
            self.close()


class RetroCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that reads files safely and refuses weights that leave the model partly random.

    * ``.pkl`` files are read with :func:`~retro_transfer.d2.pickles.load_weights_pickle`
      (no code runs), everything else with :func:`~retro_transfer.checkpoints.safe_load`;
      a file that is not weights is a one-line :class:`CheckpointError`.
    * Any file that leaves a backbone tensor at its random initialisation is
      refused, whatever its origin (an unconverted distillation checkpoint
      fills nothing): ``MODEL.WEIGHTS ""`` is how one asks for random init.
      ``complete=True`` (evaluation) refuses a file that leaves any tensor unset.
    * A file converted by this project (with the ``retro_transfer`` entry)
      must also be for the model's architecture and norm.
    """

    _path = "MODEL.WEIGHTS"

    def __init__(self, model, save_dir: str = "", *, complete: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.complete = complete
        self.path_manager = AtomicWrites(self.path_manager)  # model_final.pth whole or absent, never cut short

    def _load_file(self, filename):
        self._path = filename
        if filename.endswith(".pkl"):
            return _zoo_layout(load_weights_pickle(filename))
        if filename.endswith(".pyth"):
            return _pycls_layout(safe_load(filename), filename)
        return super()._load_file(filename)  # calls _torch_load, and reads matching_heuristics from the URL

    def _torch_load(self, f):
        return safe_load(f)

    def _load_model(self, checkpoint):
        _check_holds_weights(checkpoint, self._path)
        meta = checkpoint.get(META_KEY)
        if isinstance(meta, Mapping):
            check_model_matches(self.model, meta, self._path)
        holds = _what_the_file_holds(checkpoint, self._path)  # before loading pops "model"
        incompatible = super()._load_model(checkpoint)
        self._refuse_unfilled(incompatible, holds)
        return incompatible

    def _refuse_unfilled(self, incompatible, holds: str) -> None:
        """Raise if loading left tensors that must come from the file at their initial values."""
        must_fill = (lambda k: not k.endswith("num_batches_tracked")) if self.complete else _backbone_keys(self.model)
        left = [k for k in incompatible.missing_keys if must_fill(k)]  # shape mismatches are among them
        if not left:
            return
        total = sum(1 for k in self.model.state_dict() if must_fill(k))
        wrong = [f"{k} file {tuple(a)} vs model {tuple(b)}"
                 for k, a, b in incompatible.incorrect_shapes if must_fill(k)]
        what = "model" if self.complete else "backbone"
        fix = ("Evaluate a checkpoint of this model (OUTPUT_DIR/model_final.pth)" if self.complete else
               "Pass a file from tools/convert_to_d2.py for this backbone, or MODEL.WEIGHTS '' to train from random "
               "initialisation on purpose")
        raise IncompatibleWeightsError(
            f"MODEL.WEIGHTS {self._path} leaves {len(left)} of the {total} {what} tensors at random initialisation "
            f"(e.g. {', '.join(left[:4])})" + (f"; shape mismatches: {'; '.join(wrong[:3])}" if wrong else "")
            + f"; {holds}. {fix}"
        )


def _zoo_layout(data: dict) -> dict:
    """A ``.pkl``'s dict as ``DetectionCheckpointer`` arranges it (Detectron2, Detectron or Caffe2 model zoo)."""
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:  # Detectron detection models; ImageNet ones are the blobs themselves
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not str(k).endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def _pycls_layout(data: dict, path: str) -> dict:
    """A pycls ``.pyth`` checkpoint as ``DetectionCheckpointer`` arranges it."""
    if not isinstance(data.get("model_state"), Mapping):
        raise CheckpointError(f"{path}: a .pyth file is read as a pycls checkpoint and needs a 'model_state' entry")
    state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
    return {"model": state, "__author__": "pycls", "matching_heuristics": True}


def describe(weights: D2Weights, out: os.PathLike) -> List[str]:
    """How to use a converted file: the config keys that match it."""
    use = _config_for({"arch": weights.arch, "target": weights.target})
    lines = [f"wrote {out}: {len(weights.model)} tensors in Detectron2's format for {use}"]
    if weights.target == "resnet":
        lines.append("names match Detectron2's ResNet by suffix (matching_heuristics), for C4 and FPN alike")
    return lines
