"""The Detectron2 trainer used by ``tools/train_net.py`` and the pipeline, and how its start-up is reported."""

import logging
import os
import weakref
from pathlib import Path
from typing import Optional

from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks

from ..safe_io import CheckpointError
from ..utils.device import Workload, cpu_warning
from ..utils.quiet import DropInfo, quiet_console
from .data import build_evaluator, training_records
from .weights import RetroCheckpointer


class _ToldInOneLine(logging.Filter):
    """Drop the train loop's traceback of a CheckpointError (a full disk...): tools/train_net.py prints it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], CheckpointError))


logging.getLogger("detectron2.engine.train_loop").addFilter(_ToldInOneLine())


class RetroTrainer(DefaultTrainer):
    """DefaultTrainer with this project's evaluators and a checkpointer that checks converted weights."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.checkpointer = RetroCheckpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        # The periodic-save hook (which writes model_final.pth) saves through it too: atomically.
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader over :func:`training_records` (objects there, and at least one batch of images)."""
        return build_detection_train_loader(cfg, dataset=training_records(cfg))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return build_evaluator(dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name))

    def train(self):
        """Train, then return the final evaluation's results.

        DefaultTrainer returns them only when TEST.EXPECTED_RESULTS is set; its
        EvalHook always evaluates after the last iteration and keeps them.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)


CPU_SIZED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection" / "base_shapes.yaml"
"""The detection config sized for a CPU (minutes): the yardstick of :func:`cpu_workload_warning`."""


def workload(cfg) -> Workload:
    """What a config's training costs: iterations, images per iteration, the largest short side they are resized to."""
    return Workload(cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH, max(cfg.INPUT.MIN_SIZE_TRAIN))


def cpu_workload_warning(cfg) -> Optional[str]:
    """A one-line warning when a config sized for GPUs (a VOC or COCO recipe) is to train on the CPU; else None."""
    if not str(cfg.MODEL.DEVICE).startswith("cpu"):
        return None
    from .config import load_config

    advice = ("lower SOLVER.MAX_ITER, SOLVER.IMS_PER_BATCH or INPUT.MIN_SIZE_TRAIN, "
              "or train a configs/detection/shapes_*.yaml config")
    return cpu_warning(workload(cfg), workload(load_config(CPU_SIZED_CONFIG, register=False)), advice)


STARTUP = DropInfo(
    loggers=("detectron2",), families=("detectron2.data", "detectron2.utils.env"), starts=("Model:\n",),
    harmless=("Some model parameters or buffers are not found in the checkpoint",),
)
"""What a quiet console leaves out: ``default_setup``'s environment table, arguments and config dumps (logged on
``detectron2`` itself), the model's repr, the data loaders' statistics and the seed; and fvcore's list of the
layers a backbone file does not hold (FPN, heads), which RetroCheckpointer has already checked are only those.
Other warnings always show."""


def quiet_detectron2_console(output_dir: str) -> None:
    """Set up Detectron2's loggers as ``default_setup`` will, with :data:`STARTUP` on their console handlers.

    ``setup_logger`` is cached on its arguments, so ``default_setup``, calling
    it with the same ones, gets these loggers back instead of new handlers.
    The log file (``OUTPUT_DIR/log.txt``) still receives every record.
    """
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    for name in ("fvcore", "detectron2"):
        quiet_console(name, STARTUP)
