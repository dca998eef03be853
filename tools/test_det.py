#!/usr/bin/env python
"""Evaluate a trained MMDetection checkpoint (box/mask AP) with MMEngine's Runner.

    python tools/test_det.py CONFIG CHECKPOINT [--data-root DIR] [--work-dir DIR] [--out metrics.json]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is a checkpoint tools/train_det.py wrote (``work_dirs/<config>/epoch_N.pth``
or ``iter_N.pth``); it is read with ``weights_only`` loading and must fill the
config's detector. The metrics are printed as one JSON line, and written to
``--out`` when given.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, add_runner_test_arguments, config_file, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=config_file("mmdet"),
                        help="the config the checkpoint was trained with (a path or a name in configs/mmdet/)")
    add_runner_test_arguments(parser, "a Runner checkpoint (epoch_N.pth / iter_N.pth)", "test_dataloader.batch_size=1")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retro_transfer.compat.detection_ops import CompiledOpMissing
    from retro_transfer.mmdet import launch
    from retro_transfer.mmseg.launch import evaluate

    return evaluate(args, launch, errors=(CompiledOpMissing,))


if __name__ == "__main__":
    sys.exit(main())
