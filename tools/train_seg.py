#!/usr/bin/env python
"""Train (or evaluate) an MMSegmentation model on a distilled student with MMEngine's Runner.

    python tools/train_seg.py CONFIG [--data-root DIR] [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]
    python tools/train_seg.py CONFIG --eval-only [--checkpoint CHECKPOINT]

CONFIG is one of configs/segmentation/*.py, by path or by name
(``shapes_fcn_r18``); ``--data-root DIR`` points every data loader at DIR
(each folder, split file and mask is checked before the run starts). Set the
converted student with
``--cfg-options model.backbone.init_cfg.checkpoint=STUDENT_MMSEG.pth`` (see
tools/convert_to_mmseg.py). ``--resume`` alone continues from the latest
checkpoint in the work dir (default ``work_dirs/<config name>``), or from the
file given. ``--eval-only`` tests a checkpoint (default: the latest in the work
dir) and prints the metrics as JSON, as tools/test_seg.py does. The console
leaves out MMEngine's start-up report, which the work dir's log keeps;
``--verbose`` shows it. For several
GPUs: ``torchrun --nproc_per_node=N tools/train_seg.py CONFIG --launcher pytorch``
(BatchNorm becomes SyncBN then; one process keeps plain BN).

A .py config is Python code and is run as such (as in MMSegmentation): use only
Python configs you trust. A .yaml/.yml/.json config, and every _base_ it names
in those formats, is read as data only: a Python tag in it is refused.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, add_runner_train_arguments, config_file, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=config_file("segmentation"),
                        help="an MMSeg config: a path, or a name in configs/segmentation/ (voc_deeplabv3plus_effb0); "
                             "a .py config is Python code and is run as such (use only configs you trust); "
                             "a .yaml/.yml/.json one is read as data")
    add_runner_train_arguments(parser, "model.backbone.init_cfg.checkpoint=student_mmseg.pth")
    parser.add_argument("--verbose", action="store_true",
                        help="also print MMEngine's start-up report (environment, config, hooks) and library warnings")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retro_transfer.mmseg import launch

    return launch.train_or_evaluate(args, launch, run_options={"verbose": args.verbose},
                                    workload_warning=launch.cpu_workload_warning)


if __name__ == "__main__":
    sys.exit(main())
