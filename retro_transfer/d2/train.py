"""The Detectron2 trainer used by ``tools/train_net.py`` and the pipeline."""

import os
import weakref

from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer

from .data import build_evaluator, training_records
from .weights import RetroCheckpointer


class RetroTrainer(DefaultTrainer):
    """DefaultTrainer with this project's evaluators and a checkpointer that checks converted weights."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # Loading goes through self.checkpointer; the periodic-save hook keeps
        # the plain DetectionCheckpointer it was built with, which saves the same.
        self.checkpointer = RetroCheckpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

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
