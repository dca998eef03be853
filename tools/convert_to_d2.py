#!/usr/bin/env python
"""Convert a backbone to Detectron2's pickle format, for MODEL.WEIGHTS.

    python tools/convert_to_d2.py IN OUT [--arch ARCH] [--target auto|timm|resnet] [--force]

IN is a distillation checkpoint (its student: adapter, heads, EMA, teacher and
queue are dropped and listed), an official MoCo v2 checkpoint, or a
torchvision / timm state dict. Students, and any model but ResNet-50/101/152,
go to the timm backbone (``build_timm_fpn_backbone``); ResNet-50/101/152 go to
Detectron2's built-in ResNet for C4 and FPN, as in MoCo's recipe. Every
backbone tensor must land on the target backbone with the same shape, or
nothing is written.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, fail, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)

# torch and Detectron2 are imported once the arguments are read, so that --help answers at once.

def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN", help="checkpoint or state dict to convert")
    parser.add_argument("output", metavar="OUT", help="Detectron2 weights to write (.pkl)")
    parser.add_argument(
        "--arch", help="timm/torchvision model name; required for a plain timm state dict, checked otherwise"
    )
    parser.add_argument(
        "--target",
        default="auto",
        help="timm: build_timm_fpn_backbone; resnet: Detectron2's ResNet (C4/FPN); "
        "auto (default): resnet for ResNet-50/101/152, timm otherwise",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from retro_transfer.convert import ConversionError, check_output, read_backbone, report
    from retro_transfer.d2.weights import TARGETS, describe, save_d2, to_detectron2

    if args.target not in ("auto",) + TARGETS:
        parser.error(f"argument --target: invalid choice: {args.target!r} (choose from auto, {', '.join(TARGETS)})")
    if not args.output.endswith(".pkl"):
        # Detectron2 chooses its loader by extension; anything else is read with torch.load.
        fail(f"OUT must end in .pkl (Detectron2 reads other extensions as torch checkpoints), got {args.output}")
    try:
        out = check_output(args.output, args.force, source=args.input)
        source = read_backbone(args.input, arch=args.arch)
        weights = to_detectron2(source, args.target)
        save_d2(weights, out)
    except ConversionError as err:
        fail(str(err))
    print(report(source, weights.groups()))
    print("\n".join(describe(weights, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
