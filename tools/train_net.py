#!/usr/bin/env python
"""Fine-tune a converted backbone in Detectron2 (Faster / Mask R-CNN) and evaluate it.

    python tools/train_net.py --config voc_frcnn_effb0.yaml MODEL.WEIGHTS student_d2.pkl
    python tools/train_net.py --config-file configs/detection/voc_frcnn_effb0.yaml --num-gpus 8 \
        [--resume] [--eval-only] [KEY VALUE ...]

--config and --config-file are the same option: a path, or a bare name (with or
without .yaml) looked up in configs/detection/.

Pascal VOC and COCO are read from $DETECTRON2_DATASETS (Detectron2's names:
voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train,
coco_2017_val); the shapes data from DATASETS.SHAPES_ROOT. ``--shapes DIR``
runs any config (a VOC or COCO recipe too) on the shapes data in DIR: its data
sets, classes and image size replace the config's. VOC-layout data is scored
with Detectron2's PascalVOCDetectionEvaluator (AP, AP50, AP75), COCO with
COCOEvaluator. The console shows the run's progress and warnings;
``--verbose`` adds Detectron2's start-up report (environment, config, model),
which OUTPUT_DIR/log.txt always holds.
"""

import os
import sys

from retro_transfer.cli import OneLineErrorParser, config_file, fail, interrupted, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)

# Detectron2 and torch are imported where they are used, so that --help and a bad flag answer at once.


def build_parser() -> OneLineErrorParser:
    """Detectron2's usual flags (as ``default_argument_parser``), with one-line errors."""
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", "--config", dest="config_file", required=True, type=config_file("detection"),
                   metavar="FILE", help="a YAML file, or a name in configs/detection/ (voc_frcnn_effb0)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    p.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or the last checkpoint with --resume)"
    )
    p.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine (default %(default)s)")
    p.add_argument("--num-machines", type=int, default=1, help="machines (default %(default)s)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (default %(default)s)")
    p.add_argument(
        "--dist-url", default="auto", help="torch.distributed init URL; 'auto' picks a free local port (one machine)"
    )
    p.add_argument("--shapes", metavar="DIR",
                   help="train and test on the shapes data in DIR (tools/make_shapes.py --out DIR) instead of the "
                        "config's data sets: sets DATASETS.SHAPES_ROOT, TRAIN, TEST, the number of classes and the "
                        "input size; the model and schedule stay the config's")
    p.add_argument("--verbose", action="store_true",
                   help="also print Detectron2's start-up report (environment, config, model) and library warnings")
    p.add_argument("opts", nargs="...", default=[], help="config overrides: KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")
    return p


