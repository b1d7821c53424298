"""Test-session settings shared by every test file, and the skip rules for the `slow` and `gpu` markers."""

import os

import pytest
import torch

# Tests use tiny tensors: one thread avoids oversubscribing the CPU when pytest-xdist runs two workers on 2 cores.
torch.set_num_threads(1)
# Training runs in tests must never reach the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--distributed", action="store_true", default=False,
                     help="also run tests marked distributed (real processes: DDP, kill and preemption)")


def pytest_collection_modifyitems(config, items):
    # Skipped tests are listed with their reason in the summary (-ra): nothing is dropped silently.
    skip_slow = pytest.mark.skip(reason="slow test: run `make test-all` (pytest --runslow) to include it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here")
    skip_distributed = pytest.mark.skip(
        reason="starts real processes: `make test-distributed` (pytest --distributed) runs it, as CI does")
    for item in items:
        if "distributed" in item.keywords and not config.getoption("--distributed"):
            item.add_marker(skip_distributed)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
