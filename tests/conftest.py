import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("HIMAP_TEST_THREADS", "1")))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def shared_dir():
    """../shared beside the repository (real benchmark question files)."""
    path = os.path.abspath(os.environ.get("HIMAP_SHARED", SHARED))
    if not os.path.isdir(path):
        pytest.fail(f"shared data folder not found at {path}; set HIMAP_SHARED")
    return path
