"""Shared fixtures of the kdloss Python tests.

The library is taken from KDLOSS_LIBRARY (set by the CTest entry
python_tests).  Without it, and when no libkdloss.so can be found at all, the
tests are skipped with the reason; a KDLOSS_LIBRARY that is set but unusable
is an error.
"""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs torch with a CUDA device and a CUDA build of kdloss")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KDLOSS_LIBRARY"):
        return
    try:
        import kdloss

        kdloss.library_path()
    except OSError as e:
        skip = pytest.mark.skip(reason=f"libkdloss.so not found (set KDLOSS_LIBRARY): {e}")
        for item in items:
            item.add_marker(skip)
