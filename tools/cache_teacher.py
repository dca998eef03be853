#!/usr/bin/env python
"""Run the frozen teacher once over every view a distillation will see, and store its embeddings.

    python tools/cache_teacher.py --config configs/distill/retro_effb0_r50.yaml [key=value ...] --out runs/cache/r50
    torchrun --nproc_per_node 8 tools/cache_teacher.py --config ... --out ...
    python tools/distill.py --config ... [the same key=value ...] teacher.cache=runs/cache/r50

The config and overrides are those of the distillation (its data, teacher,
seed, image size, global batch and steps; a disco or retro config caches two
views per image, which serves seed, disco and retro). Embeddings are stored as
float16 (``--dtype int8``: half the disk, with a scale per row). Running the
same command again continues a build that stopped.
"""

import sys

from retro_transfer.cli import OneLineErrorParser, config_file, fail, interrupted, keep_tools_dir_off_path, positive_int

# Before any import of the library, which imports the distill package that this folder's distill.py would shadow.
keep_tools_dir_off_path(__file__)

from retro_transfer.safe_io import CheckpointError  # noqa: E402


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=config_file("distill"), help="a YAML file, or a name in configs/distill/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys), as for tools/distill.py")
    parser.add_argument("--out", required=True, help="folder of the cache (created; an unfinished one is continued)")
    parser.add_argument("--dtype", choices=("float16", "int8"), default="float16", help="storage of each value (default %(default)s)")
    parser.add_argument("--steps-per-shard", type=positive_int, default=None, help="steps per shard file (default: about 64 MiB a shard)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from distill.cache_builder import build_cache
    from distill.config import ConfigError, load_config
    from retro_transfer.utils.run_lock import RunFolderError, run_folder_locked

    try:
        cfg = load_config(args.config, args.overrides)
        with run_folder_locked(args.out, "--out"):
            summary = build_cache(cfg, args.out, args.dtype, args.steps_per_shard)
    except KeyboardInterrupt:
        interrupted(f"the shards written to {args.out} are kept (each is whole); run the same command again to "
                    "continue the build")
    except (ConfigError, CheckpointError, RunFolderError) as err:
        fail(str(err))
    print(
        f"done: {args.out} holds the teacher's embeddings of {summary['views']} view(s) x {summary['steps']} steps "
        f"in {summary['shards']} shard(s), {summary['megabytes']:.1f} MiB ({summary['dtype']}); "
        f"this process computed {summary['computed_here']} of them; distil with teacher.cache={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
