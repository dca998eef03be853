"""Intervals for the pipeline's numbers: a bootstrap over validation images.

Small validation splits make every accuracy, AP and mIoU noisy, so each gets
a 95% percentile interval from resampling the validation images with
replacement, and a comparison between two models (evaluated on the same
images) is judged by the paired bootstrap of their difference: significant
when the difference's 95% interval excludes zero.

The statistics are recomputed from per-image pieces, so a resample costs a
sum, not a re-evaluation:

* accuracy: one 0/1 per image;
* VOC AP50: per image and class, the detections' scores with their
  true-positive flags (VOC matching at IoU 0.5, "difficult" objects ignored)
  and the number of positives (:func:`detection_pieces`);
* mIoU: per image, the intersection and union pixel counts of each class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic on the full validation set and its bootstrap interval (same units, e.g. %)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"

    def to_dict(self) -> Dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> Tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """``statistic(indices)`` on all ``n`` images, with the percentile interval over resampled index sets."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one validation image")
    values = np.array([statistic(idx) for idx in _resamples(n, resamples, seed)])
    return Estimate(statistic(np.arange(n)), *_interval(values))


def paired_difference(
    statistic_a: Callable[[np.ndarray], float], statistic_b: Callable[[np.ndarray], float], n: int,
    resamples: int = RESAMPLES, seed: int = 0,
) -> Estimate:
    """a - b on the same resampled images: the paired bootstrap of a difference."""
    samples = _resamples(n, resamples, seed)
    values = np.array([statistic_a(idx) - statistic_b(idx) for idx in samples])
    full = np.arange(n)
    return Estimate(statistic_a(full) - statistic_b(full), *_interval(values))


def significant(difference: Estimate) -> bool:
    """The difference's interval excludes zero."""
    return difference.low > 0 or difference.high < 0


# --------------------------------------------------------------------------- accuracy


def accuracy(correct: Sequence[bool]) -> Callable[[np.ndarray], float]:
    """Top-1 (%) of the images at ``indices``."""
    flags = np.asarray(correct, dtype=np.float64)
    return lambda idx: float(flags[idx].mean() * 100)


# --------------------------------------------------------------------------- detection: VOC AP50


@dataclass
class DetectionPieces:
    """Per image and class: detection scores, their true-positive flags, and the positives to find."""

    scores: List[List[np.ndarray]]  # [image][class] -> (D,)
    true_positive: List[List[np.ndarray]]  # [image][class] -> (D,) bool
    positives: np.ndarray  # (images, classes) non-difficult ground-truth objects


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with many, in VOC's inclusive pixel convention (+1 on each side)."""
    ix0, iy0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    ix1, iy1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0 + 1, 0, None) * np.clip(iy1 - iy0 + 1, 0, None)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return inter / (area + areas - inter)


