#!/usr/bin/env python
"""Export a distilled student for timm, torchvision or ONNX, checked by loading it back in that library.

    python tools/export.py CHECKPOINT --format timm|torchvision|onnx OUT
        [--features] [--image-size 224] [--tolerance 1e-4] [--force]

timm: a state dict that timm.create_model(ARCH, pretrained=True,
pretrained_cfg_overlay=dict(file=OUT), num_classes=0) loads with no missing or
unexpected key. torchvision (ResNet students): a state dict that
torchvision.models.resnetXX() loads strictly; its fc is torchvision's
untrained default. onnx: the pooled backbone features (with --features also
the stride-4..32 feature maps), dynamic batch size, input fixed at
--image-size; onnxruntime must reproduce PyTorch's outputs within --tolerance
(relative to each output's largest magnitude) or nothing is written. The
last line printed is the Python line that loads the file.
"""

import argparse
import sys

from retro_transfer.cli import (
    OneLineErrorParser,
    check_checkpoint_file,
    fail,
    fail_on_checkpoint,
    keep_tools_dir_off_path,
    positive_float,
    positive_int,
)

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="distillation checkpoint written by tools/distill.py")
    parser.add_argument("out", help="file to write (.pth for timm/torchvision, .onnx for onnx)")
    parser.add_argument("--format", required=True, choices=("timm", "torchvision", "onnx"), dest="fmt",
                        help="timm state dict, torchvision ResNet state dict, or ONNX graph")
    parser.add_argument("--features", action="store_true",
                        help="onnx: also output the stride-4..32 feature maps (named stride4 ... stride32)")
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="input side in pixels of the ONNX graph and of the checks (default %(default)s)")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest accepted |export - PyTorch| / max |PyTorch| per output (default %(default)g)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.features and args.fmt != "onnx":
        parser.error("--features applies to --format onnx only")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")
    check_checkpoint_file(args.checkpoint)
    from retro_transfer.safe_io import CheckpointError
    from retro_transfer.convert import ConversionError, check_output
    from retro_transfer.export import ExportError, export_student

    try:
        out = check_output(args.out, args.force, source=args.checkpoint)
        exported, info = export_student(args.checkpoint, out, args.fmt, features=args.features,
                                        image_size=args.image_size, tolerance=args.tolerance)
    except CheckpointError as err:
        fail_on_checkpoint(args.checkpoint, str(err))
    except (ConversionError, ExportError) as err:
        fail(str(err))
    trained = f"{info.get('method') or 'distilled'} student, step {info.get('step', '?')}"
    print(f"exported the {exported.arch} ({trained}) of {args.checkpoint} as {exported.format}: {exported.path}")
    print(f"checked: {exported.checked}")
    for note in exported.notes:
        print(f"note: {note}")
    print("load it with:")
    print(exported.load_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
