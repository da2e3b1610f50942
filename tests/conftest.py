"""Shared test setup: helper imports, markers, the MNIST fixture, and CI's no-skipping switches.

Layout: tests/unit (one process), tests/distributed (real ranks: gloo processes, torchrun,
mpirun), tests/bench (the benchmarks' --quick runs), tests/gpu (CUDA only). Helpers at the
top of tests/ (multiproc, cases, reference, _worker) import as plain modules from every folder.

Markers: ``mpi`` (added here to every test parametrized with the "mpi" or "mpirun" backend, or
marked by hand), ``gpu`` (every test under tests/gpu), ``slow`` (more than ~20 s on 2 cores);
all run by default: ``-m "not slow"`` is the quick loop.

Skips that CI must not accept: with ``PARML_REQUIRE_MPI=1`` a test skipped because mpirun or
mpi4py is missing fails, and with ``PARML_REQUIRE_MNIST=1`` so does a test skipped because the
MNIST fixture (tests/fixtures/mnist) is missing. Skips for the full MNIST set (../shared beside
the repository) and for CUDA stay skips.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):      # `import multiproc` and `import tests.x` both work
    if _p not in sys.path:
        sys.path.insert(0, _p)

from multiproc import MPI_MISSING  # noqa: E402

import _rank_preload  # noqa: E402

MNIST_FIXTURE = _TESTS / "fixtures" / "mnist"
MNIST_MISSING = "MNIST fixture missing"
FULL_MNIST_MISSING = "full MNIST set absent"
REQUIRED = {"PARML_REQUIRE_MPI": MPI_MISSING, "PARML_REQUIRE_MNIST": MNIST_MISSING}
_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="session")
def mnist_fixture() -> Path:
    """tests/fixtures/mnist: 600 images of the official MNIST test set in IDX gzip format."""
    missing = [f for f in _FILES if not (MNIST_FIXTURE / f).is_file()]
    if missing:
        pytest.skip(f"{MNIST_MISSING}: no {', '.join(missing)} in {MNIST_FIXTURE}")
    return MNIST_FIXTURE


@pytest.fixture(scope="session")
def full_mnist() -> Path:
    """The full MNIST files in ../shared/data/mnist beside the repository (absent in a fresh clone)."""
    from parml.data import default_mnist_dir

    path = default_mnist_dir()
    if path is None or not (Path(path) / _FILES[0]).is_file():
        pytest.skip(f"{FULL_MNIST_MISSING}: needs {_FILES[0]} in ../shared/data/mnist beside the repository")
    return Path(path)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's default): two test files at a time on 2 cores, half the cores on
    bigger machines (most tests start ranks of their own). ``-n 0`` runs in this process."""
    return max(2, min((os.cpu_count() or 2) // 2, 8))


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if _TESTS / "gpu" in path.parents:
            item.add_marker(pytest.mark.gpu)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(v in ("mpi", "mpirun") for v in callspec.params.values()):
            item.add_marker(pytest.mark.mpi)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under PARML_REQUIRE_MPI=1 / PARML_REQUIRE_MNIST=1 a skip for that reason is a failure."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    for var, prefix in REQUIRED.items():
        if os.environ.get(var) == "1" and prefix in reason:
            report.outcome = "failed"
            report.longrepr = f"{var}=1, but this test was skipped: {reason}"


@pytest.fixture
def one_thread():
    """In-process training on one torch thread, as ``parml train`` runs (--threads 1): tiny blocks
    on several threads of a busy machine run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """The fused CPU kernels compiled (or loaded from numba's cache) once, before any test; the
    fork server that starts gloo ranks loads them the same way (tests/_rank_preload.py)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")          # gw0, gw1, ...: one dtype first each
    _rank_preload.warm_kernels(int(worker[2:]) if worker[2:].isdigit() else 0)
