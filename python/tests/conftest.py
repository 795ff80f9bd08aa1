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


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """torch.distributed with one rank in this process (gloo), for the
    vocabulary-parallel tests; torch is imported only by the tests that ask."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
