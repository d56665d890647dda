"""Shared fixtures: examples loaded by path (examples/ is not a package), HF offline."""

import os
from pathlib import Path

import pytest

from edgeplan.cli import load_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    """Import examples/<name>.py the way `edgeplan compile examples/<name>.py:build` does."""
    return load_module(EXAMPLES / f"{name}.py")


@pytest.fixture
def example():
    return load_example
