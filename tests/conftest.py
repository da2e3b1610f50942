import sys
from pathlib import Path

# Make both ``import multiproc`` and ``import tests.multiproc`` work however
# pytest was started (the worker processes use the same two entries).
_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
