#!/usr/bin/env python
"""Weighted k-NN evaluation of a distilled student (or a teacher) on an ImageFolder data set.

    python tools/knn_eval.py CHECKPOINT --data DIR [--features backbone|adapter]
        [--k 200] [--temperature 0.07] [--batch-size 256] [--image-size 224]
        [--workers 4] [--out results.json] [--device cpu|cuda]

DIR holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (the ImageNet
layout; ``tools/make_shapes.py --out D`` writes one at ``D/classification``).
The protocol is the InstDisc / MoCo k-NN monitor (METHOD.md, "Evaluation
protocols"): centre-crop features of both splits from the frozen encoder,
cosine similarity on L2-normalised features, the k nearest training images
vote with weight exp(sim / temperature). No training, so it is a quick check.
"""

import argparse
import sys
import time

from retro_transfer.cli import (
    OneLineErrorParser,
    add_evaluation_inputs,
    evaluation_report,
    fail,
    keep_tools_dir_off_path,
    open_frozen_evaluation,
    positive_float,
    positive_int,
    write_evaluation,
)

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_evaluation_inputs(parser)
    parser.add_argument("--k", type=positive_int, default=200, help="neighbours (default %(default)s; 20 is also used)")
    parser.add_argument("--temperature", type=positive_float, default=0.07, help="vote weight exp(sim/T) (default %(default)s)")
    parser.add_argument("--out", help="write metrics, checkpoint info and arguments to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return parser


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")
    if args.temperature < 1.0 / 700.0:
        parser.error(f"--temperature must be at least {1.0 / 700.0:.4f} (exp(1/T) overflows below), got {args.temperature}")


def _features(ev, encoder, args, device):
    """Centre-crop features of both splits (train is the memory bank, val the queries)."""
    out = {}
    for split in ("train", "val"):
        dataset = ev.image_folder(args.data, split, ev.eval_transform(args.image_size))
        loader = ev.make_loader(dataset, args.batch_size, shuffle=False, workers=args.workers, pin_memory=device.type == "cuda")
        out[split] = ev.extract_features(encoder.to(device), loader, device, desc=f"features ({split})")
    return out


def _report(ev, args, info, classes, metrics, k_used, num_train, num_val, seconds) -> dict:
    clipped = f" (clipped from {args.k} to the {num_train} training images)" if k_used < args.k else ""
    print(
        f"k-NN (k {k_used}{clipped}, T {args.temperature:g}): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
        f"({num_val} val images, {len(classes)} classes; {seconds:.1f} s)"
    )
    return evaluation_report(
        ev, args, info, classes, seconds, "weighted k-NN (InstDisc / MoCo monitor: cosine similarity, exp(sim/T) votes, centre crop)",
        metrics=dict(metrics), knn={"k": k_used, "temperature": args.temperature, "num_train": num_train, "num_val": num_val},
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_values(parser, args)
    ev, device, classes, encoder, info = open_frozen_evaluation(args)
    start = time.perf_counter()
    try:
        feats = _features(ev, encoder, args, device)
    except ev.NonFiniteFeaturesError as err:
        fail(f"cannot evaluate {args.checkpoint}: {err}")
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    scores = ev.knn_classify(
        train_x.to(device), train_y, val_x.to(device), len(classes), k=args.k, temperature=args.temperature
    )
    metrics = ev.topk_accuracy(scores, val_y)
    k_used = min(args.k, train_x.shape[0])
    payload = _report(ev, args, info, classes, metrics, k_used, train_x.shape[0], val_x.shape[0], time.perf_counter() - start)
    payload["knn"]["val_correct"] = (scores.argmax(dim=1).cpu() == val_y).int().tolist()  # for intervals over images
    write_evaluation(ev, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
