#!/usr/bin/env python
"""The whole product on generated data: pretrain -> distil -> evaluate -> transfer -> report.

    python tools/pipeline.py --preset default --out runs/pipeline      (what `make demo` runs)
    python tools/pipeline.py --preset full --out runs/full             (default + Mask R-CNN + MMDetection)
    python tools/pipeline.py --preset quick --out runs/quick           (a first look, minutes)
    python tools/pipeline.py --preset smoke --out /tmp/smoke           (minutes; what the tests run)

Stages whose output is up to date are skipped; `--force STAGE` (or `--force all`)
redoes a stage and everything after it. The report is DIR/report.md, with
DIR/summary.json and PNG figures beside it.

`--seed N` re-seeds everything (data, initialisations, augmentation, fine-tuning);
`--set KEY=VALUE` (repeatable) changes any preset field, e.g. `--set distill_steps=60`.
A folder made with other settings is refused (DIR/settings.json records them);
`--force all` redoes every stage there instead.
"""

import sys
import time
from pathlib import Path

from retro_transfer.cli import OneLineErrorParser, fail, interrupted, keep_tools_dir_off_path

keep_tools_dir_off_path(__file__)


def main(argv=None) -> int:
    from retro_transfer.pipeline import PRESETS

    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="size of the run (default %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (stages are resumed from it)")
    parser.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="redo these stages ('all' for every one)")
    parser.add_argument("--seed", type=int, help="seed of data, initialisation, augmentation and fine-tuning (default: the preset's, 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="change a preset field (repeatable), e.g. --set distill_steps=60")
    parser.add_argument("--teacher", metavar="PATH",
                        help="distil from your own teacher checkpoint (any layout the teacher loader knows, with its projection head) "
                             "instead of training one")
    parser.add_argument("--teacher-recipe", choices=("supcon", "moco_v2"),
                        help="how the demo trains its teacher: supcon (default; with labels, a stand-in for a large "
                             "self-supervised teacher) or moco_v2 (self-supervised, weak at this scale)")
    args = parser.parse_args(argv)
    if args.teacher and args.teacher_recipe:
        fail("--teacher and --teacher-recipe exclude each other: a given teacher is not trained; drop one of them")

    from distill.config import ConfigError
    from retro_transfer.safe_io import CheckpointError
    from retro_transfer.pipeline.build import build_stages, finish
    from retro_transfer.pipeline.runner import Context, run_pipeline
    from retro_transfer.utils.run_lock import RunFolderError, run_folder_locked
    from retro_transfer.pipeline.settings import SettingsError, claim_folder, describe, resolve_settings
    from retro_transfer.pipeline.upstream import use_teacher

    try:
        preset = resolve_settings(PRESETS[args.preset], args.seed, args.sets)
        if args.teacher_recipe:
            preset["teacher_recipe"] = args.teacher_recipe
        if args.teacher:
            preset = use_teacher(preset, args.teacher)
        stages = build_stages(preset)
    except (SettingsError, CheckpointError) as err:
        fail(str(err))
    unknown = [s for s in args.force if s != "all" and s not in {stage.name for stage in stages}]
    if unknown:
        fail(f"unknown stage(s) {', '.join(unknown)} for --force; stages: {', '.join(s.name for s in stages)}")
    ctx = Context(Path(args.out).absolute(), preset)
    settings_line = describe(args.preset, preset, PRESETS[args.preset])
    start = time.perf_counter()
    try:
        with run_folder_locked(ctx.out, "--out"):
            claim_folder(ctx.out, args.preset, preset, force_all="all" in args.force)
            print(f"settings: {settings_line}")
            records = run_pipeline(stages, ctx, force=args.force)
            report = finish(ctx, args.preset, records, settings_line)
    except KeyboardInterrupt:
        interrupted(f"the finished stages in {ctx.out} are kept; run the same command again to continue "
                    "from the stage that was stopped")
    except (ConfigError, CheckpointError, RunFolderError, SettingsError, FloatingPointError) as err:
        # FloatingPointError: a run diverged
        fail(str(err))
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
