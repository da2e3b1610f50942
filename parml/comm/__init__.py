"""Communication: the only package of parml that imports ``torch.distributed`` or ``mpi4py``.

``make_communicator`` picks the backend from the launcher (torchrun -> TorchComm with gloo or NCCL,
mpirun/srun -> MPIComm, none -> SelfComm); everything else codes against ``Communicator``.
"""
from .base import REDUCE_OPS, CommError, CommTimeout, Communicator, Request
from .environment import (LAUNCHER_PREFIXES, LAUNCHER_VARS, detect_backend, exit_process,
                          launcher_rank, launcher_world_size)
from .factory import BACKENDS, DEVICES, describe_environment, make_communicator
from .local import SelfComm
from .mpi_backend import MPIComm
from .torch_backend import TorchComm, nccl_device_for, process_group_timeout

__all__ = ["BACKENDS", "DEVICES", "LAUNCHER_PREFIXES", "LAUNCHER_VARS", "REDUCE_OPS", "CommError", "CommTimeout",
           "Communicator", "MPIComm", "Request", "SelfComm", "TorchComm", "describe_environment",
           "detect_backend", "exit_process", "launcher_rank", "launcher_world_size",
           "make_communicator", "nccl_device_for", "process_group_timeout"]
