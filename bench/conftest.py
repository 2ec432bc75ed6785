"""pytest collects bench/bench_*.py as test modules (`pytest bench/ --benchmark-only`), and the
benchmarks can `import roofline` from this folder."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
