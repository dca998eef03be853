"""What the OpenMMLab tools share: read a config, build MMEngine's Runner, run the tools' flows.

``tools/train_seg.py``/``tools/test_seg.py`` use this module as their toolbox;
``tools/train_det.py``/``tools/test_det.py`` use :mod:`retro_transfer.mmdet.launch`,
with the same flows (:func:`train_or_evaluate`, :func:`evaluate`).

The Runner does the work (training loop, validation, checkpoints, resume,
distributed launch); this module only turns command-line choices into config
entries and checks the files a run needs before it spends minutes starting.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.runner import Runner, find_latest_checkpoint

from retro_transfer.safe_io import CheckpointError, safe_load, save_atomic
from retro_transfer.openmmlab_config import read_config
from retro_transfer.openmmlab_files import AtomicLocalBackend  # noqa: F401  (checkpoints written atomically)
from retro_transfer.utils.device import Workload, cpu_warning
from retro_transfer.utils.quiet import DropInfo, quiet_console, silence_internal_warnings

from .checks import check_data, check_segmentor_checkpoint, checkpoint_to_load

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def load_config(
    path: os.PathLike,
    cfg_options: Optional[Mapping] = None,
    work_dir: Optional[os.PathLike] = None,
    launcher: str = "none",
    data_root: Optional[os.PathLike] = None,
) -> Config:
    """The config at ``path`` with ``--cfg-options`` merged, a work dir and the launcher set.

    ``data_root`` (``--data-root``) replaces the data root of every data
    loader's dataset, after ``cfg_options``; whether the folder holds what the
    config expects is checked when a run starts (:mod:`.checks`).
    The work dir defaults to ``work_dirs/<config name>`` (MMSeg's convention).
    A distributed launch needs GPUs: MMEngine's set-up pins each process to one.
    A data loader with no worker processes gets ``persistent_workers=False``
    (PyTorch refuses the combination), so ``num_workers=0`` is one option.
    YAML/JSON configs and their ``_base_`` files are read as data only
    (:func:`retro_transfer.openmmlab_config.read_config`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist (configs live in configs/segmentation/)")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if launcher != "none" and not torch.cuda.is_available():
        raise ValueError(
            f"--launcher {launcher} needs GPUs (MMEngine's distributed set-up calls torch.cuda.set_device); "
            "on a CPU, train in one process without --launcher"
        )
    cfg = read_config(path)  # YAML/JSON as data only; a .py config is code, run by MMEngine
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / path.stem)
    for name in _LOADERS:
        loader = cfg.get(name)
        if loader is not None and loader.get("num_workers", 0) == 0:
            loader["persistent_workers"] = False
        if loader is not None and data_root is not None:
            _set_data_root(loader.dataset, str(data_root))
    return cfg


def _set_data_root(dataset: Mapping, data_root: str) -> None:
    """Set ``data_root`` on a dataset config, or on the datasets a wrapper (Concat, Repeat...) holds."""
    inner = dataset.get("datasets") or ([dataset["dataset"]] if "dataset" in dataset else [])
    for child in inner:
        _set_data_root(child, data_root)
    if not inner:
        dataset["data_root"] = data_root


def check_pretrained(cfg: Config) -> None:
    """Fail before the Runner starts if the backbone's pretrained file is not there."""
    init_cfg = cfg.model.get("backbone", {}).get("init_cfg")
    if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained":
        return
    checkpoint = init_cfg.get("checkpoint")
    if not checkpoint:
        raise CheckpointError(
            "the config's backbone has no pretrained checkpoint; pass --cfg-options "
            "model.backbone.init_cfg.checkpoint=STUDENT_OPENMMLAB.pth (from tools/convert_to_openmmlab.py), "
            "or model.backbone.init_cfg=None to train from random initialisation"
        )
    if "://" not in str(checkpoint) and not Path(checkpoint).is_file():
        raise CheckpointError(
            f"backbone checkpoint {checkpoint} does not exist (model.backbone.init_cfg.checkpoint); "
            "write it with tools/convert_to_openmmlab.py STUDENT.pth OUT.pth"
        )


def set_resume(cfg: Config, resume: Optional[str]) -> None:
    """``resume='auto'``: the latest checkpoint in the work dir; otherwise the given file."""
    if resume is None:
        return
    cfg.resume = True
    if resume == "auto":
        cfg.load_from = None
        return
    if not Path(resume).is_file():
        raise CheckpointError(f"checkpoint to resume from {resume} does not exist")
    cfg.load_from = str(resume)


def resolve_checkpoint(cfg: Config, checkpoint: Optional[str]) -> str:
    """The checkpoint to evaluate: the one given, else the latest in the work dir."""
    if checkpoint is None:
        checkpoint = find_latest_checkpoint(cfg.work_dir)
        if checkpoint is None:
            raise CheckpointError(f"no checkpoint in {cfg.work_dir} to evaluate; pass one with --checkpoint")
    elif "://" not in str(checkpoint) and not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    return str(checkpoint)


def _read_checkpoint(cfg: Config) -> Tuple[Optional[str], Optional[dict]]:
    """The checkpoint the Runner will load, read here with ``weights_only`` loading first.

    A file that is not safe weights then gets the toolkit's one-line refusal
    rather than torch's advice to turn safe loading off, before anything starts.
    """
    path = checkpoint_to_load(cfg)
    if not path or "://" in path:
        return path, None
    try:
        return path, safe_load(path)
    except CheckpointError:
        if _is_detectron2_weights(path):
            raise CheckpointError(
                f"{path} is a Detectron2 weights file (.pkl), not an MMSegmentation checkpoint: it is for "
                f"tools/train_net.py (MODEL.WEIGHTS {path}). Segmentation takes the Runner's iter_N.pth that "
                "tools/train_seg.py writes, and starts from a student converted by tools/convert_to_mmseg.py"
            ) from None
        raise


def _is_detectron2_weights(path: str) -> bool:
    """Whether ``path`` reads as a Detectron2 ``.pkl`` weights file (read with its own allow-list unpickler).

    torch's weights-only loader refuses those plain pickles of numpy arrays as
    "code or Python objects", which misleads the owner of a legitimate file.
    """
    from retro_transfer.d2.pickles import load_weights_pickle  # imports Detectron2: only on this error path

    try:
        weights = load_weights_pickle(path)
    except CheckpointError:
        return False
    return isinstance(weights.get("model", weights.get("blobs")), dict)


class QuietRunner(Runner):
    """MMEngine's Runner whose console leaves out its start-up report (environment, config, hook order).

    Its log file in the work dir keeps the report; warnings always show.
    """

    STARTUP = DropInfo(
        starts=("\n---", "Config:\n", "Hooks will be executed", "Distributed training is not used"),
        # MMEngine's and MMSeg's notes on their own APIs, which these configs use as documented.
        harmless=("The prefix is not set in metric class", '"FileClient" will be deprecated',
                  '"HardDiskBackend" is the alias'),
    )

    def build_logger(self, *args, **kwargs):
        logger = super().build_logger(*args, **kwargs)
        quiet_console(logger, self.STARTUP)
        return logger


def name_this_run(cfg: Config) -> Config:
    """Give the Runner an experiment name of its own, unless the config sets one.

    MMEngine hands a Runner the visualizer and message hub of an earlier one
    of the same name: the configs name their visualizer ``visualizer`` (as
    MMSeg's and MMDetection's runtime bases do), and the message hub is named
    after the config file and the second the run started. Two runs in one
    process (the pipeline's stages, a test after another) then wrote the
    second run's scalars into the first run's work dir. ``get_current_instance``
    still finds the run's visualizer, whatever its name.
    """
    if not cfg.get("experiment_name"):
        stem = Path(cfg.filename).stem if cfg.filename else "run"
        cfg.experiment_name = f"{stem}_{uuid.uuid4().hex[:8]}"  # the Runner appends its start time
    if cfg.get("visualizer"):
        cfg.visualizer.name = cfg.experiment_name
    return cfg


def _runner(cfg: Config, path: Optional[str], ckpt: Optional[dict], verbose: bool = False) -> Runner:
    """The Runner, once the checkpoint it will load is known to fill its model; quiet unless ``verbose``."""
    if not verbose:
        silence_internal_warnings()
    runner = (Runner if verbose else QuietRunner).from_cfg(name_this_run(cfg))
    if ckpt is not None:
        check_segmentor_checkpoint(runner.model, ckpt, path)
    return runner


def train(cfg: Config, verbose: bool = False) -> Runner:
    """Train (and validate every ``val_interval``) as the config says; returns the Runner."""
    check_pretrained(cfg)  # the Runner initialises the backbone even when it then resumes
    path, ckpt = _read_checkpoint(cfg)
    check_data(cfg, ["train_dataloader"] + (["val_dataloader"] if cfg.get("val_cfg") else []))
    runner = _runner(cfg, path, ckpt, verbose)
    runner.train()
    return runner


def test(cfg: Config, checkpoint: str, verbose: bool = False) -> dict:
    """Evaluate ``checkpoint`` (a Runner checkpoint) on the config's test set; returns the metrics."""
    cfg.load_from = checkpoint
    cfg.resume = False
    path, ckpt = _read_checkpoint(cfg)
    check_data(cfg, ["test_dataloader"])
    return dict(_runner(cfg, path, ckpt, verbose).test())


CPU_SIZED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "segmentation" / "shapes_fcn_r18.py"
"""The segmentation config sized for a CPU (minutes): the yardstick of :func:`cpu_workload_warning`."""


def workload(cfg: Config) -> Optional[Workload]:
    """What a config's training costs (iterations, batch, crop side); None for a config without ``crop_size``."""
    crop = cfg.get("crop_size")
    return Workload(cfg.train_cfg.max_iters, cfg.train_dataloader.batch_size, max(crop)) if crop else None


def cpu_workload_warning(cfg: Config, on_cpu: Optional[bool] = None) -> Optional[str]:
    """A one-line warning when a config sized for GPUs is to train on the CPU; else None.

    ``on_cpu`` defaults to where MMEngine will put the run: the CPU when torch finds no CUDA device.
    """
    run = workload(cfg)
    if run is None or not (on_cpu if on_cpu is not None else not torch.cuda.is_available()):
        return None
    advice = ("lower train_cfg.max_iters or train_dataloader.batch_size with --cfg-options, "
              "or train a configs/segmentation/shapes_*.py config")
    return cpu_warning(run, workload(Config.fromfile(str(CPU_SIZED_CONFIG))), advice)


def stopped_at(work_dir: str) -> str:
    """Where an interrupted Runner training stands (MMSeg or MMDetection): its last checkpoint, and how to continue."""
    last = find_latest_checkpoint(work_dir) if os.path.isdir(work_dir) else None
    if last is None:
        return f"stopped before the first checkpoint in {work_dir}; run the same command again to start over"
    return f"the last checkpoint is {last}: continue with the same command and --resume"


def work_dir_holds_run(cfg: Config) -> bool:
    """A previous run wrote checkpoints here (MMEngine's ``last_checkpoint`` marker)."""
    return Path(cfg.work_dir, "last_checkpoint").is_file()


def train_or_evaluate(args, toolbox, errors: Tuple[type, ...] = (), run_options: Optional[dict] = None,
                      workload_warning: Optional[Callable[[Config], Optional[str]]] = None) -> int:
    """What tools/train_seg.py and tools/train_det.py do with their arguments, in either toolbox.

    ``toolbox`` is this module or :mod:`retro_transfer.mmdet.launch`. The
    arguments are checked, the config read, its work dir held under the run lock, then a checkpoint is
    evaluated (``--eval-only``, metrics printed as one JSON line) or training
    starts, new or resumed. ``run_options`` go to the toolbox's ``train`` and
    ``test``; ``workload_warning(cfg)`` may print one line before training.
    A refusal (``errors`` adds the toolbox's own) is one line, and Ctrl-C says
    where the run stopped.
    """
    from retro_transfer.cli import fail, interrupted
    from retro_transfer.utils.run_lock import RunFolderError, run_folder_locked

    _take_local_rank(args)
    if args.checkpoint and not args.eval_only:
        fail("--checkpoint is for --eval-only; to continue training from a checkpoint use --resume CHECKPOINT")
    if args.eval_only and (args.resume or args.amp):
        fail("--eval-only does not train: drop --resume/--amp")
    cfg = None
    try:
        cfg = toolbox.load_config(args.config, args.cfg_options, args.work_dir, args.launcher, args.data_root)
        with run_folder_locked(cfg.work_dir, "work dir"):
            return _train_or_evaluate(args, cfg, toolbox, run_options or {}, workload_warning)
    except KeyboardInterrupt:
        if cfg is None or args.eval_only:
            interrupted("stopped before any training; nothing was written")
        interrupted(toolbox.stopped_at(cfg.work_dir))
    except (CheckpointError, FileNotFoundError, ValueError, RunFolderError, *errors) as e:
        fail(str(e))


def _train_or_evaluate(args, cfg: Config, toolbox, options: dict, workload_warning) -> int:
    if args.eval_only:
        report_metrics(toolbox.test(cfg, toolbox.resolve_checkpoint(cfg, args.checkpoint), **options))
        return 0
    prepare_training(args, cfg, toolbox)
    warning = workload_warning(cfg) if workload_warning else None
    if warning:
        print(warning, flush=True)
    toolbox.train(cfg, **options)
    return 0


def prepare_training(args, cfg: Config, toolbox) -> None:
    """Apply a training tool's ``--amp`` and ``--resume`` to ``cfg``; a work dir that already holds a run
    is refused unless resumed. Shared by the tools and the pipeline's in-process stages."""
    from retro_transfer.cli import fail

    if args.amp:
        if not torch.cuda.is_available():
            fail("--amp needs a GPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if not args.resume and toolbox.work_dir_holds_run(cfg):
        fail(f"work dir {cfg.work_dir} already holds a run (last_checkpoint); continue it with --resume, "
             "or give another --work-dir")
    toolbox.set_resume(cfg, args.resume)


def evaluate(args, toolbox, errors: Tuple[type, ...] = ()) -> int:
    """What tools/test_seg.py and tools/test_det.py do with their arguments, in either toolbox.

    ``toolbox`` is this module or :mod:`retro_transfer.mmdet.launch`. The
    config is read and ``args.checkpoint`` evaluated on its test set; the
    metrics are printed as one JSON line, and written to ``args.out`` when
    given. A refusal (``errors`` adds the toolbox's own) is one line.
    """
    from retro_transfer.cli import fail

    _take_local_rank(args)
    try:
        cfg = toolbox.load_config(args.config, args.cfg_options, args.work_dir, args.launcher, args.data_root)
        report_metrics(toolbox.test(cfg, toolbox.resolve_checkpoint(cfg, args.checkpoint)), args.out)
    except (CheckpointError, FileNotFoundError, ValueError, *errors) as e:
        fail(str(e))
    return 0


def _take_local_rank(args) -> None:
    """``LOCAL_RANK`` from ``--local_rank`` when the launcher did not set it (torch.distributed.launch passes the flag)."""
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)


def report_metrics(metrics: Mapping, out: Optional[Path] = None) -> None:
    """Print an evaluation's metrics as one JSON line; also write that line to ``out`` (atomically) when given.

    The line is what a script (the pipeline, CI) parses, so every tool that
    evaluates prints the same one. A failed write is a ``CheckpointError``.
    """
    line = json.dumps(metrics, sort_keys=True, default=float)
    print(line)
    if out:
        save_atomic(line + "\n", out, dump=lambda text, f: f.write(text.encode()))
