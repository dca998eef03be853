"""Shared command-line conventions: bad input is one line on stderr and exit code 2.

Importing this module (every tool does, first) also silences the one start-up
warning a user can do nothing about: fvcore, imported by Detectron2, compiles
its focal loss with ``torch.jit.script``, which torch now calls deprecated.
Only that message is filtered.
"""

import argparse
import difflib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The repository's ``configs/`` folder, where bare config names are looked up."""

REPOSITORY = CONFIGS.parent
"""The repository root: ``tools/``, ``bench/`` and ``configs/`` are read from here."""

CONFIG_KINDS = {"detection": ".yaml", "distill": ".yaml", "teacher": ".yaml", "segmentation": ".py", "mmdet": ".py"}


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``prog: error: message`` and exit; for errors a user can fix."""
    prog = argparse.ArgumentParser().prog
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def interrupted(where: str) -> NoReturn:
    """Exit 130 (a shell's code for Ctrl-C) with one line saying where the run stopped and how to go on.

    Tools catch ``KeyboardInterrupt`` around their work and call this instead
    of letting Python print a traceback: files are written atomically, so
    nothing needs repair, and the user needs only the way back in.
    """
    fail(f"interrupted: {where}", code=130)


def load_tool(script: str):
    """A script of the repository (``tools/train_net.py``) as a module, to call its ``build_parser`` or ``main``.

    Its module name is its path with the separators replaced, so that
    ``tools/distill.py`` never stands in for the ``distill`` package; a script
    loaded once is reused, as an imported module would be.
    """
    name = "_script_" + script.replace("/", "_").replace(".", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPOSITORY / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def keep_tools_dir_off_path(script: str) -> None:
    """Let a script in ``tools/`` import the ``distill`` package.

    Python puts a script's folder first on ``sys.path``, and ``tools/distill.py``
    would then shadow the ``distill`` package for every tool. Call this with
    ``__file__`` before importing ``distill``.
    """
    here = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if p == "" or Path(p).resolve() != here]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def check_checkpoint_file(checkpoint: str) -> None:
    """Fail in one line on a checkpoint path that is absent or a folder (before seconds of imports)."""
    if not Path(checkpoint).exists():
        fail(f"checkpoint {checkpoint} does not exist")
    if not Path(checkpoint).is_file():
        fail(f"checkpoint {checkpoint} is a folder, not a checkpoint file")


def fail_on_checkpoint(checkpoint: str, message: str) -> NoReturn:
    """Fail with a checkpoint problem, naming the file when the library's message does not."""
    fail(message if str(checkpoint) in message else f"cannot use checkpoint {checkpoint}: {message}")


def open_frozen_evaluation(args: argparse.Namespace):
    """What tools/linear_eval.py and tools/knn_eval.py do before their protocol: check and load, in one-line errors.

    Resolves the device, checks the ImageFolder and ``--out``, loads the frozen
    encoder of ``--features`` and says what it is. Returns ``(ev, device,
    classes, encoder, info)``, ``ev`` being :mod:`distill.evaluation` (imported
    here, after the arguments were checked: torch takes seconds to import).
    """
    import distill.evaluation as ev
    from distill.checkpoint import load_encoder
    from retro_transfer.safe_io import CheckpointError

    try:
        device = ev.resolve_device(args.device)
        classes = ev.check_image_folder(args.data)
        if args.out:
            ev.check_output_path(args.out)
    except ValueError as err:  # DataError included: a missing or empty folder
        fail(str(err))
    check_checkpoint_file(args.checkpoint)
    try:
        encoder, info = load_encoder(args.checkpoint, which=args.features)
    except CheckpointError as err:  # the library's word for our flag
        fail_on_checkpoint(args.checkpoint, str(err).replace("which='backbone'", "--features backbone"))
    print(f"features: {ev.describe_features(info)}, arch {info.get('arch', '?')}, from {args.checkpoint}")
    return ev, device, classes, encoder, info


def evaluation_report(ev, args: argparse.Namespace, info, classes, seconds: float, protocol: str, **sections) -> dict:
    """The JSON an evaluation tool writes: protocol, checkpoint and features, ``sections``, data, time, arguments."""
    return {"protocol": protocol, "checkpoint": str(args.checkpoint), "features": ev.describe_features(info),
            "info": dict(info), **sections,
            "data": {"root": str(args.data), "num_classes": len(classes), "classes": classes},
            "seconds": round(seconds, 2), "args": vars(args)}


def write_evaluation(ev, args: argparse.Namespace, payload: dict) -> None:
    """Write an evaluation tool's results to ``--out``, when given, or fail in one line."""
    if args.out:
        try:
            print(f"results written to {ev.write_results(args.out, payload)}")
        except (ValueError, OSError) as err:
            fail(str(err))


def add_evaluation_inputs(parser: argparse.ArgumentParser, features: bool = True) -> None:
    """The arguments the evaluation tools share: what to evaluate, on what data, how it is loaded.

    ``features=False`` leaves out ``--features`` for protocols that fine-tune
    the backbone itself (the Retro adapter is a distillation-only module).
    """
    parser.add_argument("checkpoint", help="distillation checkpoint, or a teacher checkpoint (e.g. MoCo v2 .pth.tar)")
    parser.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    if features:
        parser.add_argument(
            "--features",
            choices=("backbone", "adapter"),
            default="backbone",
            help="use the pooled backbone (default) or the Retro adapter output",
        )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="default %(default)s")
    parser.add_argument("--image-size", type=positive_int, default=224, help="crop size in pixels (default %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=4, help="data-loading processes (default %(default)s)")


def add_runner_train_arguments(parser: argparse.ArgumentParser, cfg_option_example: str) -> None:
    """The arguments after CONFIG that tools/train_seg.py and tools/train_det.py share.

    They are what :func:`retro_transfer.mmseg.launch.train_or_evaluate` reads,
    in either toolbox; each tool adds its CONFIG (its configs folder) first.
    """
    from mmengine.config import DictAction  # only the OpenMMLab tools pay for MMEngine

    parser.add_argument("--data-root", help="the data folder for every data loader (replaces each dataset's data_root)")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="resume training: from the latest checkpoint in the work dir, or from CHECKPOINT")
    parser.add_argument("--amp", action="store_true", help="mixed-precision training (needs a GPU)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate a checkpoint on the test set, no training")
    parser.add_argument("--checkpoint", help="with --eval-only: the checkpoint (default: latest in the work dir)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help=f"override config entries, e.g. {cfg_option_example}")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher for distributed training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def add_runner_test_arguments(parser: argparse.ArgumentParser, checkpoint_help: str, cfg_option_example: str) -> None:
    """The arguments after CONFIG that tools/test_seg.py and tools/test_det.py share.

    They are what :func:`retro_transfer.mmseg.launch.evaluate` reads, in
    either toolbox; each tool adds its CONFIG (its configs folder) first.
    """
    from mmengine.config import DictAction  # only the OpenMMLab tools pay for MMEngine

    parser.add_argument("checkpoint", help=checkpoint_help)
    parser.add_argument("--data-root", help="the data folder for every data loader (replaces each dataset's data_root)")
    parser.add_argument("--work-dir", help="where the test log goes (default work_dirs/<config name>)")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help=f"override config entries, e.g. {cfg_option_example}")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def _named(name: str, kind: str) -> Path:
    """``configs/<kind>/<name>``, with the kind's suffix added when ``name`` lacks it."""
    suffix = CONFIG_KINDS[kind]
    return CONFIGS / kind / (name if name.endswith(suffix) else name + suffix)


