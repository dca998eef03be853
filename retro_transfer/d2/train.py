"""The Detectron2 trainer used by ``tools/train_net.py`` and the pipeline."""

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer, hooks

from ..checkpoints import CheckpointError
from .data import build_evaluator
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
    def build_evaluator(cls, cfg, dataset_name):
        return build_evaluator(dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name))

    def train(self):
        """Train, then return the final evaluation's results.

        DefaultTrainer returns them only when TEST.EXPECTED_RESULTS is set; its
        EvalHook always evaluates after the last iteration and keeps them.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)
