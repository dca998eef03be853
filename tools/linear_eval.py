#!/usr/bin/env python
"""Linear-probe evaluation of a distilled student (or a teacher) on an ImageFolder data set.

    python tools/linear_eval.py CHECKPOINT --data DIR [--features backbone|adapter]
        [--epochs 100] [--lr 30] [--batch-size 256] [--image-size 224] [--workers 4]
        [--precompute] [--seed 0] [--out results.json] [--device cpu|cuda]

DIR holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (the ImageNet
layout; ``tools/make_shapes.py --out D`` writes one at ``D/classification``).
The protocol is MoCo's (METHOD.md, "Evaluation protocols"): frozen encoder,
one Linear layer, SGD lr 30, momentum 0.9, wd 0, 100 epochs, lr steps at
60 %/80 %, random-resized-crop training, centre-crop evaluation.
``--features adapter`` probes the Retro adapter output instead of the student
backbone (both variants exist in the Retro work; the report says which).
``--precompute`` trains on features extracted once with the centre crop:
much faster on a CPU, but not the protocol.
"""

import argparse
import sys
import time

from retro_transfer.cli import (
    OneLineErrorParser,
    add_evaluation_inputs,
    check_checkpoint_file,
    fail,
    fail_on_checkpoint,
    keep_tools_dir_off_path,
    non_negative_float,
    positive_float,
    positive_int,
)

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_evaluation_inputs(parser)
    parser.add_argument("--epochs", type=positive_int, default=100, help="default %(default)s (MoCo)")
    parser.add_argument("--lr", type=positive_float, default=30.0, help="default %(default)s (MoCo; DisCo uses 3.0)")
    parser.add_argument("--momentum", type=non_negative_float, default=0.9, help="default %(default)s")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="default %(default)s")
    parser.add_argument(
        "--precompute",
        action="store_true",
        help="train on centre-crop features extracted once (fast; not the protocol's random crops)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--out", help="write metrics, checkpoint info and arguments to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return parser


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.momentum >= 1:
        parser.error(f"--momentum must be below 1, got {args.momentum}")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")


def _load(checkpoint: str, which: str):
    """The frozen encoder and its info; checkpoint problems become one-line errors."""
    from retro_transfer.checkpoints import CheckpointError, load_encoder

    check_checkpoint_file(checkpoint)
    try:
        return load_encoder(checkpoint, which=which)
    except CheckpointError as err:
        # the library's word for our flag
        fail_on_checkpoint(checkpoint, str(err).replace("which='backbone'", "--features backbone"))


def _loaders(ev, args, device):
    """Training loader (random crops, or centre crops with --precompute) and centre-crop validation loader."""
    train_tf = ev.eval_transform(args.image_size) if args.precompute else ev.train_transform(args.image_size)
    train_set = ev.image_folder(args.data, "train", train_tf)
    val_set = ev.image_folder(args.data, "val", ev.eval_transform(args.image_size))
    pin = device.type == "cuda"
    train = ev.make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed, pin_memory=pin)
    val = ev.make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers, seed=args.seed, pin_memory=pin)
    return train, val


def _report(ev, args, info, classes, result, seconds) -> dict:
    steps = "/".join(str(m) for m in result["milestones"]) or "none"
    training = "precomputed centre-crop features (not the protocol)" if args.precompute else "random-resized crops"
    print(
        f"linear probe: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"({result['num_val']} val images, {len(classes)} classes; {args.epochs} epochs, lr {args.lr:g}, "
        f"steps at {steps}, {training}; {seconds:.1f} s)"
    )
    return {
        "protocol": "linear probe (MoCo v2 main_lincls: frozen encoder, one Linear layer, centre-crop evaluation)",
        "checkpoint": str(args.checkpoint),
        "features": ev.describe_features(info),
        "info": dict(info),
        "metrics": {"top1": result["top1"], "top5": result["top5"]},
        "probe": {k: v for k, v in result.items() if k not in ("top1", "top5")},
        "data": {"root": str(args.data), "num_classes": len(classes), "classes": classes},
        "seconds": round(seconds, 2),
        "args": vars(args),
    }


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_values(parser, args)
    import distill.evaluation as ev  # after argument errors: importing torch takes seconds

    try:
        device = ev.resolve_device(args.device)
        classes = ev.check_image_folder(args.data)
        if args.out:
            ev.check_output_path(args.out)
    except ValueError as err:  # DataError included: a missing or empty folder
        fail(str(err))
    encoder, info = _load(args.checkpoint, args.features)
    print(f"features: {ev.describe_features(info)}, arch {info.get('arch', '?')}, from {args.checkpoint}")
    start = time.perf_counter()
    train, val = _loaders(ev, args, device)
    try:
        result = ev.train_linear_probe(
            encoder, train, val, num_classes=len(classes), epochs=args.epochs, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, device=device, precompute_features=args.precompute, seed=args.seed,
        )
    except FloatingPointError as err:
        fail(str(err))
    payload = _report(ev, args, info, classes, result, time.perf_counter() - start)
    if args.out:
        try:
            print(f"results written to {ev.write_results(args.out, payload)}")
        except (ValueError, OSError) as err:
            fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
