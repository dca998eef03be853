#!/usr/bin/env python
"""Distil a student from a frozen self-supervised teacher.

    python tools/distill.py --config configs/distill/retro_effb0_r50.yaml [key=value ...]
    torchrun --nproc_per_node 8 tools/distill.py --config ... train.sync_bn=true

Overrides use dotted keys, e.g. teacher.checkpoint=moco_v2_800ep_pretrain.pth.tar
data.train_dir=/data/imagenet/train output_dir=runs/x train.max_steps=1000
resume=auto. An output_dir that holds a run is continued with resume=auto, or
replaced with overwrite=true; without either the run is refused.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, config_file, fail, interrupted, keep_tools_dir_off_path

# Before any import of the library, which imports the distill package that this folder's distill.py would shadow.
keep_tools_dir_off_path(__file__)

from retro_transfer.safe_io import CheckpointError  # noqa: E402


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=config_file("distill"), help="a YAML file, or a name in configs/distill/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from distill.config import LABELLED_METHODS, ConfigError, load_config
    from distill.engine import NonFiniteLossError, Trainer
    from retro_transfer.utils.run_lock import RunFolderError

    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.method in LABELLED_METHODS:
            raise ConfigError(
                f"method {cfg.method} trains on labels, so it makes teachers, not distilled students: "
                f"run it with tools/pretrain_teacher.py"
            )
        trainer = Trainer(cfg)
        final = trainer.fit()
    except KeyboardInterrupt:
        interrupted(trainer.stopped_at() if trainer else "before training started; nothing was written")
    except (ConfigError, CheckpointError, RunFolderError) as err:
        fail(str(err))
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    print(f"done: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