def configure(args):
    """The config from file and overrides, checked and frozen, with its data sets registered and present."""
    from retro_transfer.d2 import ConfigError, DatasetError, check_config, check_datasets, load_config
    from retro_transfer.utils.device import DeviceError, check_device

    try:
        cfg = load_config(args.config_file, args.opts, shapes_root=args.shapes)
        check_config(cfg)
        check_datasets(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
        check_device(cfg.MODEL.DEVICE, f"MODEL.DEVICE {cfg.MODEL.DEVICE}", "MODEL.DEVICE cpu")
    except (ConfigError, DatasetError, DeviceError) as err:
        fail(str(err))
    check_weights_given(cfg, args)
    check_output_dir_free(cfg, args)
    cfg.freeze()
    return cfg


def setup(args):
    """:func:`configure`, then Detectron2's ``default_setup`` (loggers, the config copy, seeds) on a quiet console."""
    from detectron2.engine import default_setup

    from retro_transfer.d2.train import cpu_workload_warning, quiet_detectron2_console
    from retro_transfer.utils.quiet import silence_internal_warnings

    cfg = configure(args)
    if not args.verbose:
        silence_internal_warnings()
        quiet_detectron2_console(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    warning = None if args.eval_only else cpu_workload_warning(cfg)
    if warning:
        print(warning, flush=True)
    return cfg


def check_weights_given(cfg, args) -> None:
    """Refuse to start from random weights unless asked to, and check a weights file is there.

    The base config's ``MODEL.WEIGHTS`` is empty, so forgetting it on the
    command line would train (or evaluate) a randomly initialised backbone
    and exit 0. Random initialisation is asked for with ``MODEL.WEIGHTS ''``.
    """
    weights = cfg.MODEL.WEIGHTS
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not weights and not resuming:
        if args.eval_only:
            fail("--eval-only needs the model to evaluate: MODEL.WEIGHTS OUTPUT_DIR/model_final.pth, "
                 "or --resume with a last_checkpoint in OUTPUT_DIR")
        if "MODEL.WEIGHTS" not in args.opts[::2]:
            fail("no MODEL.WEIGHTS given: pass MODEL.WEIGHTS student_d2.pkl (from tools/convert_to_d2.py), "
                 "or MODEL.WEIGHTS '' to train from random initialisation on purpose")
    if weights and "://" not in weights and not os.path.isfile(weights):
        fail(f"MODEL.WEIGHTS {weights} not found; make it with tools/convert_to_d2.py")


def check_output_dir_free(cfg, args) -> None:
    """A new training run never writes over another: an OUTPUT_DIR with a run in it needs --resume."""
    if args.resume or args.eval_only:
        return
    if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        fail(f"OUTPUT_DIR {cfg.OUTPUT_DIR} already holds a run (last_checkpoint); continue it with --resume, "
             "or give another OUTPUT_DIR")


def main(args):
    from retro_transfer.safe_io import CheckpointError
    from retro_transfer.d2 import ConfigError, DatasetError, IncompatibleWeightsError, RetroCheckpointer
    from retro_transfer.d2.train import RetroTrainer as Trainer

    cfg = setup(args)
    try:
        if args.eval_only:
            model = Trainer.build_model(cfg)
            checkpointer = RetroCheckpointer(model, save_dir=cfg.OUTPUT_DIR, complete=True)
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            return Trainer.test(cfg, model)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    except (ConfigError, IncompatibleWeightsError, CheckpointError, DatasetError) as err:
        # ConfigError here: a backbone that cannot be built as configured (it names the key);
        # DatasetError: an annotation found wrong when the data set is first read.
        fail(str(err))


def cli(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    misplaced = [key for key in args.opts[::2] if key.startswith("--")]
    if misplaced:
        p.error(f"{misplaced[0]} came after the KEY VALUE overrides, which take everything after them; "
                "put options first")
    if args.num_machines > 1 and args.dist_url == "auto":
        p.error("--dist-url auto works on one machine; give tcp://HOST:PORT of machine 0 with --num-machines > 1")
    from detectron2.engine import launch

    from retro_transfer.d2 import ConfigError, load_config
    from retro_transfer.utils.device import DeviceError, check_gpu_count

    if args.num_gpus > 1:
        try:
            check_gpu_count(args.num_gpus, f"--num-gpus {args.num_gpus}")
        except DeviceError as err:
            fail(str(err))
    try:
        output_dir = load_config(args.config_file, args.opts, shapes_root=args.shapes, register=False).OUTPUT_DIR
    except ConfigError as err:
        fail(str(err))
    lock = lock_output_dir(args, output_dir)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except KeyboardInterrupt:
        interrupted(stopped_at(output_dir, args.eval_only))
    finally:
        if lock is not None:
            lock.release()
    return 0


def lock_output_dir(args, output_dir: str):
    """Lock OUTPUT_DIR for the whole run in this launching process, whose workers write there.

    Only machine 0 locks: on a shared file system its lock keeps other jobs
    out, and the other machines of this job must not refuse each other.
    """
    from retro_transfer.utils.run_lock import RunFolderError, lock_run_folder

    if args.machine_rank != 0:
        return None
    try:
        return lock_run_folder(output_dir, "OUTPUT_DIR")
    except RunFolderError as err:
        fail(str(err))


def stopped_at(output_dir: str, eval_only: bool) -> str:
    """Where an interrupted run stands: the last checkpoint Detectron2 tagged, and how to continue from it."""
    if eval_only:
        return "evaluation stopped; nothing to continue (run it again)"
    tag = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return f"stopped before the first checkpoint in {output_dir}; run the same command again to start over"
    with open(tag) as f:
        last = os.path.join(output_dir, f.read().strip())
    return f"the last checkpoint is {last}: continue with the same command and --resume"


if __name__ == "__main__":
    sys.exit(cli())
