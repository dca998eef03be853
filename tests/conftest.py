"""Shared fixtures: one small shapes data set per test session (tiny images keep CI fast)."""

import pytest

from retro_transfer.data.shapes import ShapesConfig, generate

SMALL = ShapesConfig(num_images=24, size=64, seed=0)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A generated shapes data set; tests must treat it as read-only."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", SMALL)
