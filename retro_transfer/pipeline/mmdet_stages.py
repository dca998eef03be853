"""The pipeline's MMDetection stages (``--preset full``): Faster R-CNN on shapes from the Retro student and from random init.

They run ``tools/train_det.py``'s path (:mod:`retro_transfer.mmdet.launch`) on
the config ``shapes_faster_rcnn_effb0`` with the converted student the
``convert_retro`` stage wrote (the same file MMSeg reads). Scored by
MMDetection's own ``VOCMetric`` (VOC2007 11-point AP50); each test image's
detections and ground truth are kept, so that the report gives AP50 a
bootstrap interval and the Retro - random difference a paired one, exactly as
for the Detectron2 stages (:func:`retro_transfer.pipeline.stats.ap50` equals
VOCMetric on the same detections: tests/test_mmdet.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from .downstream import PER_IMAGE, _evidence, _finite, cfg_options, mmseg_weights_file, train_openmmlab
from .runner import Context, Stage, ToolCall, read_json, save_json
from .upstream import data_dir

MMDET_CONFIG = "configs/mmdet/shapes_faster_rcnn_effb0.py"
MMDET_INITS = ("retro", "random")
METRIC = "PerImageVOCMetric"


def _options(ctx: Context, init: str) -> Dict:
    """``--cfg-options`` for a stage: the preset's iterations, batch, learning rate, image side and seed."""
    p = ctx.preset
    iters, side = p["mmdet_iters"], p["image_side"]
    scale = (2 * side, side)
    options = {
        "train_cfg.max_iters": iters,
        "train_cfg.val_interval": iters,  # evaluated once, at the end of training
        # Scored by VOCMetric (VOC2007 11-point AP50) in place of the COCO layout's CocoMetric, as the
        # Detectron2 stages are by PascalVOCDetectionEvaluator.
        "val_evaluator._delete_": True, "val_evaluator.type": "VOCMetric", "val_evaluator.eval_mode": "11points",
        "param_scheduler.0.end": max(1, iters // 10),
        "param_scheduler.1.end": iters,
        "param_scheduler.1.milestones": [int(iters * 0.75)],
        "default_hooks.checkpoint.interval": iters,
        "default_hooks.logger.interval": max(1, iters // 10),
        "train_dataloader.batch_size": p["det_batch"],
        "optim_wrapper.optimizer.lr": p["det_lr"],
        "randomness.seed": p["seed"],
    }
    # The config initialises the backbone from init_cfg (type Pretrained); random init drops it.
    if init == "random":
        options["model.backbone.init_cfg"] = None
    else:
        options["model.backbone.init_cfg.checkpoint"] = str(mmseg_weights_file(ctx, init))
    for i in (0, 1):
        options[f"train_dataloader.dataset.datasets.{i}.pipeline.2.scale"] = scale
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        options[f"{loader}.num_workers"] = p["workers"]
    for loader in ("val_dataloader", "test_dataloader"):
        options[f"{loader}.dataset.pipeline.1.scale"] = scale
    return options


def _register_per_image_voc() -> str:
    """A VOCMetric that also keeps each image's detections and ground truth; returns its type name."""
    from mmdet.evaluation import VOCMetric
    from mmdet.registry import METRICS

    class PerImageVOCMetric(VOCMetric):
        def compute_metrics(self, results):
            self.per_image = results
            self.last_metrics = super().compute_metrics(results)
            return self.last_metrics

    METRICS.register_module(name=METRIC, module=PerImageVOCMetric, force=True)
    return METRIC


def _image_record(ann: Dict, dets: List[np.ndarray]) -> Dict:
    """One image as the per-image AP50 reads it: predictions by class, truth with ignored objects as difficult."""
    labels = np.concatenate([np.full(len(d), c) for c, d in enumerate(dets)]) if dets else np.zeros(0)
    stacked = np.concatenate(dets) if dets else np.zeros((0, 5))
    truth_boxes = np.concatenate([ann["bboxes"].reshape(-1, 4), ann["bboxes_ignore"].reshape(-1, 4)])
    return {"boxes": stacked[:, :4].tolist(), "scores": stacked[:, 4].tolist(), "labels": labels.astype(int).tolist(),
            "truth": {"boxes": truth_boxes.tolist(),
                      "labels": np.concatenate([ann["labels"], ann["labels_ignore"]]).astype(int).tolist(),
                      "difficult": [0] * len(ann["labels"]) + [1] * len(ann["labels_ignore"])}}


def _call(init: str):
    def call(ctx: Context, folder: Path) -> ToolCall:
        return ToolCall("tools/train_det.py", [MMDET_CONFIG, "--data-root", data_dir(ctx), "--work-dir", folder, "--cfg-options",
                                               *cfg_options(_options(ctx, init))],
                        note="the stage also keeps each image's detections")

    return call


def _detect(init: str):
    def run(ctx: Context, folder: Path, call: ToolCall) -> Dict:
        from retro_transfer.mmdet import launch

        runner = train_openmmlab(call, launch, _register_per_image_voc())
        voc = runner.val_evaluator.metrics[0]
        images = [_image_record(ann, dets) for ann, dets in voc.per_image]
        save_json({"classes": list(voc.dataset_meta["classes"]), "images": images}, folder / PER_IMAGE)
        for checkpoint in folder.glob("iter_*.pth"):
            checkpoint.unlink()  # the metrics are the output; keep the disk small
        return {"init": init, "iters": runner.max_iters, "AP50": _finite(voc.last_metrics["AP50"]) * 100}

    return run


def mmdet_stages(preset: Dict) -> List[Stage]:
    """The stages, when the preset asks for them (``mmdet_iters``)."""
    if not preset.get("mmdet_iters"):
        return []
    stages = []
    for init in MMDET_INITS:
        deps = ("data",) + ((f"convert_{init}",) if init != "random" else ())
        stages.append(Stage(f"mmdet_{init}", _call(init), _detect(init), deps=deps,
                            title=f"MMDetection Faster R-CNN on shapes-COCO from {init} initialisation"))
    return stages


def mmdet_evidence(out: Path, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per initialisation: VOCMetric's AP50 with its bootstrap interval, and the paired difference from random."""
    from . import stats

    statistics, n = {}, None
    for init in MMDET_INITS:
        folder = out / f"mmdet_{init}"
        if folder.name not in records or not (folder / PER_IMAGE).exists():
            continue
        data = read_json(folder / PER_IMAGE)
        images = data["images"]  # the test set's order, the same for every initialisation
        predictions = [(np.array(i["boxes"], dtype=np.float64).reshape(-1, 4), np.array(i["scores"]),
                        np.array(i["labels"])) for i in images]
        truth = [(np.array(i["truth"]["boxes"], dtype=np.float64).reshape(-1, 4), np.array(i["truth"]["labels"]),
                  np.array(i["truth"]["difficult"])) for i in images]
        statistics[init] = stats.ap50(stats.detection_pieces(predictions, truth, len(data["classes"])))
        n = len(images)
    return _evidence(statistics, n, {init: records[f"mmdet_{init}"]["metrics"]["AP50"] for init in statistics})


def mmdet_sections(out: Path, records: Dict[str, Dict]) -> List[str]:
    """The report's MMDetection table, when the stages ran."""
    from .report import difference_text, markdown_table

    rows = [records[f"mmdet_{i}"]["metrics"] for i in MMDET_INITS if f"mmdet_{i}" in records]
    if not rows:
        return []
    evidence = mmdet_evidence(out, records)
    n = next(iter(evidence.values()))["num_images"] if evidence else None
    lines = ["## Detection with MMDetection (Faster R-CNN FPN, shapes-COCO test)", "",
             f"Fine-tuned for {rows[0]['iters']} iterations with tools/train_det.py's code path; MMDetection's VOCMetric "
             "(VOC2007 11-point AP50)." + (f" Brackets: 95% bootstrap intervals over the {n} test images; the last "
                                          "column is the paired bootstrap of the difference from random initialisation."
                                          if n else ""), ""]
    lines += markdown_table(["initialisation", "AP50", "AP50 vs random"],
                            [[m["init"], str(evidence[m["init"]]["value"]) if m["init"] in evidence else f"{m['AP50']:.2f}",
                              difference_text(evidence.get(m["init"], {}).get("vs_random"))] for m in rows])
    return ["\n".join(lines)]
