"""One rank of a launched job: ``python -m benchmarks.harness.worker JOB.json RESULT.json``.

Makes the job's communicator, calls its entry and, on rank 0, rewrites RESULT.json after every
emitted record. Leaves through ``exit_process`` (gloo can abort in its destructors at exit).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(job_path: str, result_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from parml.comm import SelfComm, exit_process, make_communicator

    from .launch import resolve, write_records
    from .records import from_json

    spec = json.loads(Path(job_path).read_text())
    payload = from_json(resolve(spec["payload_type"]), spec["payload"])
    if spec["backend"] == "self":
        comm = SelfComm(timeout=spec["comm_timeout"], device=spec["device"])
    else:
        comm = make_communicator(spec["backend"], timeout=spec["comm_timeout"], device=spec["device"])
    records: list = []

    def emit(record) -> None:
        if comm.rank == 0:
            records.append(record)
            write_records(Path(result_path), records)

    if comm.rank == 0:
        write_records(Path(result_path), records)
    torch.manual_seed(0)
    resolve(spec["entry"])(payload, comm, emit)
    comm.barrier()
    comm.close()
    exit_process(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
