"""make_communicator: the communicator this process's launcher implies; describe_environment."""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from .base import CommError, Communicator
from .environment import (MPI_INSTALL_HINT, TORCHRUN_HINT, detect_backend, import_mpi, launcher_world_size,
                          mpi4py_available, resolve_device)
from .local import SelfComm
from .mpi_backend import MPIComm
from .torch_backend import TorchComm

BACKENDS = ("auto", "torch", "mpi", "self")
DEVICES = ("auto", "cpu", "cuda")


def make_communicator(backend: str = "auto", timeout: float = 300.0, device: str = "auto") -> Communicator:
    """Create the communicator for this process.

    ``backend``: "auto" (from the launcher: torchrun -> torch, mpirun/srun ->
    mpi, none -> self), "torch", "mpi" or "self".  ``device``: "auto" (cuda if
    available, else cpu), "cpu", "cuda" or "cuda:N"; with the torch backend a
    CUDA device selects NCCL and cpu selects gloo.  ``timeout`` bounds every
    blocking operation, in seconds.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if backend == "auto":
        backend = detect_backend()
        if backend == "mpi" and not mpi4py_available():
            if launcher_world_size() > 1:
                raise CommError(
                    f"an MPI launcher started {launcher_world_size()} processes, but "
                    + MPI_INSTALL_HINT.replace("--backend mpi needs", "the mpi backend needs")
                )
            backend = "self"
    try:
        dev = resolve_device(device)
    except CommError:
        if backend == "torch":
            raise CommError(
                f"the torch backend on device {device!r} uses nccl, which needs CUDA, "
                "but torch.cuda.is_available() is False"
            ) from None
        raise

    if backend == "self":
        return SelfComm(timeout=timeout, device=dev)
    if backend == "torch":
        if detect_backend() != "torch" and not (dist.is_available() and dist.is_initialized()):
            raise CommError(TORCHRUN_HINT)
        if dev.type == "cuda":
            if not dist.is_nccl_available():
                raise CommError("nccl requested (device cuda) but this torch has no NCCL support")
            return TorchComm.world("nccl", timeout=timeout, device=dev)
        return TorchComm.world("gloo", timeout=timeout)
    # mpi
    if not mpi4py_available():
        raise CommError(MPI_INSTALL_HINT)
    return MPIComm(timeout=timeout, device=dev)


def describe_environment() -> dict:
    """Versions and capabilities relevant to the communication backends."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [],
        "mpi4py": None,
        "mpi_library": None,
        "cuda_aware_mpi": os.environ.get("PARML_CUDA_AWARE_MPI", "0") == "1",
    }
    if info["cuda_available"]:
        try:
            info["cuda_devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
        except Exception:
            pass
    mpi_ok = False
    try:
        import mpi4py

        info["mpi4py"] = mpi4py.__version__
        MPI = import_mpi()
        info["mpi_library"] = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
        mpi_ok = True
    except Exception as exc:
        if info["mpi4py"] is not None:
            info["mpi_error"] = str(exc)
    backends = {
        "gloo": bool(dist.is_available() and dist.is_gloo_available()),
        "nccl": bool(dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()),
        "mpi": mpi_ok,
    }
    info["backends"] = backends
    launcher = detect_backend()
    info["launcher"] = launcher
    info["launcher_world_size"] = launcher_world_size()
    auto = launcher
    if auto == "mpi" and not mpi_ok and info["launcher_world_size"] <= 1:
        auto = "self"
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    info["auto_backend"] = auto
    info["auto_device"] = auto_device
    if auto == "torch":
        info["auto_torch_backend"] = "nccl" if auto_device == "cuda" else "gloo"
    return info
