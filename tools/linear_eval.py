#!/usr/bin/env python
"""Linear-probe evaluation of a distilled student (or a teacher) on an ImageFolder data set.

    python tools/linear_eval.py CHECKPOINT --data DIR [--features backbone|adapter]
        [--protocol standardised|moco] [--batch-size 256] [--image-size 224] [--workers 4]
        [--seed 0] [--out results.json] [--device cpu|cuda]
    moco only: [--epochs 100] [--lr 30] [--momentum 0.9] [--weight-decay 0] [--precompute]

DIR holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (the ImageNet
layout; ``tools/make_shapes.py --out D`` writes one at ``D/classification``).

``--protocol standardised`` (the default) works on any backbone: centre-crop
features extracted once, standardised with the training split's statistics,
multinomial logistic regression by full-batch L-BFGS, its L2 strength chosen by
a sweep scored on a held-out fifth of the training split (never val); the
result names the chosen value. ``--protocol moco`` is MoCo's ImageNet
protocol (METHOD.md, "Evaluation protocols"), for reproducing papers' ImageNet
tables: raw features, one Linear layer, SGD lr 30, momentum 0.9, wd 0, 100
epochs, lr steps at 60 %/80 %, random-resized-crop training; its learning rate
suits ResNet features on ImageNet, not every backbone (EfficientNet-B0's
features are far smaller). ``--features adapter`` probes the Retro adapter
output instead of the student backbone (the report says which)."""

import argparse
import sys
import time

from retro_transfer.cli import (
    OneLineErrorParser,
    add_evaluation_inputs,
    evaluation_report,
    fail,
    keep_tools_dir_off_path,
    non_negative_float,
    open_frozen_evaluation,
    positive_float,
    positive_int,
    write_evaluation,
)

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package

PROTOCOLS = ("standardised", "moco")
# MoCo v2 main_lincls.py. Their defaults are applied after parsing, so that giving one
# with the standardised protocol (which chooses its own weight decay) can be refused.
MOCO_OPTIONS = (
    ("--epochs", positive_int, 100, "MoCo"),
    ("--lr", positive_float, 30.0, "MoCo; DisCo uses 3.0"),
    ("--momentum", non_negative_float, 0.9, "MoCo"),
    ("--weight-decay", non_negative_float, 0.0, "MoCo"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_evaluation_inputs(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="standardised",
                        help="standardised (default: any backbone) or moco (papers' ImageNet tables)")
    moco = parser.add_argument_group("--protocol moco only")
    for flag, kind, default, note in MOCO_OPTIONS:
        moco.add_argument(flag, type=kind, help=f"default {default} ({note})")
    moco.add_argument(
        "--precompute",
        action="store_true",
        help="train on centre-crop features extracted once (fast; not the protocol's random crops)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--out", help="write metrics, checkpoint info and arguments to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return parser


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [flag for flag, *_ in MOCO_OPTIONS if getattr(args, flag[2:].replace("-", "_")) is not None]
    given += ["--precompute"] if args.precompute else []
    if args.protocol != "moco" and given:
        parser.error(f"{', '.join(given)} belong to --protocol moco; the default protocol chooses its weight decay "
                     "on held-out training images (drop them, or add --protocol moco)")
    for flag, _, default, _ in MOCO_OPTIONS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.momentum >= 1:
        parser.error(f"--momentum must be below 1, got {args.momentum}")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")


def _loaders(ev, args, device):
    """Training loader (random crops, or centre crops with --precompute) and centre-crop validation loader."""
    train_tf = ev.eval_transform(args.image_size) if args.precompute else ev.train_transform(args.image_size)
    train_set = ev.image_folder(args.data, "train", train_tf)
    val_set = ev.image_folder(args.data, "val", ev.eval_transform(args.image_size))
    pin = device.type == "cuda"
    train = ev.make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed, pin_memory=pin)
    val = ev.make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers, seed=args.seed, pin_memory=pin)
    return train, val


def _run_standardised(ev, encoder, args, device, num_classes) -> dict:
    """Centre-crop features of both splits, then :func:`distill.evaluation.linear_probe`."""
    transform = ev.eval_transform(args.image_size)
    feats = {}
    for split in ("train", "val"):
        loader = ev.make_loader(ev.image_folder(args.data, split, transform), args.batch_size, shuffle=False,
                                workers=args.workers, seed=args.seed, pin_memory=device.type == "cuda")
        feats[split] = ev.extract_features(encoder.to(device), loader, device, desc=f"features ({split})")
    return ev.linear_probe(*feats["train"], *feats["val"], num_classes=num_classes, seed=args.seed)


def _run_moco(ev, encoder, args, device, num_classes) -> dict:
    train, val = _loaders(ev, args, device)
    try:
        return ev.train_linear_probe(
            encoder, train, val, num_classes=num_classes, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, device=device, precompute_features=args.precompute, seed=args.seed,
        )
    except FloatingPointError as err:
        fail(str(err))


def _summary(args, result) -> str:
    if args.protocol == "standardised":
        sel = result["selection"]
        return (f"standardised features, L-BFGS logistic regression, weight decay {result['weight_decay']:g} chosen on "
                f"{sel['num_holdout']} held-out training images")
    steps = "/".join(str(m) for m in result["milestones"]) or "none"
    training = "precomputed centre-crop features (not the protocol)" if args.precompute else "random-resized crops"
    return f"MoCo protocol: {args.epochs} epochs, lr {args.lr:g}, steps at {steps}, {training}"


PROTOCOL_NAMES = {
    "standardised": "linear probe (standardised centre-crop features, L-BFGS logistic regression, "
                    "L2 strength chosen on held-out training images)",
    "moco": "linear probe (MoCo v2 main_lincls: frozen encoder, one Linear layer, centre-crop evaluation)",
}


def _report(ev, args, info, classes, result, seconds) -> dict:
    print(
        f"linear probe: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"({result['num_val']} val images, {len(classes)} classes; {_summary(args, result)}; {seconds:.1f} s)"
    )
    return evaluation_report(ev, args, info, classes, seconds, PROTOCOL_NAMES[args.protocol],
                             metrics={"top1": result["top1"], "top5": result["top5"]},
                             probe={k: v for k, v in result.items() if k not in ("top1", "top5")})


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_values(parser, args)
    ev, device, classes, encoder, info = open_frozen_evaluation(args)
    start = time.perf_counter()
    run = _run_standardised if args.protocol == "standardised" else _run_moco
    try:
        result = run(ev, encoder, args, device, len(classes))
    except (ValueError, ev.NonFiniteFeaturesError) as err:  # e.g. too few training images for the sweep; NaN features
        fail(str(err))
    write_evaluation(ev, args, _report(ev, args, info, classes, result, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
