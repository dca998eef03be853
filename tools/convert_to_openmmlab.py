#!/usr/bin/env python
"""Convert a distilled student (or a MoCo v2 / torchvision / timm backbone) to an OpenMMLab (MMSeg, MMDetection) checkpoint.

    python tools/convert_to_openmmlab.py IN OUT [--arch ARCH] [--force]

IN is a distillation checkpoint of this project (its student backbone is
taken), an official MoCo v2 checkpoint (``encoder_q``), or a torchvision/timm
state dict (``--arch`` names a non-ResNet). OUT is ``{"state_dict":
{"body.<timm name>": ...}, "meta": {...}}``: the keys of ``StudentBackbone``,
the one backbone class both MMSegmentation and MMDetection build, so the same
file serves both toolboxes:

    python tools/train_seg.py voc_deeplabv3plus_effb0 --cfg-options model.backbone.init_cfg.checkpoint=OUT
    python tools/train_det.py voc_faster_rcnn_effb0 --cfg-options model.backbone.init_cfg.checkpoint=OUT

``tools/convert_to_mmseg.py`` is the older name of this tool.

Every tensor is accounted for: the converted and dropped counts are printed by
group, and the conversion fails (exit 2) if a backbone tensor would be dropped,
the backbone would lack one, or the architecture does not match. An existing
OUT is replaced only with ``--force``.
"""

import sys
from pathlib import Path

from retro_transfer.cli import OneLineErrorParser, fail, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="distillation checkpoint, MoCo v2 checkpoint, or a state dict")
    parser.add_argument("output", type=Path, help="OpenMMLab backbone checkpoint to write")
    parser.add_argument("--arch", help="timm architecture; required for a plain non-ResNet state dict, "
                                       "otherwise checked against the file")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retro_transfer.safe_io import CheckpointError, save_atomic
    from retro_transfer.convert import ConversionError, check_output, read_backbone, report
    from retro_transfer.mmseg.conversion import to_mmseg

    try:
        out = check_output(args.output, args.force, source=args.input)
        source = read_backbone(args.input, args.arch)
        checkpoint, converted, source = to_mmseg(source)
        save_atomic(checkpoint, out)
    except (ConversionError, CheckpointError) as e:
        fail(str(e))
    print(report(source, converted))
    print(f"wrote {out} ({source.arch}); train with --cfg-options model.backbone.init_cfg.checkpoint={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
