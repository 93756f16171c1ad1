"""Test-wide settings: the Triton interpreter on CPU, and reproducible hypothesis runs."""

import os

import pytest
import torch

# @triton.jit reads this when kernels.py is imported, so it must be set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Derandomized so that CI is reproducible; no deadline since the 2-core machine's timing varies.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module of small-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    torchrun's workers run one thread each, and so do in-process runs (--threads 1), so float sums
    happen in the same order; and for tiny models a second thread only adds synchronisation on a
    busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
