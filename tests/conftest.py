"""Hypothesis profiles (and ``--reverse-order``, to show that no test depends on test order): the
suite (and CI) runs a fixed, derandomized set of examples so that a
green run stays green for the same code; ``HYPOTHESIS_PROFILE=explore`` draws fresh random
examples (more of them) to hunt for new counter-examples."""

import os
import socket

import pytest
from hypothesis import settings

from tests.envs import DIST_ENV

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def single_rank_group():
    """A 1-rank gloo process group for the module's tests; the environment is restored after."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.barrier()
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (no test may depend on the "
                          "ones before it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()
