#!/usr/bin/env python
"""Generate the synthetic shapes data set in Pascal VOC and ImageFolder layouts.

    python tools/make_shapes.py --out data/shapes [--num-images N] [--size S] [--seed K] [--overwrite]

See ``retro_transfer/data/shapes.py`` for what is written where.
"""

import sys
import time

from retro_transfer.cli import OneLineErrorParser, fail
from retro_transfer.data.shapes import ShapesConfig, generate
from retro_transfer.utils.progress import progress_bar


def build_parser() -> OneLineErrorParser:
    defaults = ShapesConfig()
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created; must be empty or absent)")
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="VOC images (default %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shapes data set at --out")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    cfg = ShapesConfig(num_images=args.num_images, size=args.size, seed=args.seed)
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        out = generate(args.out, cfg, overwrite=args.overwrite, progress=progress_bar)
    except FileExistsError as err:
        fail(str(err))
    print(
        f"shapes data set written to {out} in {time.perf_counter() - start:.1f} s: "
        f"VOC {cfg.num_images} images ({out / 'VOC2007'}), classification "
        f"{cfg.num_classification_train}+{cfg.num_classification_val} ({out / 'classification'}), "
        f"unlabeled {cfg.num_unlabeled} ({out / 'unlabeled'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
