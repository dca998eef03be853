"""The mmcv.ops stand-in's detection ops against mmcv's documented semantics, written out as plain loops.

Each reference below follows mmcv's definition of the op (its docstrings and
CPU kernels' arithmetic), not torchvision's code, so a wrapper that passed the
wrong flag or coordinate convention to torchvision fails here. Float results
are compared within bounds written next to the assertions.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from retro_transfer.compat import mmcv_ops
from retro_transfer.compat.detection_ops import CompiledOpMissing

mmcv_ops.install()
import mmcv.ops  # noqa: E402  (the stand-in: mmcv-lite has no compiled ops)

pytestmark = pytest.mark.skipif(not getattr(mmcv.ops, "__retro_transfer_stand_in__", False),
                                reason="a compiled mmcv is installed: its own ops are used, not the stand-in")


def boxes_and_scores(n: int, seed: int, size: float = 50.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 1
    scores = torch.randperm(n, generator=gen).float() / n + 0.01  # distinct: the order is defined
    return torch.cat([xy, xy + wh], 1), scores


def iou(a, b, offset=0):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
    inter = w * h
    area = lambda r: (r[2] - r[0] + offset) * (r[3] - r[1] + offset)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def reference_nms(boxes, scores, thr, offset=0):
    """Greedy NMS: in decreasing score, keep a box unless its IoU with a kept one exceeds ``thr``."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        if all(iou(boxes[i].tolist(), boxes[k].tolist(), offset) <= thr for k in kept):
            kept.append(i)
    return kept


# ---------------------------------------------------------------------- nms


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_keeps_what_greedy_nms_keeps_and_returns_dets_with_input_indices(offset):
    boxes, scores = boxes_and_scores(60, seed=offset)
    dets, inds = mmcv.ops.nms(boxes, scores, 0.4, offset=offset)
    assert inds.tolist() == reference_nms(boxes, scores, 0.4, offset)
    assert dets.shape == (len(inds), 5)
    torch.testing.assert_close(dets, torch.cat([boxes[inds], scores[inds, None]], 1), rtol=0, atol=0)


def test_nms_score_threshold_and_max_num_index_the_original_boxes():
    boxes, scores = boxes_and_scores(60, seed=3)
    dets, inds = mmcv.ops.nms(boxes, scores, 0.5, score_threshold=0.5, max_num=5)
    above = [i for i in range(60) if scores[i] > 0.5]
    kept = [above[k] for k in reference_nms(boxes[above], scores[above], 0.5)][:5]
    assert inds.tolist() == kept and len(kept) == 5


def test_nms_takes_and_returns_numpy():
    boxes, scores = boxes_and_scores(20, seed=4)
    dets, inds = mmcv.ops.nms(boxes.numpy(), scores.numpy(), 0.5)
    assert isinstance(dets, np.ndarray) and isinstance(inds, np.ndarray)
    assert inds.tolist() == reference_nms(boxes, scores, 0.5)


def test_batched_nms_suppresses_only_within_a_class():
    boxes, scores = boxes_and_scores(80, seed=5)
    labels = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(5))
    dets, keep = mmcv.ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.3))
    expected = []
    for c in range(3):
        members = torch.nonzero(labels == c).view(-1)
        expected += members[reference_nms(boxes[members], scores[members], 0.3)].tolist()
    expected.sort(key=lambda i: -float(scores[i]))
    assert keep.tolist() == expected
    torch.testing.assert_close(dets, torch.cat([boxes[keep], scores[keep, None]], 1), rtol=0, atol=0)
    # The per-class loop used above split_thr gives the same answer; class_agnostic suppresses across classes.
    _, split_keep = mmcv.ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.3, split_thr=10))
    assert split_keep.tolist() == expected
    _, agnostic = mmcv.ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.3), class_agnostic=True)
    assert agnostic.tolist() == reference_nms(boxes, scores, 0.3)


def test_batched_nms_without_a_config_only_sorts():
    boxes, scores = boxes_and_scores(10, seed=6)
    dets, keep = mmcv.ops.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.long), None)
    assert keep.tolist() == sorted(range(10), key=lambda i: -float(scores[i]))


def test_soft_nms_needs_the_compiled_mmcv():
    boxes, scores = boxes_and_scores(10, seed=7)
    with pytest.raises(CompiledOpMissing, match="compiled"):
        mmcv.ops.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.long), dict(type="soft_nms", iou_threshold=0.3))


# ---------------------------------------------------------------------- RoIAlign / RoIPool


def bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """mmcv's bilinear read: 0 outside [-1, H] x [-1, W], coordinates clamped into the map otherwise."""
    channels, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(channels)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
            + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])


def reference_roi_align(features, rois, out, scale, sampling_ratio, aligned):
    """mmcv's RoIAlign (avg): each bin averages grid x grid bilinear samples at the sub-cell centres."""
    result = np.zeros((len(rois), features.shape[1], out, out))
    shift = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_x, start_y = x1 * scale - shift, y1 * scale - shift
        w, h = (x2 - x1) * scale, (y2 - y1) * scale
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        bin_w, bin_h = w / out, h / out
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(w / out)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(h / out)
        count = max(grid_w * grid_h, 1)
        for ph in range(out):
            for pw in range(out):
                total = np.zeros(features.shape[1])
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += bilinear(features[int(b)], y, x)
                result[r, :, ph, pw] = total / count
    return result