def resolve_config(name: str, kind: str) -> Path:
    """The config a user means by ``name``: a path as given, else a name in ``configs/<kind>/``.

    ``voc_frcnn_effb0.yaml``, ``voc_frcnn_effb0`` and
    ``configs/detection/voc_frcnn_effb0.yaml`` (from any folder) all name
    ``configs/detection/voc_frcnn_effb0.yaml``. An unknown name raises
    FileNotFoundError listing the closest names of that kind, or saying which
    kind it is (a segmentation config given to train_net, say).
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and (CONFIGS.parent / path).is_file():
        return CONFIGS.parent / path
    if path.parent == Path("."):
        if _named(name, kind).is_file():
            return _named(name, kind)
        for other in CONFIG_KINDS:
            if other != kind and _named(name, other).is_file():
                raise FileNotFoundError(f"config {name} is a {other} config ({_named(name, other)}), not a {kind} one")
    known = sorted(p.name for p in (CONFIGS / kind).glob("*" + CONFIG_KINDS[kind]))
    close = difflib.get_close_matches(_named(path.name, kind).name, known, n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else f"the names are in {CONFIGS / kind}"
    raise FileNotFoundError(
        f"config {name} does not exist, neither as a path nor as a name in {CONFIGS / kind}; {hint}"
    )


def config_file(kind: str) -> Callable[[str], str]:
    """argparse ``type`` that resolves a config name of ``kind`` (see :func:`resolve_config`)."""

    def resolve(text: str) -> str:
        try:
            return str(resolve_config(text, kind))
        except FileNotFoundError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    resolve.__name__ = f"{kind} config"  # how argparse names the type in messages
    return resolve
