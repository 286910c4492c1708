"""Shared test set-up: no network; the `one_thread` fixture."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds OpenMP overhead, and stalls when other jobs
    share the cores. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
