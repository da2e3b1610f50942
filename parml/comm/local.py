"""SelfComm: the communicator of a single process (serial runs, unit tests)."""
from __future__ import annotations

import sys

import torch

from .base import Communicator


class SelfComm(Communicator):
    """Communicator of size 1: collectives are the identity, there are no peers."""

    def __init__(self, timeout: float = 300.0, device: str | torch.device = "cpu"):
        super().__init__()
        self.rank = 0
        self.size = 1
        self.backend = "self"
        self.timeout = float(timeout)
        self.device = torch.device(device)

    def isend(self, tensor, dst, tag=0):
        raise self._error(f"isend to rank {dst}: a single-process communicator has no peers")

    def irecv(self, tensor, src, tag=0):
        raise self._error(f"irecv from rank {src}: a single-process communicator has no peers")

    def send(self, tensor, dst, tag=0):
        raise self._error(f"send to rank {dst}: a single-process communicator has no peers")

    def recv(self, tensor, src, tag=0):
        raise self._error(f"recv from rank {src}: a single-process communicator has no peers")

    def allreduce(self, tensor, op="sum"):
        self._check_op(op)
        return tensor

    def allreduce_scalar(self, value, op="sum"):
        self._check_op(op)
        return float(value)

    def broadcast(self, tensor, root):
        self._check_root(root)
        return tensor

    def broadcast_object(self, obj, root):
        self._check_root(root)
        return obj

    def allgather_object(self, obj):
        return [obj]

    def barrier(self):
        pass

    def split(self, ranks):
        ranks = self._check_split(ranks)
        if not ranks:
            return None
        return SelfComm(timeout=self.timeout, device=self.device)

    def abort(self, message, quiet=False):
        if quiet:
            return
        try:
            print(f"parml: abort: {message}", file=sys.stderr, flush=True)
        except Exception:
            pass


