"""The ``mmcv.ops`` that two-stage detectors run, on torchvision's kernels (CPU and CUDA).

MMDetection's Faster and Mask R-CNN call four compiled mmcv ops: ``nms`` and
``batched_nms`` (RPN proposals, per-class detections), ``RoIAlign`` (box and
mask features; ``roi_align`` when cropping mask targets) and, in older
configs, ``RoIPool``. torchvision ships kernels with the same arithmetic, so
these wrappers only translate mmcv's signatures and return formats:

* ``nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1)``
  returns ``(dets, inds)``: ``dets`` is ``[x1, y1, x2, y2, score]`` of the kept
  boxes, highest score first, and ``inds`` index the *input* boxes (also when
  ``score_threshold`` removed some first). ``offset=1`` is the legacy
  "+1 pixel" area convention. numpy inputs give numpy outputs, as in mmcv.
* ``batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False)`` runs NMS
  within each class by shifting each class's boxes by ``idx * (max + 1)``,
  so boxes of different classes never overlap; with more boxes than
  ``nms_cfg['split_thr']`` (default 10000) it runs class by class instead.
  ``nms_cfg=None`` only sorts. Returns ``(dets, keep)`` like ``nms``.
* ``RoIAlign``/``roi_align``: rois are ``[batch_index, x1, y1, x2, y2]``;
  ``aligned=True`` shifts the box by half a pixel (pixel centres at +0.5);
  ``sampling_ratio=0`` samples ``ceil(roi_size / output_size)`` points per bin.
  Only ``pool_mode='avg'`` has a torchvision kernel; ``'max'`` raises.
* ``RoIPool``/``roi_pool``: Caffe's max pooling over rounded box cells.

What has no torchvision kernel raises :class:`CompiledOpMissing`, one line
naming the compiled mmcv.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torchvision.ops as tv_ops
from torch.nn.modules.utils import _pair

INSTALL_HINT = "install the full mmcv (with compiled ops, e.g. `pip install mmcv==2.1.0` built for your torch)"


class CompiledOpMissing(RuntimeError):
    """An ``mmcv.ops`` feature that only mmcv's compiled extension provides was used."""


def missing(what: str) -> CompiledOpMissing:
    return CompiledOpMissing(f"mmcv.ops {what} needs mmcv's compiled extension, which mmcv-lite lacks; "
                             f"retro-transfer's stand-in runs nms, batched_nms, RoIAlign (avg) and RoIPool only: "
                             f"{INSTALL_HINT}")


# ---------------------------------------------------------------------- NMS


def _nms_indices(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int) -> torch.Tensor:
    if offset not in (0, 1):
        raise ValueError(f"nms offset must be 0 or 1, got {offset}")
    if offset:
        # IoU with "+1" widths equals plain IoU of boxes one pixel wider and taller.
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    return tv_ops.nms(boxes.float(), scores.float(), float(iou_threshold))


