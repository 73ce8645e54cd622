"""Test configuration.

CUDA code runs in numba's CUDA simulator unless CHARON_TEST_REAL_GPU=1 (the
device machine): the variable must be set before numba.cuda is imported.
"""

import os

if os.environ.get("CHARON_TEST_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    import numba.core.config

    # pytest may have imported numba already (warning filters name its classes): re-read the environment.
    numba.core.config.reload_config()

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cpu():
    from charon.engines.cpu import cpu_kernels

    return cpu_kernels()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def zmq_pair():
    """``zmq_pair(bind_kind, connect_kind)``: two sockets of a fresh context on a random loopback port, the
    first bound, the second connected, both closed (no linger) with the context after the test."""
    import zmq

    ctx, made = zmq.Context(), []

    def make(bind_kind, connect_kind):
        a, b = ctx.socket(bind_kind), ctx.socket(connect_kind)
        made.extend((a, b))
        for s in (a, b):
            s.setsockopt(zmq.LINGER, 0)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        return a, b

    yield make
    for s in made:
        s.close(0)
    ctx.term()


def pytest_collection_modifyitems(config, items):
    real_gpu = os.environ.get("CHARON_TEST_REAL_GPU") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a real GPU: set CHARON_TEST_REAL_GPU=1 on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords and not real_gpu:
            item.add_marker(skip_gpu)
