"""One launch of the scaling model's validation (see ``plan_validation.py``).

Usage: python benchmarks/_plan_validation_worker.py JOB.json RESULT.json

Every rank runs each configuration of the job: it builds the training run's V-cycle with parml's
own ``training.build.build_vcycle`` (L = 1: one GD step; L = 8: one V-cycle), warms up, then times
the calls (``VCycle.__call__``: gradient evaluations, updates and transfers, as training runs
them). A step's time is the slowest rank's, after a barrier. Layouts (D, P) run on parml's
data x layer mesh (``--data-parallel D``, ``--coarse-layout``), as ``parml train`` runs them.

The machine is shared: before every timed step all ranks spin for a moment and record the
share of a core they got; the background load (other busy processes competing for the cores)
follows as B = cores / share - ranks, and the prediction uses it.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)

from parml.comm import exit_process, make_communicator  # noqa: E402
from parml.config import TrainConfig  # noqa: E402
from parml.data import Dataset, load_dataset  # noqa: E402
from parml.training.build import build_vcycle  # noqa: E402


def case_data(case: dict) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The dataset the config is built on and the batch every step uses."""
    if case["dataset"] == "random":
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(case["batch"], case["in_features"], generator=g)
        y = torch.randint(0, case["classes"], (case["batch"],), generator=g)
        data = Dataset("random", x, y, x[:8], y[:8], case["classes"], "classification", (case["in_features"],))
    else:
        data = load_dataset(case["dataset"], case.get("data_dir"), seed=0)
    return data, data.x_train[:case["batch"]], data.y_train[:case["batch"]]


def config(case: dict, conf: dict) -> TrainConfig:
    return TrainConfig(dataset="circles" if case["dataset"] == "random" else case["dataset"],
                       blocks=case["blocks"], width=case["width"], levels=conf["levels"], lr=case.get("lr", 0.01),
                       microbatches=conf["M"], schedule=conf["schedule"], min_blocks_per_rank=conf["mbpr"],
                       data_parallel=conf["D"], coarse_layout=conf.get("coarse", "gather"), progress=False)


def build(case, conf, comm, data):
    return build_vcycle(config(case, conf), data, comm)


def probe(comm, seconds=0.08) -> float:
    """Every rank spins at once; the mean share of a core a rank got."""
    comm.barrier()
    t0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - t0 < seconds:
        x += 1
    share = (time.thread_time() - c0) / (time.perf_counter() - t0)
    return statistics.mean(comm.allgather_object(share))


def run_config(case, conf, comm, data, x, y):
    vc = build(case, conf, comm, data)
    for i in range(conf["warmup"]):
        vc((x, y), batch_id=-1 - i)
    steps, cpus, shares, loads = [], [], [], []
    for i in range(conf["steps"]):
        shares.append(probe(comm))
        loads.append(os.getloadavg()[0])
        comm.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        vc((x, y), batch_id=i)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        steps.append(max(comm.allgather_object(wall)))
        cpus.append(comm.allgather_object(cpu))
    return {"step_s": statistics.median(steps), "steps_s": steps, "cpu_s": cpus, "share": shares,
            "loadavg": loads}


def main():
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    comm = make_communicator("auto", timeout=600)
    out = []
    cache = {}
    for conf in job["configs"]:
        case = job["cases"][conf["case"]]
        if conf["case"] not in cache:
            cache = {conf["case"]: case_data(case)}
        data, x, y = cache[conf["case"]]
        t0 = time.perf_counter()
        res = run_config(case, conf, comm, data, x, y)
        out.append({**conf, **res, "world": comm.size})
        if comm.rank == 0:
            print(f"[{comm.size}] {conf['case']:9s} L={conf['levels']} D={conf['D']} P={comm.size // conf['D']} "
                  f"M={conf['M']} {conf['schedule']:5s} mbpr={conf['mbpr']:<3d} step {1e3 * res['step_s']:8.1f} ms  "
                  f"share {statistics.median(res['share']):.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            with open(result_path + ".part", "w") as f:
                json.dump(out, f)
            os.replace(result_path + ".part", result_path)
    comm.barrier()
    comm.close()
    exit_process(0)


if __name__ == "__main__":
    main()
