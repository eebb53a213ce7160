"""Shared test settings, and the one place that puts the user scripts and the benchmark tools on the path."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# scripts/ and benchmarks/ are folders of runnable files, not packages: the tests import them as their
# own directory would when run
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
