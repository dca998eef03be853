"""The report's intervals: bootstrap, paired differences, and the per-image AP50 / mIoU they resample.

AP50 and mIoU recomputed from per-image pieces must equal Detectron2's VOC
evaluator and MMSeg's IoUMetric on the same predictions: the intervals are
only worth something around the numbers the evaluators report.
"""

import numpy as np
import pytest
import torch

from retro_transfer.pipeline import stats


def test_bootstrap_interval_of_an_accuracy_covers_it_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.7
    large = rng.random(2000) < 0.7
    e_small = stats.bootstrap(stats.accuracy(small), len(small))
    e_large = stats.bootstrap(stats.accuracy(large), len(large))
    for e, flags in ((e_small, small), (e_large, large)):
        assert e.value == pytest.approx(flags.mean() * 100)
        assert e.low < e.value < e.high
    assert (e_large.high - e_large.low) < (e_small.high - e_small.low) / 3
    # The binomial standard error at n = 2000 is ~1 point: the 95% interval is ~4 points wide.
    assert 2.5 < e_large.high - e_large.low < 6


def test_paired_difference_is_significant_only_outside_the_noise():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.6
    same_but_noisy = base ^ (rng.random(400) < 0.05)  # 5% of answers flipped both ways
    better = base | (rng.random(400) < 0.5)  # fixes half of the mistakes
    noise = stats.paired_difference(stats.accuracy(same_but_noisy), stats.accuracy(base), 400)
    gain = stats.paired_difference(stats.accuracy(better), stats.accuracy(base), 400)
    assert not stats.significant(noise)
    assert stats.significant(gain) and gain.value > 10


def test_voc07_ap_by_hand():
    # 2 positives; ranked detections: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # 11-point: recall >= 0..0.5 (6 points) max precision 1; recall 0.6..1.0 (5 points) max precision 2/3.
    ap = stats.voc07_ap(np.array([True, False, True]), npos=2)
    assert ap == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    assert stats.voc07_ap(np.array([], dtype=bool), npos=3) == 0.0
    assert stats.voc07_ap(np.array([False]), npos=0) == 0.0  # as Detectron2: no positive, AP 0


def _synthetic_detections(seed, images=30, classes=3):
    """Ground truth with difficult objects, and noisy detections around it plus false alarms."""
    rng = np.random.default_rng(seed)
    truth, predictions = [], []
    for _ in range(images):
        g = rng.integers(1, 4)
        x0, y0 = rng.uniform(1, 60, (2, g))
        w, h = rng.uniform(8, 30, (2, g))
        boxes = np.round(np.stack([x0, y0, x0 + w, y0 + h], 1))
        labels = rng.integers(0, classes, g)
        difficult = rng.random(g) < 0.15
        truth.append((boxes, labels, difficult.astype(int)))
        jitter = np.round(boxes + rng.normal(0, 3, boxes.shape), 1)
        alarms = rng.integers(0, 3)
        a0 = rng.uniform(1, 60, (alarms, 2))
        fake = np.round(np.concatenate([a0, a0 + 15], 1), 1)
        p_boxes = np.concatenate([jitter, fake]).reshape(-1, 4)
        p_labels = np.concatenate([np.where(rng.random(g) < 0.8, labels, rng.integers(0, classes, g)), rng.integers(0, classes, alarms)])
        p_scores = np.round(rng.uniform(0.05, 1.0, len(p_boxes)), 3)
        predictions.append((p_boxes, p_scores, p_labels))
    return predictions, truth


def test_ap50_from_pieces_equals_detectron2_voc_eval(tmp_path):
    """Detectron2's voc_eval reads the annotation XML and the detection files the VOC evaluator writes."""
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval

    names = ["a", "b", "c"]
    predictions, truth = _synthetic_detections(0)
    ids = [f"{i:04d}" for i in range(len(truth))]
    (tmp_path / "Annotations").mkdir()
    for image_id, (boxes, labels, difficult) in zip(ids, truth):
        objects = "".join(
            f"<object><name>{names[l]}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin>"
            f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox><truncated>0</truncated><pose>x</pose></object>"
            for b, l, d in zip(boxes, labels, difficult)
        )
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (tmp_path / "set.txt").write_text("\n".join(ids) + "\n")
    expected = []
    for c, name in enumerate(names):
        lines = [f"{image_id} {s:.3f} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}"
                 for image_id, (bs, ss, ls) in zip(ids, predictions) for b, s, l in zip(bs, ss, ls) if l == c]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
        _, _, ap = voc_eval(str(tmp_path / "{}.txt"), str(tmp_path / "Annotations" / "{}.xml"), str(tmp_path / "set.txt"),
                            name, ovthresh=0.5, use_07_metric=True)
        expected.append(ap * 100)
    pieces = stats.detection_pieces(predictions, truth, len(names))
    assert stats.ap50(pieces)(np.arange(len(ids))) == pytest.approx(np.mean(expected), abs=1e-6)
    # A resample with repeats counts a repeated image twice (its objects and detections).
    twice = stats.ap50(pieces)(np.concatenate([np.arange(len(ids)), np.arange(len(ids))]))
    assert twice == pytest.approx(np.mean(expected), abs=1e-6)


def test_miou_from_per_image_counts_equals_mmseg_iou_metric():
    from mmseg.evaluation import IoUMetric

    rng = np.random.default_rng(2)
    classes = 4
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [str(c) for c in range(classes)]}
    inter, union = [], []
    for _ in range(6):
        truth = rng.integers(0, classes - 1, (16, 16))  # class 3 never appears in the truth
        truth[rng.random((16, 16)) < 0.1] = 255
        pred = np.where(rng.random((16, 16)) < 0.7, truth, rng.integers(0, classes, (16, 16)))
        pred[pred == 255] = 0
        i, u = stats.intersection_union(pred, truth, classes)
        inter.append(i)
        union.append(u)
        metric.process([], [{"pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
                            "gt_sem_seg": {"data": torch.from_numpy(truth)[None]}}])
    expected = metric.compute_metrics(metric.results)["mIoU"]
    assert stats.miou(np.array(inter), np.array(union))(np.arange(6)) == pytest.approx(expected, abs=0.01)
