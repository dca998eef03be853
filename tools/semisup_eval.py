#!/usr/bin/env python
"""Semi-supervised evaluation of a distilled student (or a teacher): fine-tune it on a fraction of the labels.

    python tools/semisup_eval.py CHECKPOINT --data DIR --out results.json
        [--label-fraction 0.1 | --label-list FILE] [--epochs 20] [--lr-backbone LR] [--lr-classifier LR]
        [--schedule step|cosine] [--head-init random|probe] [--bn train|frozen] [--optimizer sgd|adamw] [--batch-size 256] [--image-size 224] [--workers 4] [--seed 0] [--device cpu|cuda]

DIR holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (the ImageNet
layout). The whole network (backbone and a new Linear classifier) is
fine-tuned on the labelled subset of train/ and evaluated on val/ with the
centre crop. Defaults are SwAV's released recipe for the ImageNet 1 %/10 %
splits: SGD momentum 0.9, weight decay 0, batch 256, 20 epochs, lr x 0.2 at
60 %/80 % of the epochs; learning rates backbone 0.01 / classifier 0.2, or
0.02 / 5 for a --label-fraction under 0.03 (the 1 % setting; for a
--label-list, the share of train/ it names decides).
For small data and any backbone (what the pipeline runs): ``--head-init probe``
starts the classifier from the standardised linear probe fitted on the labelled
images, ``--bn frozen`` keeps BatchNorm's running statistics, which small
batches would estimate badly, and ``--optimizer adamw`` keeps the backbone's
steps small whatever the features' scale.

The subset is drawn per class (round(fraction x images), at least one) from
--seed, or read from --label-list (paths relative to train/, or bare file
names as in SimCLR's 1percent.txt). Either way it is written next to --out as
RESULTS.labels.txt, which --label-list accepts back.
"""

import argparse
import sys
import time
from pathlib import Path

from retro_transfer.cli import (
    OneLineErrorParser,
    add_evaluation_inputs,
    check_checkpoint_file,
    fail,
    fail_on_checkpoint,
    keep_tools_dir_off_path,
    non_negative_float,
    positive_int,
)

keep_tools_dir_off_path(__file__)  # tools/distill.py would shadow the distill package