def detection_pieces(
    predictions: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> DetectionPieces:
    """VOC matching, image by image, as Detectron2's ``PascalVOCDetectionEvaluator`` does it.

    ``predictions[i]`` = (boxes (D, 4), scores (D,), labels (D,)); ``ground_truth[i]`` =
    (boxes (G, 4), labels (G,), difficult (G,) bool); all boxes in VOC's 1-based
    inclusive pixel coordinates (the annotation files'; a model's 0-based box
    gets +1 on its top-left corner, as the evaluator writes it). Within an image, detections
    of a class are matched in decreasing score to the unmatched ground truth of
    highest IoU >= the threshold; a match to a difficult object counts as
    neither true nor false positive (VOC). Matching never crosses images, so
    this equals VOC's global matching restricted to each image.
    """
    scores, flags = [], []
    positives = np.zeros((len(ground_truth), num_classes), dtype=np.int64)
    for i, ((p_boxes, p_scores, p_labels), (g_boxes, g_labels, g_difficult)) in enumerate(zip(predictions, ground_truth)):
        image_scores, image_flags = [], []
        for c in range(num_classes):
            gt = g_boxes[g_labels == c]
            difficult = g_difficult[g_labels == c].astype(bool)
            positives[i, c] = int((~difficult).sum())
            mine = np.flatnonzero(p_labels == c)
            mine = mine[np.argsort(-p_scores[mine], kind="stable")]
            taken = np.zeros(len(gt), dtype=bool)
            keep_scores, keep_flags = [], []
            for d in mine:
                overlaps = _iou(p_boxes[d], gt) if len(gt) else np.zeros(0)
                best = int(np.argmax(overlaps)) if len(gt) else -1
                if best >= 0 and overlaps[best] > iou_threshold:  # strictly above, as VOC's code
                    if difficult[best]:
                        continue  # ignored
                    hit = not taken[best]
                    taken[best] = True
                else:
                    hit = False
                keep_scores.append(p_scores[d])
                keep_flags.append(hit)
            image_scores.append(np.asarray(keep_scores, dtype=np.float64))
            image_flags.append(np.asarray(keep_flags, dtype=bool))
        scores.append(image_scores)
        flags.append(image_flags)
    return DetectionPieces(scores, flags, positives)


def voc07_ap(tp: np.ndarray, npos: int) -> float:
    """VOC2007's 11-point interpolated AP of detections already sorted by decreasing score.

    A class with no positive object scores 0, as in Detectron2's evaluator
    (whose recall is then undefined), so that means over classes agree with it.
    """
    if npos == 0:
        return 0.0
    tp_cum = np.cumsum(tp)
    recall = tp_cum / npos
    precision = tp_cum / np.arange(1, len(tp) + 1)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        above = precision[recall >= t]
        ap += (above.max() if above.size else 0.0) / 11.0
    return float(ap)


def ap50(pieces: DetectionPieces) -> Callable[[np.ndarray], float]:
    """Mean over all classes of VOC07 AP50 (%) on the images at ``indices`` (repeats count again)."""
    num_classes = pieces.positives.shape[1]

    def statistic(idx: np.ndarray) -> float:
        aps = []
        for c in range(num_classes):
            scores = np.concatenate([pieces.scores[i][c] for i in idx])
            flags = np.concatenate([pieces.true_positive[i][c] for i in idx])
            order = np.argsort(-scores, kind="stable")
            aps.append(voc07_ap(flags[order], int(pieces.positives[idx, c].sum())))
        return float(np.mean(aps) * 100)

    return statistic


# --------------------------------------------------------------------------- segmentation: mIoU


def intersection_union(prediction: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts (intersection, union) of one image, ``ignore`` pixels left out (MMSeg's IoUMetric)."""
    valid = truth != ignore
    p, t = prediction[valid].astype(np.int64), truth[valid].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_t = np.bincount(t, minlength=num_classes)[:num_classes]
    return inter, area_p + area_t - inter


def miou(intersections: np.ndarray, unions: np.ndarray) -> Callable[[np.ndarray], float]:
    """mIoU (%) of the images at ``indices``: classes absent from them (union 0) are left out, as MMSeg does."""

    def statistic(idx: np.ndarray) -> float:
        inter, union = intersections[idx].sum(axis=0), unions[idx].sum(axis=0)
        present = union > 0
        return float((inter[present] / union[present]).mean() * 100) if present.any() else float("nan")

    return statistic


def compare(
    statistics: Dict[str, Callable[[np.ndarray], float]], n: int, reference: str, seed: int = 0
) -> Tuple[Dict[str, Estimate], Dict[str, Optional[Estimate]]]:
    """Each statistic with its interval, and its paired difference from ``reference`` (None for the reference)."""
    estimates = {name: bootstrap(fn, n, seed=seed) for name, fn in statistics.items()}
    differences = {
        name: None if name == reference else paired_difference(fn, statistics[reference], n, seed=seed)
        for name, fn in statistics.items()
    }
    return estimates, differences
