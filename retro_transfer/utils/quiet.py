"""A quiet start: the console shows the run's progress and problems; ``--verbose`` (and the log file) keep the rest.

Detectron2 and MMEngine open a run with hundreds of lines a user rarely
reads (an environment table, the whole config, the model's ``repr``), and
torch adds warnings about its own internals. They bury the lines that matter:
the first loss, a refusal, a warning about the data. The filters here act on
the console only; the log files the frameworks write keep every record.
"""

import logging
import sys
import warnings
from typing import Iterable, Union

HARMLESS_WARNINGS = (
    # Detectron2's anchor generator calls torch.meshgrid without indexing=; the default it relies on is kept.
    (r"torch\.meshgrid: in an upcoming release", UserWarning),
    # mmcv-lite lacks the compiled ops; the configs here use none of them.
    (r"Fail to import ``MultiScaleDeformableAttention``", UserWarning),
    # MMSeg's own deprecation inside its model builder, and its visualisation hook, off in these configs.
    (r"``build_loss`` would be deprecated soon", UserWarning),
    (r"The draw is False", UserWarning),
)
"""(message regex, category) of warnings about library internals that need nothing from the user."""

INTERNAL_LOGGERS = ("torch.utils.cpp_extension", "torch.fx._symbolic_trace")
"""torch loggers whose warnings are about its own build or tracing internals (CUDA_HOME, is_fx_tracing)."""


def silence_internal_warnings() -> None:
    """Hide the warnings listed in HARMLESS_WARNINGS and INTERNAL_LOGGERS (errors still show)."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in INTERNAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class DropInfo(logging.Filter):
    """Drops INFO (and DEBUG) records from some loggers, or starting with some words; warnings always pass.

    ``loggers``: names whose own records go (not their children's);
    ``families``: names whose records and children's records go;
    ``starts``: message beginnings that go whatever the logger;
    ``harmless``: beginnings of warnings about a library's own internals, which go too.
    """

    def __init__(self, loggers: Iterable[str] = (), families: Iterable[str] = (), starts: Iterable[str] = (),
                 harmless: Iterable[str] = ()) -> None:
        super().__init__()
        self.loggers = frozenset(loggers)
        self.families = tuple(families)
        self.starts = tuple(starts)
        self.harmless = tuple(harmless)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return record.levelno >= logging.ERROR or not str(record.msg).startswith(self.harmless or ("\0",))
        name = record.name
        if name in self.loggers or any(name == f or name.startswith(f + ".") for f in self.families):
            return False
        return not (self.starts and str(record.msg).startswith(self.starts))


def quiet_console(logger: Union[str, logging.Logger], drop: DropInfo) -> None:
    """Put ``drop`` on the handlers of ``logger`` that write to the console, not on those writing a log file.

    Detectron2 writes its log file through a plain ``StreamHandler`` on an
    open file, so the stream, not the handler's class, tells them apart.
    """
    console = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    logger = logging.getLogger(logger) if isinstance(logger, str) else logger
    for handler in logger.handlers:
        if getattr(handler, "stream", None) in console:
            handler.addFilter(drop)
