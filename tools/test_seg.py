#!/usr/bin/env python
"""Evaluate a trained MMSegmentation checkpoint (mIoU) with MMEngine's Runner.

    python tools/test_seg.py CONFIG CHECKPOINT [--data-root DIR] [--work-dir DIR] [--out metrics.json]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is a checkpoint tools/train_seg.py wrote (``work_dirs/<config>/iter_N.pth``);
it is read with ``weights_only`` loading. The metrics are printed as one JSON
line, and written to ``--out`` when given.

A .py config is Python code and is run as such (as in MMSegmentation): use only
Python configs you trust. A .yaml/.yml/.json config, and every _base_ it names
in those formats, is read as data only: a Python tag in it is refused.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, add_runner_test_arguments, config_file, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=config_file("segmentation"),
                        help="the config the checkpoint was trained with (a path or a name in configs/segmentation/); "
                             "a .py config is Python code and is run as such (use only configs you trust); "
                             "a .yaml/.yml/.json one is read as data")
    add_runner_test_arguments(parser, "a Runner checkpoint (iter_N.pth)", "test_dataloader.dataset.data_root=DIR")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retro_transfer.mmseg import launch

    return launch.evaluate(args, launch)


if __name__ == "__main__":
    sys.exit(main())