def fraction(text: str) -> float:
    """argparse type: a labelled fraction in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], e.g. 0.01 or 0.1; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_evaluation_inputs(parser, features=False)
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--label-fraction", type=fraction,
                        help="fraction of each class's training images that keep their label (default 0.1)")
    labels.add_argument("--label-list",
                        help="file naming the labelled training images (e.g. a RESULTS.labels.txt written before)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="default %(default)s (SwAV)")
    parser.add_argument("--lr-backbone", type=non_negative_float,
                        help="default 0.01, or 0.02 below 3 %% labels (SwAV's 10 %% / 1 %% settings)")
    parser.add_argument("--lr-classifier", type=non_negative_float,
                        help="default 0.2, or 5 below 3 %% labels (SwAV's 10 %% / 1 %% settings)")
    parser.add_argument("--momentum", type=non_negative_float, default=0.9, help="default %(default)s")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="default %(default)s")
    parser.add_argument("--schedule", choices=("step", "cosine"), default="step",
                        help="step: lr x 0.2 at 60%% and 80%% of the epochs (default, SwAV); cosine: decay to 0")
    parser.add_argument("--head-init", choices=("random", "probe"), default="random",
                        help="random: a new N(0, 0.01) Linear (default, SwAV); probe: start from the standardised "
                             "linear probe fitted on the labelled images (any backbone, small data)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd (default, SwAV, with --momentum) or adamw (steps that do not grow with the gradient: "
                             "for --head-init probe, whose standardisation scales the backbone's gradients)")
    parser.add_argument("--bn", choices=("train", "frozen"), default="train",
                        help="BatchNorm while training: batch statistics (default, SwAV) or frozen running statistics "
                             "(small batches)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the labelled subset and seeds training (default %(default)s)")
    parser.add_argument("--out", required=True,
                        help="results JSON; the labelled subset is written beside it (r.json -> r.labels.txt)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out (and the labelled subset beside it) if they exist")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return parser


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.momentum >= 1:
        parser.error(f"--momentum must be below 1, got {args.momentum}")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8, got {args.image_size}")


def check_results_free(args: argparse.Namespace) -> None:
    """Refuse, before hours of fine-tuning, to replace a result (or its labelled subset) without --force."""
    taken = [p for p in (Path(args.out), labels_path(args.out)) if p.is_file()]
    if taken and not args.force:
        fail(f"{taken[0]} exists; pass --force to overwrite it, or choose another --out")


def labels_path(out: str) -> Path:
    """Where the labelled subset goes: ``results.json`` -> ``results.labels.txt``."""
    return Path(out).with_suffix(".labels.txt")


def _report(ev, args, result, classes, seconds) -> dict:
    info, labelled = result["info"], result["labelled"]
    print(
        f"semi-supervised ({100 * labelled['fraction']:.2f} % labels, {labelled['count']} images): "
        f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
        f"({result['num_val']} val images, {len(classes)} classes; "
        f"{result['epochs']} epochs, lr {result['lr_backbone']:g} backbone / {result['lr_classifier']:g} classifier, "
        f"{result['schedule']} schedule, {result['optimizer']}, head {result['head_init']}, BatchNorm {result['bn']}; {seconds:.1f} s)"
    )
    recipe = {k: v for k, v in result.items() if k not in ("top1", "top5", "info", "labelled")}
    return {
        "protocol": "semi-supervised fine-tuning (SwAV eval_semisup recipe: whole network + new Linear layer, "
                    "two learning rates, centre-crop evaluation of the final model)",
        "checkpoint": str(args.checkpoint),
        "features": ev.describe_features(info),
        "info": info,
        "metrics": {"top1": result["top1"], "top5": result["top5"]},
        "finetune": recipe,
        "labelled": labelled,
        "data": {"root": str(args.data), "num_classes": len(classes), "classes": classes},
        "seconds": round(seconds, 2),
        "args": vars(args),
    }


def _discard(labels_out: Path, had_labels: bool) -> None:
    """A run that failed leaves no label list of its own: a re-run would otherwise need --force."""
    if not had_labels:
        labels_out.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_values(parser, args)
    check_checkpoint_file(args.checkpoint)
    check_results_free(args)
    import distill.evaluation as ev  # after argument errors: importing torch takes seconds
    from distill.semisup import finetune_semisup
    from retro_transfer.safe_io import CheckpointError

    try:
        ev.resolve_device(args.device)
        classes = ev.check_image_folder(args.data)
        ev.check_output_path(args.out)
    except ValueError as err:  # DataError included: a missing or empty folder
        fail(str(err))
    start = time.perf_counter()
    labels_out = labels_path(args.out)
    had_labels = labels_out.exists()  # only with --force (check_results_free)
    try:
        result = finetune_semisup(
            args.checkpoint, args.data, args.label_fraction, label_list=args.label_list,
            labels_out=labels_out, epochs=args.epochs, lr_backbone=args.lr_backbone,
            lr_classifier=args.lr_classifier, momentum=args.momentum, weight_decay=args.weight_decay,
            schedule=args.schedule, batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
            device=args.device, seed=args.seed, head_init=args.head_init, bn=args.bn,
            optimizer_name=args.optimizer, say=print,
        )
    except CheckpointError as err:
        _discard(labels_out, had_labels)
        fail_on_checkpoint(args.checkpoint, str(err))
    except (ev.DataError, FloatingPointError, OSError) as err:
        _discard(labels_out, had_labels)
        fail(str(err))
    payload = _report(ev, args, result, classes, time.perf_counter() - start)
    try:
        print(f"results written to {ev.write_results(args.out, payload)}")
    except (ValueError, OSError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
