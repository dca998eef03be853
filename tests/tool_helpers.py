"""What the tests that call the tools in-process share: loading a tool, one thread, fresh Detectron2 loggers.

Import the fixtures into a test module to use them (both are autouse)::

    from tool_helpers import fresh_detectron2_logging, load_tool, one_thread  # noqa: F401
"""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """``tools/<name>.py`` as a module, so a test can call its ``main`` or ``setup`` in this process."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_detectron2_logging():
    """Let each in-process train_net run set up its loggers anew.

    Detectron2's ``setup_logger`` is cached, so its handlers would keep
    writing to the stdout of the test that first ran a tool, which pytest has
    closed by then (a ``--- Logging error ---`` traceback on stderr).
    """
    from detectron2.utils.logger import setup_logger

    def forget():
        setup_logger.cache_clear()
        for name in ("detectron2", "fvcore"):
            logging.getLogger(name).handlers.clear()

    forget()  # another test module may have run a tool before
    yield
    forget()