def rois_for(batch: int, seed: int, size: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(6, 2, generator=gen) * size * 0.7 - 2  # some start left of / above the map
    wh = torch.rand(6, 2, generator=gen) * size * 0.5 + 0.3  # some narrower than a pixel
    index = torch.randint(0, batch, (6, 1), generator=gen).float()
    return torch.cat([index, xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_mmcv_semantics(aligned, sampling_ratio):
    features = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(8))
    rois = rois_for(2, seed=9, size=40)
    layer = mmcv.ops.RoIAlign(output_size=3, spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    got = layer(features, rois)
    want = reference_roi_align(features.numpy().astype(np.float64), rois, 3, 0.25, sampling_ratio, aligned)
    # Each output is an average of float32 bilinear blends of values ~N(0, 1) (|v| < 6): float32 rounding
    # of a few dozen such terms stays far below 1e-4.
    assert np.abs(got.numpy() - want).max() < 1e-4
    assert layer.output_size == (3, 3)  # MMDetection's RoI extractors read it
    functional = mmcv.ops.roi_align(features, rois, (3, 3), 0.25, sampling_ratio, "avg", aligned)
    assert torch.equal(functional, got)  # the same kernel call on the same inputs


def test_roi_align_max_mode_needs_the_compiled_mmcv():
    with pytest.raises(CompiledOpMissing, match="pool_mode='max'.*compiled|compiled"):
        mmcv.ops.RoIAlign(7, pool_mode="max")


def reference_roi_pool(features, rois, out, scale):
    """Caffe's RoIPool: the box rounded to the grid, split into out x out cells, max of each (0 if empty)."""
    _, channels, height, width = features.shape
    result = np.zeros((len(rois), channels, out, out))
    half_up = lambda v: math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)  # noqa: E731  (C's round)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sx, sy, ex, ey = (half_up(v * scale) for v in (x1, y1, x2, y2))
        w, h = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
        for ph in range(out):
            for pw in range(out):
                hs = min(max(math.floor(ph * h / out) + sy, 0), height)
                he = min(max(math.ceil((ph + 1) * h / out) + sy, 0), height)
                ws = min(max(math.floor(pw * w / out) + sx, 0), width)
                we = min(max(math.ceil((pw + 1) * w / out) + sx, 0), width)
                if he > hs and we > ws:
                    result[r, :, ph, pw] = features[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return result


def test_roi_pool_matches_caffe_semantics():
    features = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(10))
    rois = rois_for(2, seed=11, size=40)
    got = mmcv.ops.RoIPool(output_size=2, spatial_scale=0.25)(features, rois)
    want = reference_roi_pool(features.numpy(), rois, 2, 0.25)
    assert np.array_equal(got.numpy(), want.astype(np.float32))  # a max picks an input value: no rounding


# ---------------------------------------------------------------------- the rest of mmcv.ops


def test_other_ops_import_and_subclass_but_raise_one_line_when_used():
    from mmcv.ops import DeformConv2d, MultiScaleDeformableAttention
    from mmcv.ops.carafe import CARAFEPack

    class Pack(DeformConv2d):  # as mmcv/mmdet do at import time
        pass

    for op in (DeformConv2d, MultiScaleDeformableAttention, CARAFEPack, Pack):
        with pytest.raises(CompiledOpMissing) as error:
            op(4, 4, 3)
        assert "\n" not in str(error.value) and "compiled" in str(error.value) and "mmcv" in str(error.value)


def test_mmdetection_imports_on_mmcv_lite_in_a_fresh_interpreter():
    code = ("import retro_transfer.mmdet, mmdet.models, mmseg.models, mmcv.ops as ops; "
            "from mmcv.ops.nms import batched_nms; "
            "assert callable(ops.nms) and ops.batched_nms is batched_nms and ops.RoIAlign.__module__.startswith('retro')")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_compiled_mmcv_wins(monkeypatch):
    monkeypatch.setattr(mmcv_ops, "compiled_mmcv_available", lambda: True)
    finder = mmcv_ops.MmcvOpsStandInFinder()
    assert finder.find_spec("mmcv.ops") is None and finder.find_spec("mmcv.ops.nms") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ops_run_on_cuda_as_on_the_cpu():
    boxes, scores = boxes_and_scores(60, seed=12)
    labels = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(12))
    cfg = dict(type="nms", iou_threshold=0.4)
    cpu = mmcv.ops.batched_nms(boxes, scores, labels, cfg)[1]
    gpu = mmcv.ops.batched_nms(boxes.cuda(), scores.cuda(), labels.cuda(), cfg)[1]
    assert gpu.is_cuda and gpu.cpu().tolist() == cpu.tolist()
    features = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(13))
    rois = rois_for(2, seed=14, size=40)
    for layer in (mmcv.ops.RoIAlign(3, 0.25, 2), mmcv.ops.RoIPool(3, 0.25)):
        on_gpu = layer(features.cuda(), rois.cuda()).cpu()
        # Bilinear blends of values ~N(0, 1) summed in another order: float32 rounding, far below 1e-4.
        assert (on_gpu - layer(features, rois)).abs().max().item() < 1e-4
