#!/usr/bin/env python
"""Train (or evaluate) an MMDetection 3.x detector on a distilled student with MMEngine's Runner.

    python tools/train_det.py CONFIG [--data-root DIR] [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]
    python tools/train_det.py CONFIG --eval-only [--checkpoint CHECKPOINT]

CONFIG is one of configs/mmdet/*.py, by path or by name
(``shapes_faster_rcnn_r18``). Set the converted student with
``--cfg-options model.backbone.init_cfg.checkpoint=STUDENT_OPENMMLAB.pth``
(tools/convert_to_openmmlab.py), or ``model.backbone.init_cfg=None`` for random
initialisation. ``--data-root DIR`` points every dataset (and a COCO
evaluator's annotation file) at DIR; folders, annotation files and images are
checked before the run starts. ``--resume`` alone continues from the latest
checkpoint in the work dir (default ``work_dirs/<config name>``), or from the
file given. ``--eval-only`` tests a checkpoint (default: the latest in the work
dir) and prints the metrics as JSON, as tools/test_det.py does. For several
GPUs: ``torchrun --nproc_per_node=N tools/train_det.py CONFIG --launcher pytorch``
(the student's BatchNorms become SyncBN then).
"""

import sys

from retro_transfer.cli import OneLineErrorParser, add_runner_train_arguments, config_file, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=config_file("mmdet"),
                        help="an MMDetection config: a path, or a name in configs/mmdet/ (voc_faster_rcnn_effb0)")
    add_runner_train_arguments(parser, "model.backbone.init_cfg.checkpoint=student_openmmlab.pth")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retro_transfer.compat.detection_ops import CompiledOpMissing
    from retro_transfer.mmdet import launch
    from retro_transfer.mmseg.launch import train_or_evaluate

    return train_or_evaluate(args, launch, errors=(CompiledOpMissing,))


if __name__ == "__main__":
    sys.exit(main())