def nms(boxes, scores, iou_threshold: float, offset: int = 0, score_threshold: float = 0,
        max_num: int = -1) -> Tuple[Union[torch.Tensor, np.ndarray], Union[torch.Tensor, np.ndarray]]:
    """mmcv's ``nms``: ``(dets, inds)``, highest score first; see the module docstring."""
    is_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.from_numpy(boxes) if is_numpy else boxes
    scores_t = torch.from_numpy(scores) if isinstance(scores, np.ndarray) else scores
    if boxes_t.size(1) != 4 or boxes_t.size(0) != scores_t.size(0):
        raise ValueError(f"nms takes boxes (N, 4) and scores (N,), got {tuple(boxes_t.shape)} and "
                         f"{tuple(scores_t.shape)}")
    candidates = torch.arange(boxes_t.size(0), device=boxes_t.device)
    if score_threshold > 0:
        candidates = torch.nonzero(scores_t > score_threshold, as_tuple=False).view(-1)
    inds = candidates[_nms_indices(boxes_t[candidates], scores_t[candidates], iou_threshold, offset)]
    if max_num > 0:
        inds = inds[:max_num]
    dets = torch.cat([boxes_t[inds], scores_t[inds].reshape(-1, 1).to(boxes_t.dtype)], dim=1)
    if is_numpy:
        return dets.cpu().numpy(), inds.cpu().numpy()
    return dets, inds


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, nms_cfg: Optional[dict],
                class_agnostic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmcv's ``batched_nms``: NMS within each ``idxs`` class; ``(dets, keep)``, highest score first."""
    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        return torch.cat([boxes[inds], scores[:, None]], -1), inds
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    nms_type = cfg.pop("type", "nms")
    if nms_type != "nms":
        raise missing(f"batched_nms with type={nms_type!r}")
    if boxes.size(-1) != 4:
        raise missing("batched_nms of rotated boxes")
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        # Shift each class by more than the largest coordinate: no two classes overlap.
        max_coordinate = boxes.max() if boxes.numel() else boxes.new_zeros(())
        offsets = idxs.to(boxes) * (max_coordinate + 1)
        boxes_for_nms = boxes + offsets[:, None]
    split_thr = cfg.pop("split_thr", 10000)
    if boxes_for_nms.shape[0] < split_thr:
        dets, keep = nms(boxes_for_nms, scores, **cfg)
        return torch.cat([boxes[keep], dets[:, -1:]], -1), keep
    max_num = cfg.pop("max_num", -1)
    kept = scores.new_zeros(scores.size(), dtype=torch.bool)
    kept_scores = scores.new_zeros(scores.size())
    for cls in torch.unique(idxs):
        members = torch.nonzero(idxs == cls, as_tuple=False).view(-1)
        dets, keep = nms(boxes_for_nms[members], scores[members], **cfg)
        kept[members[keep]] = True
        kept_scores[members[keep]] = dets[:, -1]
    keep = torch.nonzero(kept, as_tuple=False).view(-1)
    ordered, order = kept_scores[keep].sort(descending=True)
    keep = keep[order]
    if max_num > 0:
        keep, ordered = keep[:max_num], ordered[:max_num]
    return torch.cat([boxes[keep], ordered[:, None]], -1), keep


# ---------------------------------------------------------------------- RoI pooling


def _check_rois(rois: torch.Tensor) -> None:
    if rois.dim() != 2 or rois.size(1) != 5:
        raise ValueError(f"rois must be (K, 5) rows of [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}")


def roi_align(input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = 0, pool_mode: str = "avg", aligned: bool = True) -> torch.Tensor:
    """mmcv's ``roi_align`` (average of bilinear samples per bin); ``pool_mode='max'`` needs compiled mmcv."""
    if pool_mode != "avg":
        if pool_mode == "max":
            raise missing("roi_align with pool_mode='max'")
        raise ValueError(f"roi_align pool_mode must be 'avg' or 'max', got {pool_mode!r}")
    _check_rois(rois)
    return tv_ops.roi_align(input, rois.to(input.dtype), _pair(output_size), float(spatial_scale),
                            int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """mmcv's ``RoIAlign`` module (the layer MMDetection's RoI extractors build by name)."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, pool_mode: str = "avg",
                 aligned: bool = True, use_torchvision: bool = False) -> None:
        super().__init__()
        if pool_mode == "max":
            raise missing("RoIAlign with pool_mode='max'")
        if pool_mode != "avg":
            raise ValueError(f"RoIAlign pool_mode must be 'avg' or 'max', got {pool_mode!r}")
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision  # always true here; kept for mmcv's attribute

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.pool_mode,
                         self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode}, aligned={self.aligned}")


def roi_pool(input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float = 1.0) -> torch.Tensor:
    """mmcv's ``roi_pool``: max over each cell of the box rounded to the feature grid."""
    _check_rois(rois)
    return tv_ops.roi_pool(input, rois.to(input.dtype), _pair(output_size), float(spatial_scale))


class RoIPool(nn.Module):
    """mmcv's ``RoIPool`` module."""

    def __init__(self, output_size, spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


def unavailable(name: str) -> type:
    """A stand-in for the compiled op ``name``: importable, subclassable, raising when built or called.

    A class rather than a function because MMDetection subclasses some of
    these at import time (``class DeformConv2dPack(DeformConv2d)``); creating
    an instance, which is also what calling a function-like op does, raises.
    """

    def __new__(cls, *args, **kwargs):
        raise missing(name if cls.__name__ == name else f"{name} (through {cls.__name__})")

    return type(name, (nn.Module,), {"__new__": __new__, "__module__": "mmcv.ops",
                                     "__doc__": f"Stand-in for mmcv.ops.{name}: needs the compiled mmcv."})
