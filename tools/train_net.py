#!/usr/bin/env python
"""Fine-tune a converted backbone in Detectron2 (Faster / Mask R-CNN) and evaluate it.

    python tools/train_net.py --config-file configs/detection/voc_frcnn_effb0.yaml MODEL.WEIGHTS student_d2.pkl
    python tools/train_net.py --config-file ... --num-gpus 8 [--resume] [--eval-only] [KEY VALUE ...]

Pascal VOC and COCO are read from $DETECTRON2_DATASETS (Detectron2's names:
voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train,
coco_2017_val); the shapes data from DATASETS.SHAPES_ROOT. VOC-layout data is
scored with Detectron2's PascalVOCDetectionEvaluator (AP, AP50, AP75), COCO
with COCOEvaluator.
"""

import os
import sys

from retro_transfer.cli import OneLineErrorParser, fail, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import default_setup, launch  # noqa: E402

from retro_transfer.d2.train import RetroTrainer as Trainer  # noqa: E402
from retro_transfer.d2 import (  # noqa: E402
    ConfigError,
    DatasetError,
    IncompatibleWeightsError,
    RetroCheckpointer,
    add_retro_config,
    check_config,
    check_datasets,
    register_shapes,
)


def parser() -> OneLineErrorParser:
    """Detectron2's usual flags (as ``default_argument_parser``), with one-line errors."""
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True, metavar="FILE", help="a YAML file in configs/detection/")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    p.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or the last checkpoint with --resume)"
    )
    p.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine (default %(default)s)")
    p.add_argument("--num-machines", type=int, default=1, help="machines (default %(default)s)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (default %(default)s)")
    p.add_argument(
        "--dist-url", default="auto", help="torch.distributed init URL; 'auto' picks a free local port (one machine)"
    )
    p.add_argument("opts", nargs="...", default=[], help="config overrides: KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")
    return p


def setup(args):
    """The config from file and overrides, checked, with its data sets registered and present."""
    if not os.path.isfile(args.config_file):
        fail(f"config file {args.config_file} not found")
    cfg = get_cfg()
    add_retro_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as err:
        fail(f"bad config ({args.config_file} {' '.join(args.opts)}): {err}")
    register_shapes(cfg.DATASETS.SHAPES_ROOT)
    try:
        check_config(cfg)
        check_datasets(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
    except (ConfigError, DatasetError) as err:
        fail(str(err))
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        fail(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} not found; make it with tools/convert_to_d2.py")
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    try:
        if args.eval_only:
            model = Trainer.build_model(cfg)
            RetroCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            return Trainer.test(cfg, model)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    except (ConfigError, IncompatibleWeightsError) as err:
        # ConfigError here: a backbone that cannot be built as configured (it names the key).
        fail(str(err))


def cli(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.num_machines > 1 and args.dist_url == "auto":
        p.error("--dist-url auto works on one machine; give tcp://HOST:PORT of machine 0 with --num-machines > 1")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
