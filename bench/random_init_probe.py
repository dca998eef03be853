#!/usr/bin/env python
"""k-NN and linear probe of randomly initialised networks: the floor a pretrained one must beat.

    python bench/random_init_probe.py --data runs/demo/data/shapes/classification \
        [--archs resnet18 efficientnet_b0] [--image-size 48] [--seeds 0 1 2] [--out bench/results/random_init.json]

The protocol is the demo's evaluation stage (``retro_transfer.pipeline.upstream.evaluate_frozen``):
centre-crop features, k-NN with k=20, and the default linear probe (standardised
features, logistic regression whose L2 strength is chosen on held-out training
images; the chosen value is printed). A pretrained network that scores no better
than these numbers has learned nothing the probe can use, however far below
chance its loss fell.
"""

import sys
from pathlib import Path

from retro_transfer.cli import OneLineErrorParser
from retro_transfer.pipeline.runner import save_json
from retro_transfer.pipeline.upstream import evaluate_frozen, random_encoder


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/random_init.json"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        parser.error(f"{args.data}/train not found: pass the classification folder of a shapes data set (make_shapes.py --out DIR writes DIR/classification)")

    rows = []
    for arch in args.archs:
        for seed in args.seeds:
            encoder = random_encoder(arch, seed)
            result = evaluate_frozen(encoder, args.data, args.image_size, args.k, seed)
            rows.append({"arch": arch, "seed": seed, "dim": encoder.num_features, **result})  # per_image: for intervals
    print(f"| arch | seed | k-NN top-1 | linear top-1 | chosen weight decay |  ({rows[0]['num_val']} val images, {args.image_size} px)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['seed']} | {r['knn_top1']:.1f} | {r['linear_top1']:.1f} | {r['linear_weight_decay']:g} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json({"data": str(args.data), "image_size": args.image_size, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
