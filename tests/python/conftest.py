"""pytest setup for the PyTorch front end: import path, per-test seeds, devices.

The package is imported from <repo>/python (no install needed); the library is found by the
package itself (next to it, in build/, or through FLASHLIN_LIBRARY).
"""
import os
import sys
import zlib

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (from its id): reproducible, and fresh inputs in every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
