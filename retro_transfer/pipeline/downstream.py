"""Pipeline stages after distillation: convert students, fine-tune detection and segmentation, draw predictions.

Each downstream task is fine-tuned three times at the same budget: from the
Retro student, from the MoCo-v2-alone student (the baseline) and from random
initialisation, so the report shows what the distilled weights are worth.

As upstream, each stage is its tool's command line (``tools/convert_to_d2.py``,
``tools/train_net.py``, ``tools/train_seg.py``), run in this process through
the tool's own parser and code, plus what the report needs and the tool does
not keep: each test image's predictions, and a drawing of a few.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from retro_transfer.convert import read_backbone

from .runner import Context, Stage, ToolCall, read_json, save_json
from .settings import SettingsError
from .upstream import data_dir, student_file

TRANSFERRED = ("retro", "moco_v2")
INITS = TRANSFERRED + ("random",)
DETECTION_CONFIG = "configs/detection/shapes_frcnn_effb0.yaml"
MASK_RCNN_CONFIG = "configs/detection/shapes_mrcnn_effb0.yaml"


def d2_weights_file(ctx: Context, method: str) -> Path:
    return ctx.folder(f"convert_{method}") / "student_d2.pkl"


def mmseg_weights_file(ctx: Context, method: str) -> Path:
    return ctx.folder(f"convert_{method}") / "student_mmseg.pth"


# -- conversion -----------------------------------------------------------------------------


def _convert_calls(method: str):
    def calls(ctx: Context, folder: Path) -> Tuple[ToolCall, ToolCall]:
        ckpt = student_file(ctx, method)
        return (ToolCall("tools/convert_to_d2.py", [ckpt, d2_weights_file(ctx, method)]),
                ToolCall("tools/convert_to_mmseg.py", [ckpt, mmseg_weights_file(ctx, method)]))

    return calls


def _convert(ctx: Context, folder: Path, calls: Tuple[ToolCall, ToolCall]) -> Dict:
    """Both tools, then the tensor counts the report states (the conversions redone on their own arguments)."""
    from retro_transfer.d2.weights import to_detectron2
    from retro_transfer.mmseg.conversion import to_mmseg

    for call in calls:
        call.main(folder)
    d2_args, mmseg_args = (call.parse() for call in calls)
    source = read_backbone(d2_args.input, arch=d2_args.arch)
    _, converted, mmseg_source = to_mmseg(read_backbone(mmseg_args.input, mmseg_args.arch))
    return {"arch": source.arch, "d2_tensors": sum(to_detectron2(source, d2_args.target).groups().values()),
            "mmseg_tensors": sum(converted.values()), "dropped_tensors": sum(mmseg_source.dropped.values())}


# -- detection ------------------------------------------------------------------------------


def _detection_opts(ctx: Context, folder: Path, init: str, iters_key: str) -> List[str]:
    """Detectron2 overrides for a stage: weights of ``init``, the preset's sizes, ``iters_key`` iterations."""
    p = ctx.preset
    iters = p[iters_key]
    weights = str(d2_weights_file(ctx, init)) if init != "random" else ""
    side = p["image_side"]
    return [
        "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(folder), "DATASETS.SHAPES_ROOT", str(data_dir(ctx)),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)},)",
        "SOLVER.WARMUP_ITERS", str(max(1, iters // 10)), "SOLVER.IMS_PER_BATCH", str(p["det_batch"]),
        "SOLVER.BASE_LR", str(p["det_lr"]), "SOLVER.CHECKPOINT_PERIOD", str(iters * 10),
        "INPUT.MIN_SIZE_TRAIN", f"({side},)", "INPUT.MAX_SIZE_TRAIN", str(2 * side),
        "INPUT.MIN_SIZE_TEST", str(side), "INPUT.MAX_SIZE_TEST", str(2 * side),
        "DATALOADER.NUM_WORKERS", str(p["workers"]), "SEED", str(p["seed"]),
    ]


def _finite(value: float) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else 0.0


def _draw_detections(model, cfg, folder: Path, count: int = 4) -> Path:
    """The first test images with predicted boxes (score >= 0.5) and class names, side by side."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image, ImageDraw

    name = cfg.DATASETS.TEST[0]
    classes = MetadataCatalog.get(name).thing_classes
    panels = []
    model.eval()
    for record in DatasetCatalog.get(name)[:count]:
        image = Image.open(record["file_name"]).convert("RGB")
        # The model takes the config's format (RGB) as a CHW tensor at its own size.
        tensor = torch.as_tensor(np.asarray(image).copy()).permute(2, 0, 1)
        with torch.no_grad():
            instances = model([{"image": tensor, "height": image.height, "width": image.width}])[0]["instances"]
        draw = ImageDraw.Draw(image)
        for box, score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(), instances.pred_classes.tolist()):
            if score >= 0.5:
                draw.rectangle(box, outline=(255, 255, 0), width=1)
                draw.text((box[0] + 1, box[1]), f"{classes[label]} {score:.2f}", fill=(255, 255, 0))
        panels.append(image.resize((image.width * 2, image.height * 2)))
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width
    path = folder / "predictions.png"
    sheet.save(path)
    return path


PER_IMAGE = "per_image.json"


def read_voc_objects(xml_path: Path, classes) -> Dict[str, list]:
    """Ground truth of one VOC annotation file: 1-based inclusive boxes, class indices, difficult flags."""
    import xml.etree.ElementTree as ET

    boxes, labels, difficult = [], [], []
    for obj in ET.parse(xml_path).findall("object"):
        box = obj.find("bndbox")
        boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(list(classes).index(obj.find("name").text))
        flag = obj.find("difficult")
        difficult.append(int(flag.text) if flag is not None else 0)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


def _per_image_collector():
    """A Detectron2 evaluator that keeps each test image's detections (VOC coordinates) beside the real one."""
    from detectron2.evaluation import DatasetEvaluator

    class PerImageDetections(DatasetEvaluator):
        def reset(self):
            self.images = []

        def process(self, inputs, outputs):
            for record, output in zip(inputs, outputs):
                instances = output["instances"].to("cpu")
                boxes = instances.pred_boxes.tensor.numpy().copy()
                boxes[:, :2] += 1  # as PascalVOCDetectionEvaluator writes them: VOC's 1-based corner,
                # boxes to 0.1 px and scores to 3 decimals, so that AP50 here is its AP50
                self.images.append({"image_id": record["image_id"], "boxes": np.round(boxes, 1).tolist(),
                                    "scores": np.round(instances.scores.numpy(), 3).tolist(),
                                    "labels": instances.pred_classes.tolist()})

        def evaluate(self):
            return None

    return PerImageDetections()


def _train_net_call(config: str, init: str, iters_key: str):
    def call(ctx: Context, folder: Path) -> ToolCall:
        return ToolCall("tools/train_net.py", ["--config-file", config, *_detection_opts(ctx, folder, init, iters_key)])

    return call


def _train_detectron2(call: ToolCall, evaluator=None):
    """What ``call`` (tools/train_net.py on one process) does, in this one: its config and checks, Detectron2's
    seeding, training and the final test; ``evaluator`` runs beside the config's own. Returns config, trainer, results.

    The tool's ``default_setup`` also gives Detectron2's loggers a file in
    OUTPUT_DIR, which in one process would pile up handlers stage after stage
    (each stage's log in every earlier stage's file); of it, only the seeding
    bears on the numbers, and that is done here the same way. The console is
    the tool's quiet one.
    """
    from detectron2.evaluation import DatasetEvaluators
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from retro_transfer.d2.train import RetroTrainer, quiet_detectron2_console

    args = call.parse()
    cfg = call.tool().configure(args)
    quiet_detectron2_console(None)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())

    class Trainer(RetroTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            own = RetroTrainer.build_evaluator(cfg, dataset_name)
            return own if evaluator is None else DatasetEvaluators([own, evaluator])

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    # DefaultTrainer.test unwraps the per-data-set level when there is one test set.
    results = results if "bbox" in results else next(iter(results.values()))
    return cfg, trainer, results


def _detect(init: str):
    def run(ctx: Context, folder: Path, call: ToolCall) -> Dict:
        from detectron2.data import MetadataCatalog

        collector = _per_image_collector()
        cfg, trainer, results = _train_detectron2(call, collector)
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        for image in collector.images:
            image["truth"] = read_voc_objects(Path(meta.dirname) / "Annotations" / f"{image['image_id']}.xml", meta.thing_classes)
        save_json({"classes": list(meta.thing_classes), "images": collector.images}, folder / PER_IMAGE)
        _draw_detections(trainer.model, cfg, folder)
        (folder / "model_final.pth").unlink(missing_ok=True)  # the metrics are the output; keep the disk small
        bbox = results["bbox"]
        return {"init": init, "iters": cfg.SOLVER.MAX_ITER, "AP": _finite(bbox["AP"]), "AP50": _finite(bbox["AP50"]),
                "AP75": _finite(bbox["AP75"])}

    return run


def _mask_rcnn(init: str):
    """Mask R-CNN on the shapes data's COCO annotations: box and mask AP from COCOEvaluator."""

    def run(ctx: Context, folder: Path, call: ToolCall) -> Dict:
        cfg, _, results = _train_detectron2(call)
        (folder / "model_final.pth").unlink(missing_ok=True)  # the metrics are the output; keep the disk small
        metrics = {"init": init, "iters": cfg.SOLVER.MAX_ITER}
        for task, prefix in (("bbox", "box"), ("segm", "mask")):
            for name in ("AP", "AP50", "AP75"):
                metrics[f"{prefix}_{name}"] = _finite(results[task][name])
        return metrics

    return run


# -- segmentation ---------------------------------------------------------------------------

SEGMENTATION_CONFIG = "configs/segmentation/shapes_fcn_effb0.py"


def _segmentation_options(ctx: Context, folder: Path, init: str) -> Dict:
    p = ctx.preset
    iters = p["seg_iters"]
    voc = str(data_dir(ctx) / "VOC2007")
    options = {
        "train_cfg.max_iters": iters,
        "train_cfg.val_interval": iters,  # validated once, at the end of training
        "param_scheduler.0.end": iters,
        "default_hooks.checkpoint.interval": iters,
        "default_hooks.logger.interval": max(1, iters // 10),
        "train_dataloader.batch_size": p["seg_batch"],
        "randomness.seed": p["seed"],
    }
    # The configs initialise the backbone from init_cfg (type Pretrained); random init drops it.
    if init == "random":
        options["model.backbone.init_cfg"] = None
    else:
        options["model.backbone.init_cfg.checkpoint"] = str(mmseg_weights_file(ctx, init))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        options[f"{loader}.dataset.data_root"] = voc
        options[f"{loader}.num_workers"] = p["workers"]
    return options


def _draw_segmentation(runner, folder: Path, count: int = 4) -> Path:
    """Image | ground truth | prediction for the first validation images, in VOC colours."""
    import torch
    from mmengine.dataset import pseudo_collate
    from PIL import Image

    from retro_transfer.data.shapes import voc_palette

    palette = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    dataset = runner.val_dataloader.dataset
    rows = []
    runner.model.eval()
    for index in range(min(count, len(dataset))):
        with torch.no_grad():
            sample = runner.model.test_step(pseudo_collate([dataset[index]]))[0]
        image = np.asarray(Image.open(sample.img_path).convert("RGB"))
        truth = sample.gt_sem_seg.data[0].cpu().numpy().astype(np.int64)
        pred = sample.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)
        size = (image.shape[1], image.shape[0])
        panels = [image] + [np.asarray(Image.fromarray(palette[m % 256]).resize(size, Image.NEAREST)) for m in (truth, pred)]
        rows.append(np.concatenate(panels, axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    path = folder / "predictions.png"
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)
    return path


def _register_per_image_iou() -> str:
    """An IoUMetric that also keeps each image's per-class intersection and union; returns its type name."""
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS

    class PerImageIoUMetric(IoUMetric):
        def compute_metrics(self, results):
            self.per_image = [(r[0].cpu().numpy().tolist(), r[1].cpu().numpy().tolist()) for r in results]
            self.last_metrics = super().compute_metrics(results)
            return self.last_metrics

    METRICS.register_module(name="PerImageIoUMetric", module=PerImageIoUMetric, force=True)
    return "PerImageIoUMetric"


def cfg_options(options: Mapping) -> List[str]:
    """``--cfg-options`` arguments of OpenMMLab tools: ``key=value``, a tuple or list written without spaces."""
    return [f"{k}={str(v).replace(' ', '') if isinstance(v, (list, tuple)) else v}" for k, v in options.items()]


def _segment_call(init: str):
    def call(ctx: Context, folder: Path) -> ToolCall:
        return ToolCall("tools/train_seg.py", [SEGMENTATION_CONFIG, "--work-dir", folder, "--cfg-options",
                                               *cfg_options(_segmentation_options(ctx, folder, init))],
                        note="the stage also keeps each image's intersection and union")

    return call


def train_openmmlab(call: ToolCall, toolbox, metric_type: str):
    """What ``call`` (tools/train_seg.py or train_det.py, training) does, in this process; returns the Runner.

    The config's validation metric becomes ``metric_type``, its subclass that
    also keeps each image's results (the same numbers); the run validates
    once, at its last iteration, as the tool's does. ``--amp`` and ``--resume``
    are applied as the tool applies them (:func:`retro_transfer.mmseg.launch.prepare_training`).
    """
    from retro_transfer.mmseg.launch import prepare_training

    args = call.parse()
    cfg = toolbox.load_config(args.config, args.cfg_options, args.work_dir, args.launcher, args.data_root)
    cfg.val_evaluator.type = metric_type
    prepare_training(args, cfg, toolbox)
    return toolbox.train(cfg)


def _segment(init: str):
    def run(ctx: Context, folder: Path, call: ToolCall) -> Dict:
        from retro_transfer.mmseg import launch

        runner = train_openmmlab(call, launch, _register_per_image_iou())
        iou = runner.val_evaluator.metrics[0]
        save_json({"classes": list(iou.dataset_meta["classes"]), "intersection": [i for i, _ in iou.per_image],
                   "union": [u for _, u in iou.per_image]}, folder / PER_IMAGE)
        _draw_segmentation(runner, folder)
        for checkpoint in folder.glob("iter_*.pth"):
            checkpoint.unlink()  # the metrics are the output; keep the disk small
        metrics = iou.last_metrics
        return {"init": init, "iters": runner.max_iters, "mIoU": _finite(metrics["mIoU"]), "aAcc": _finite(metrics["aAcc"])}

    return run


def transfer_inits(preset: Mapping) -> Tuple[str, ...]:
    """The initialisations a preset fine-tunes from: its ``transfer_from`` students (comma-separated), then random."""
    students = tuple(m for m in preset.get("transfer_from", ",".join(TRANSFERRED)).split(",") if m)
    unknown = [m for m in students if m not in TRANSFERRED]
    if unknown:
        raise SettingsError(f"transfer_from={preset['transfer_from']}: no student {', '.join(unknown)}; choose from {', '.join(TRANSFERRED)}")
    return students + ("random",)


def downstream_stages(preset: Dict) -> List[Stage]:
    """Conversion, then each task from each of the preset's initialisations (Mask R-CNN only where mrcnn_iters is set)."""
    stages = []
    inits = transfer_inits(preset)
    for method in inits[:-1]:
        stages.append(Stage(f"convert_{method}", _convert_calls(method), _convert,
                            deps=(f"distill_{method}",), title=f"convert the {method} student to Detectron2 and MMSeg"))
    for init in inits:
        deps = ("data",) + ((f"convert_{init}",) if init != "random" else ())
        stages.append(Stage(f"det_{init}", _train_net_call(DETECTION_CONFIG, init, "det_iters"), _detect(init), deps=deps,
                            title=f"Faster R-CNN on shapes-VOC from {init} initialisation"))
    for init in inits:
        deps = ("data",) + ((f"convert_{init}",) if init != "random" else ())
        stages.append(Stage(f"seg_{init}", _segment_call(init), _segment(init), deps=deps,
                            title=f"FCN segmentation on shapes-VOC from {init} initialisation"))
    if preset.get("mrcnn_iters"):  # off unless a preset asks for it
        for init in inits:
            deps = ("data",) + ((f"convert_{init}",) if init != "random" else ())
            stages.append(Stage(f"mrcnn_{init}", _train_net_call(MASK_RCNN_CONFIG, init, "mrcnn_iters"), _mask_rcnn(init), deps=deps,
                                title=f"Mask R-CNN on shapes-COCO from {init} initialisation"))
    return stages


def _per_image_of(out: Path, records: Dict[str, Dict], task: str) -> Dict[str, Dict]:
    """The saved per-image pieces of each finished ``<task>_<init>`` stage, by initialisation."""
    stages = {init: out / f"{task}_{init}" for init in INITS}
    return {init: read_json(folder / PER_IMAGE) for init, folder in stages.items()
            if folder.name in records and (folder / PER_IMAGE).exists()}


def detection_evidence(out: Path, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per initialisation: VOC07 AP50 with its interval, and the paired difference from random init."""
    from . import stats

    statistics, n = {}, None
    for init, data in _per_image_of(out, records, "det").items():
        images = sorted(data["images"], key=lambda image: image["image_id"])  # the same order for every init
        predictions = [(np.array(i["boxes"], dtype=np.float64).reshape(-1, 4), np.array(i["scores"]), np.array(i["labels"]))
                       for i in images]
        truth = [(np.array(i["truth"]["boxes"], dtype=np.float64).reshape(-1, 4), np.array(i["truth"]["labels"]),
                  np.array(i["truth"]["difficult"])) for i in images]
        statistics[init] = stats.ap50(stats.detection_pieces(predictions, truth, len(data["classes"])))
        n = len(images)
    # The point estimates are Detectron2's own AP50; the intervals come from the per-image recomputation,
    # which equals it up to the order of detections whose rounded scores tie.
    return _evidence(statistics, n, {init: records[f"det_{init}"]["metrics"]["AP50"] for init in statistics})


def segmentation_evidence(out: Path, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per initialisation: mIoU with its interval, and the paired difference from random init."""
    from . import stats

    statistics, n = {}, None
    for init, data in _per_image_of(out, records, "seg").items():
        statistics[init] = stats.miou(np.array(data["intersection"]), np.array(data["union"]))
        n = len(data["intersection"])
    return _evidence(statistics, n, {init: records[f"seg_{init}"]["metrics"]["mIoU"] for init in statistics})


def _evidence(statistics: Dict, n, official: Dict[str, float]) -> Dict[str, Dict]:
    """Bootstrap intervals around the evaluator's ``official`` numbers, and paired differences from random init."""
    from . import stats

    if not statistics:
        return {}
    reference = "random" if "random" in statistics else None
    evidence = {}
    for init, fn in statistics.items():
        interval = stats.bootstrap(fn, n)
        difference = None
        if reference not in (None, init):
            d = stats.paired_difference(fn, statistics[reference], n)
            difference = stats.Estimate(official[init] - official[reference], d.low, d.high)
        evidence[init] = {"value": stats.Estimate(official[init], interval.low, interval.high), "num_images": n,
                          "vs_random": difference}
    return evidence


def _with_interval(evidence: Dict, init: str, fallback: float) -> str:
    return str(evidence[init]["value"]) if init in evidence else f"{fallback:.2f}"


def downstream_sections(out: Path, records: Dict[str, Dict], det_evidence: Dict = None, seg_evidence: Dict = None) -> List[str]:
    """Markdown for the report: one table per task (with intervals), and the drawn predictions."""
    from .report import difference_text, markdown_table

    det_evidence = detection_evidence(out, records) if det_evidence is None else det_evidence
    seg_evidence = segmentation_evidence(out, records) if seg_evidence is None else seg_evidence
    sections = []
    det = [records[f"det_{i}"]["metrics"] for i in INITS if f"det_{i}" in records]
    if det:
        n = next(iter(det_evidence.values()))["num_images"] if det_evidence else None
        lines = ["## Detection (Faster R-CNN FPN, shapes-VOC test)", "",
                 f"Fine-tuned for {det[0]['iters']} iterations from each initialisation; PascalVOCDetectionEvaluator "
                 "(AP over IoU 0.5:0.95, AP50, AP75; VOC2007 11-point)."
                 + (f" AP50 brackets: 95% bootstrap intervals over the {n} test images; the last column is the paired "
                    "bootstrap of the AP50 difference from random initialisation." if n else ""), ""]
        rows = [[m["init"], m["AP"], _with_interval(det_evidence, m["init"], m["AP50"]), m["AP75"],
                 difference_text(det_evidence.get(m["init"], {}).get("vs_random"))] for m in det]
        lines += markdown_table(["initialisation", "AP", "AP50", "AP75", "AP50 vs random"], rows)
        lines += [""] + [f"![{i} detections](det_{i}/predictions.png) `{i}`" for i in INITS if f"det_{i}" in records]
        sections.append("\n".join(lines))
    masks = [records[f"mrcnn_{i}"]["metrics"] for i in INITS if f"mrcnn_{i}" in records]
    if masks:
        lines = ["## Instance segmentation (Mask R-CNN FPN, shapes-COCO test)", "",
                 f"Fine-tuned for {masks[0]['iters']} iterations from each initialisation; COCOEvaluator box and mask AP.", ""]
        lines += markdown_table(["initialisation", "box AP", "box AP50", "mask AP", "mask AP50"],
                                [[m["init"], m["box_AP"], m["box_AP50"], m["mask_AP"], m["mask_AP50"]] for m in masks])
        sections.append("\n".join(lines))
    seg = [records[f"seg_{i}"]["metrics"] for i in INITS if f"seg_{i}" in records]
    if seg:
        n = next(iter(seg_evidence.values()))["num_images"] if seg_evidence else None
        lines = ["## Semantic segmentation (FCN, shapes-VOC val)", "",
                 f"Fine-tuned for {seg[0]['iters']} iterations from each initialisation; MMSeg's IoUMetric."
                 + (f" mIoU brackets: 95% bootstrap intervals over the {n} validation images; the last column is the "
                    "paired bootstrap of the mIoU difference from random initialisation." if n else ""), ""]
        rows = [[m["init"], _with_interval(seg_evidence, m["init"], m["mIoU"]), m["aAcc"],
                 difference_text(seg_evidence.get(m["init"], {}).get("vs_random"))] for m in seg]
        lines += markdown_table(["initialisation", "mIoU", "aAcc", "mIoU vs random"], rows)
        lines += [""] + [f"![{i} segmentation](seg_{i}/predictions.png) `{i}`" for i in INITS if f"seg_{i}" in records]
        sections.append("\n".join(lines))
    return sections
