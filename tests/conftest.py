import sys
from pathlib import Path

import pytest
import torch

# Make both ``import multiproc`` and ``import tests.multiproc`` work however
# pytest was started (the worker processes use the same two entries).
_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture
def one_thread():
    """In-process training on one torch thread, as ``parml train`` runs (--threads 1): tiny blocks
    on several threads of a busy machine run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
