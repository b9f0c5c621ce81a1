"""Test configuration: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, hence before fastfuse's Triton
modules are imported; conftest runs first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastfuse  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (real shapes)")
    config.addinivalue_line("markers", "slow: long-running on CPU; still part of the default run")


@pytest.fixture
def shared_data():
    from testing_utils import shared_data_dir
    path = shared_data_dir()
    if path is None:
        pytest.skip("the shared data folder (../shared/data beside the checkout) is not present")
    return path


@pytest.fixture
def one_thread():
    """Tiny shapes: a second OpenMP thread only adds synchronisation (and contention on a shared
    machine). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
