"""Test-session settings shared by every test file."""

import os

import torch

# Tests use tiny tensors: one thread avoids oversubscribing the CPU when pytest-xdist runs two workers on 2 cores.
torch.set_num_threads(1)
# Training runs in tests must never reach the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
