#!/usr/bin/env python
"""Pretrain a ResNet teacher with MoCo v2 (or SupCon) and write it in the official MoCo v2 layout.

    python tools/pretrain_teacher.py --config configs/teacher/shapes_moco_v2_r50.yaml [key=value ...]
    python tools/pretrain_teacher.py --config configs/teacher/shapes_supcon_r18.yaml [key=value ...]

``method: moco_v2`` is self-supervised. ``method: supcon`` is supervised
contrastive learning (Khosla et al., 2020) on the same engine, queue and head,
reading labels from the class folders of ``data.train_dir``: a stand-in for a
large self-supervised teacher where none can be downloaded or trained (the
demo); students distilled from it still never see a label.

The run uses the distillation engine (method moco_v2, a ResNet "student"),
so it resumes, logs and scales the same way, and an output_dir that holds a
run is continued with resume=auto or replaced with overwrite=true. At the end
``<output_dir>/checkpoint_last.pth.tar`` holds ``module.encoder_q.*`` with the
head as ``fc.0``/``fc.2``, ``module.encoder_k.*`` and ``module.queue``: the file
loads as ``teacher.checkpoint`` exactly as a released MoCo v2 checkpoint does.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, config_file, fail, interrupted, keep_tools_dir_off_path

# Before any import of the library, which imports the distill package that this folder's distill.py would shadow.
keep_tools_dir_off_path(__file__)

from retro_transfer.safe_io import CheckpointError, safe_load, save_atomic  # noqa: E402

TEACHER_FILE = "checkpoint_last.pth.tar"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=config_file("teacher"), help="YAML config with method: moco_v2 or supcon and a ResNet student.arch")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from distill import distributed as dist_utils
    from distill.config import ConfigError, load_config
    from distill.engine import NonFiniteLossError, Trainer
    from distill.teacher_export import TEACHER_RECIPES, to_moco_v2_release
    from retro_transfer.utils.run_lock import RunFolderError, run_folder_locked

    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.method not in TEACHER_RECIPES:
            raise ConfigError(f"a teacher is pretrained with method: {' or '.join(TEACHER_RECIPES)}, not {cfg.method}")
        with run_folder_locked(cfg.output_dir, "output_dir"):  # the Trainer's lock, held on to the teacher file
            trainer = Trainer(cfg)
            final = trainer.fit()
            if dist_utils.is_main_process():
                release = to_moco_v2_release(safe_load(final))
                save_atomic(release, final.parent / TEACHER_FILE)
                print(f"{cfg.method} teacher written in the MoCo v2 layout: {final.parent / TEACHER_FILE}")
    except KeyboardInterrupt:
        interrupted(trainer.stopped_at() if trainer else "before training started; nothing was written")
    except (ConfigError, CheckpointError, ValueError, RunFolderError) as err:
        fail(str(err))
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
