"""Mesh layouts (D data replicas x P layer ranks) on parml's own workloads, timed inside one run.

    python benchmarks/mesh_scaling.py [--quick] [--repeats 3] [--out benchmarks/results/mesh]

Launch A, 2 ranks (gloo): per repeat, the layouts (D, P) = (1, 1) (rank 0 alone on a SelfComm while
rank 1 waits in a barrier: one process), (2, 1), (1, 2) and (1, 2) with ``--coarse-layout
replicate``, in an order rotated every repeat, on

* ``circles-gd``: the circles default (K = 2048, width 3, full batch 2000, lr 0.1, β 1e-4), one GD step;
* ``circles-vcycle``: the same with the default 8-level V-cycle [(1),1,1,1,2,2,2,{2}];
* ``mnist-sgd``: MNIST (t10k split 8000/2000), width 10, lr 0.01, β 1e-5, mini-batches of 1000, 8
  levels: multilevel SGD, one V-cycle per mini-batch;

then training circles-vcycle to validation accuracy 1.0 with every layout (alternating): wall
seconds to the target (``train``'s summary, in-run clock). Launch B, 4 ranks (oversubscribed on a
2-core machine): circles-vcycle on (1, 4) and (2, 2), gather vs replicate.

In-run timers: wall seconds of each step / V-cycle on rank 0 (a cycle ends with the finest
gradient's loss broadcast, so the ranks end it together), CPU seconds of each step on every rank
(``time.process_time``), the seconds each rank was blocked in communication (the ``wait_seconds``
of every communicator it holds), and per-level seconds (``CycleResult.level_seconds``). Wall
efficiency E = t(1, 1) / (N t(D, P)) from medians; CPU efficiency = CPU(1, 1) / Σ_ranks CPU(D, P)
(extra work of the parallel run, unaffected by other processes' load); idle fraction of a rank =
blocked seconds / cycle seconds. The load average is recorded at every measurement.

Outputs in --out: ``results.json`` and ``mesh_scaling.md``. ``--quick``: K = 128, 1 repeat, a few
steps (about a minute).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from parml.launch import clean_env, run_local  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
WORKLOADS = {
    "circles-gd": dict(dataset="circles", width=3, levels=1, lr=0.1, beta=1e-4),
    "circles-vcycle": dict(dataset="circles", width=3, levels=8, lr=0.1, beta=1e-4),
    "mnist-sgd": dict(dataset="mnist", width=10, levels=8, lr=0.01, beta=1e-5, batch_size=1000),
}
LAYOUTS_2 = [(1, 1, "gather"), (2, 1, "gather"), (1, 2, "gather"), (1, 2, "replicate")]
LAYOUTS_4 = [(1, 4, "gather"), (1, 4, "replicate"), (2, 2, "gather"), (2, 2, "replicate")]
FULL = {"blocks": 2048, "repeats": 3, "steps": {"circles-gd": 10, "circles-vcycle": 3, "mnist-sgd": 3},
        "warm": 1, "target_runs": True, "max_cycles": 60, "timeout": 3 * 3600}
QUICK = {**FULL, "blocks": 128, "repeats": 1, "steps": {"circles-gd": 4, "circles-vcycle": 2, "mnist-sgd": 2},
         "max_cycles": 40, "timeout": 900}


# --- one rank -----------------------------------------------------------------------------------

def _config(name: str, blocks: int, D: int, layout: str, data_dir: str | None, **kw):
    from parml.config import TrainConfig
    opts = {**WORKLOADS[name], "blocks": blocks, "data_parallel": D, "coarse_layout": layout, "progress": False,
            "target_accuracy": None, **kw}
    if opts["dataset"] == "mnist":
        opts["data_dir"] = data_dir
    return TrainConfig(**opts)


def _batches(data, cfg, count: int):
    """`count` (batch, batch id) pairs: the full batch, or the epoch's mini-batches in turn."""
    from parml.data import batches
    if cfg.batch_size is None:
        return [((data.x_train, data.y_train), 0)] * count
    out, epoch = [], 0
    while len(out) < count:
        for i, idx in enumerate(batches(data.x_train.shape[0], cfg.batch_size, cfg.seed, epoch)):
            out.append(((data.x_train[idx], data.y_train[idx]), (epoch, i)))
        epoch += 1
    return out[:count]


def measure(comm, cfg, data, steps: int, warm: int) -> list[dict]:
    """Per step: wall and CPU seconds, seconds blocked in communication, seconds per level."""
    from parml.training.build import build_vcycle
    vcycle = build_vcycle(cfg, data, comm)
    comms = vcycle.groups.communicators()
    rows = []
    for i, (batch, bid) in enumerate(_batches(data, cfg, warm + steps)):
        w0, c0, t0 = sum(c.wait_seconds for c in comms), time.process_time(), time.perf_counter()
        res = vcycle(batch, bid)
        wall = time.perf_counter() - t0
        if i >= warm:
            rows.append({"wall": wall, "cpu": time.process_time() - c0, "blocked": sum(c.wait_seconds for c in comms)
                         - w0, "levels": res.level_seconds, "load": os.getloadavg()[0]})
    return rows


def to_target(comm, cfg, data, folder: str) -> dict:
    """Train to val acc 1.0 (at most cfg.max_cycles cycles): in-run seconds and cycles."""
    from parml.training.trainer import train
    with contextlib.redirect_stdout(io.StringIO()):
        s = train(cfg, comm, data)
    return {"seconds": s["seconds"], "cycles": s["cycles"], "reached": s["reached_target"],
            "val_acc": s["val_acc"], "load": os.getloadavg()[0]}


def _on(comm, D, P, run):
    """Run `run(c)` on the layout's communicator: (1, 1) on rank 0 alone (a SelfComm), the others wait."""
    from parml.comm import SelfComm
    if D * P == comm.size:
        return run(comm)
    result = run(SelfComm()) if comm.rank == 0 else None
    comm.barrier()
    return result


def worker(comm, job: dict) -> dict:
    import torch
    from parml.data import load_dataset
    torch.set_num_threads(1)
    datas, out = {}, {"rank": comm.rank, "steps": [], "targets": []}
    layouts = LAYOUTS_2 if comm.size == 2 else LAYOUTS_4
    names = [n for n in job["workloads"] if comm.size == 2 or n == "circles-vcycle"]
    for rep in range(job["repeats"]):
        order = layouts[rep % len(layouts):] + layouts[:rep % len(layouts)]
        for name in names:
            for D, P, layout in order:
                cfg = _config(name, job["blocks"], D, layout, job["data_dir"])
                if name not in datas:
                    datas[name] = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, flatten=True)
                rows = _on(comm, D, P, lambda c: measure(c, cfg, datas[name], job["steps"][name], job["warm"]))
                out["steps"].append({"workload": name, "D": D, "P": P, "layout": layout, "repeat": rep, "rows": rows})
        if job["target_runs"] and comm.size == 2:
            for D, P, layout in order:
                cfg = _config("circles-vcycle", job["blocks"], D, layout, None, target_accuracy=1.0,
                              max_cycles=job["max_cycles"], out=job["tmp"], run_name=f"t{rep}-{D}{P}{layout}",
                              overwrite=True)
                res = _on(comm, D, P, lambda c: to_target(c, cfg, datas["circles-vcycle"], job["tmp"]))
                out["targets"].append({"D": D, "P": P, "layout": layout, "repeat": rep, "result": res})
    return out


def worker_main(job_path: str, result_path: str) -> None:
    from parml.comm import make_communicator
    job = json.loads(Path(job_path).read_text())
    comm = make_communicator("auto", timeout=job["timeout"])
    try:
        result = worker(comm, job)
        Path(f"{result_path}.{comm.rank}").write_text(json.dumps(result))
        comm.barrier()
    except BaseException as e:
        comm.abort(f"rank {comm.rank}: {type(e).__name__}: {e}")
        raise
    finally:
        comm.close()


# --- the driver ----------------------------------------------------------------------------------

def launch(job: dict, nprocs: int, tmp: Path) -> list[dict]:
    job_path, result = tmp / f"job{nprocs}.json", tmp / f"result{nprocs}"
    job_path.write_text(json.dumps(job))
    env = clean_env([str(ROOT)])
    run = run_local([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path), str(result)], nprocs,
                    "gloo", job["timeout"], tmp, f"mesh{nprocs}", env, cwd=ROOT, poll=0.2)
    if not run.ok:
        raise SystemExit(f"mesh_scaling: the {nprocs}-rank launch failed\n{run.tails()}")
    return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(nprocs)]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(ranks: list[dict]) -> dict:
    """Medians per (workload, layout): wall (rank 0), CPU summed over ranks, blocked per rank, levels."""
    table = {}
    for i, entry in enumerate(ranks[0]["steps"]):
        key = f"{entry['workload']}|{entry['D']}x{entry['P']}|{entry['layout']}"
        t = table.setdefault(key, {"wall": [], "cpu": [], "idle": [[] for _ in ranks], "levels": [], "load": []})
        for k, row in enumerate(entry["rows"]):
            t["wall"].append(row["wall"])
            t["load"].append(row["load"])
            others = [r["steps"][i]["rows"] for r in ranks]
            used = [o[k] for o in others if o is not None]
            t["cpu"].append(sum(u["cpu"] for u in used))
            for r, o in enumerate(others):
                if o is not None:
                    t["idle"][r].append(o[k]["blocked"] / o[k]["wall"])
            t["levels"].append([max(o[k]["levels"][lv] for o in others if o is not None)
                                for lv in range(len(row["levels"]))])
    out = {}
    for key, t in table.items():
        out[key] = {"wall": med(t["wall"]), "cpu": med(t["cpu"]), "samples": len(t["wall"]),
                    "idle": [med(x) for x in t["idle"]], "load": med(t["load"]),
                    "levels": [med([row[lv] for row in t["levels"]]) for lv in range(len(t["levels"][0]))]}
    return out


def efficiency(summary: dict, world: int) -> dict:
    rows = {}
    for key, s in summary.items():
        name, shape, layout = key.split("|")
        base = summary.get(f"{name}|1x1|gather")
        if base is None:
            continue
        n = 1 if shape == "1x1" else world
        rows[key] = {"wall_eff": base["wall"] / (n * s["wall"]), "cpu_eff": base["cpu"] / s["cpu"],
                     "speedup": base["wall"] / s["wall"]}
    return rows


def targets(ranks: list[dict]) -> dict:
    out = {}
    for entry in ranks[0]["targets"]:
        key = f"{entry['D']}x{entry['P']}|{entry['layout']}"
        out.setdefault(key, []).append(entry["result"])
    return {k: {"seconds": med([r["seconds"] for r in v]), "all_seconds": [r["seconds"] for r in v],
                "cycles": [r["cycles"] for r in v], "reached": all(r["reached"] for r in v),
                "load": med([r["load"] for r in v])} for k, v in out.items()}


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# Mesh layouts on parml's workloads ({res['mode']}, K = {res['blocks']}, {res['repeats']} repeat(s))",
             "", f"Machine: {res['cpus']} CPU(s); load average {res['load_before']:.1f} before, "
             f"{res['load_after']:.1f} after. Medians of in-run timers.", "",
             "## 2 ranks: seconds per step / V-cycle, efficiency", "",
             "| workload | (D, P) | coarse | s/step | speedup | wall eff. | CPU eff. | idle r0 / r1 | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    s2, e2 = res["two"]["summary"], res["two"]["efficiency"]
    for key, s in s2.items():
        name, shape, layout = key.split("|")
        e = e2.get(key, {})
        idle = " / ".join(f"{x:.2f}" for x in s["idle"])
        lines.append(f"| {name} | ({shape.replace('x', ', ')}) | {layout} | {s['wall']:.3f} | "
                     f"{e.get('speedup', float('nan')):.2f} | {e.get('wall_eff', float('nan')):.2f} | "
                     f"{e.get('cpu_eff', float('nan')):.2f} | {idle} | {s['load']:.1f} |")
    if res["two"].get("targets"):
        lines += ["", "## circles V-cycle to val acc 1.0 (2 ranks)", "",
                  "| (D, P) | coarse | seconds (median) | all | cycles | vs one process | load |",
                  "|---|---|---|---|---|---|---|"]
        tg = res["two"]["targets"]
        one = tg.get("1x1|gather", {}).get("seconds", float("nan"))
        for key, t in tg.items():
            shape, layout = key.split("|")
            lines.append(f"| ({shape.replace('x', ', ')}) | {layout} | {t['seconds']:.2f} | "
                         f"{', '.join(f'{x:.1f}' for x in t['all_seconds'])} | {t['cycles']} | "
                         f"{one / t['seconds']:.2f}x | {t['load']:.1f} |")
    for world in ("two", "four"):
        if world not in res:
            continue
        ranks = len(res[world]['summary'][next(iter(res[world]['summary']))]['idle'])
        lines += ["", f"## gather vs replicate, circles V-cycle, {ranks} ranks: "
                  "seconds per level (coarsest first) and idle fraction per rank", "",
                  "| (D, P) | coarse | s/cycle | level seconds | idle per rank |", "|---|---|---|---|---|"]
        for key, s in res[world]["summary"].items():
            name, shape, layout = key.split("|")
            if name != "circles-vcycle":
                continue
            lines.append(f"| ({shape.replace('x', ', ')}) | {layout} | {s['wall']:.3f} | "
                         f"{' '.join(f'{x:.3f}' for x in s['levels'])} | {' '.join(f'{x:.2f}' for x in s['idle'])} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "mesh"))
    ap.add_argument("--data-dir", default=str(MNIST_DIR))
    ap.add_argument("--no-four", action="store_true", help="skip the 4-rank launch")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    cfg["repeats"] = args.repeats or cfg["repeats"]
    workloads = ["circles-gd", "circles-vcycle"] + (["mnist-sgd"] if Path(args.data_dir).exists() else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"mode": "quick" if args.quick else "full", "blocks": cfg["blocks"], "repeats": cfg["repeats"],
           "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="parml-mesh-") as tmp:
        job = {**cfg, "workloads": workloads, "data_dir": args.data_dir, "tmp": tmp}
        two = launch(job, 2, Path(tmp))
        res["two"] = {"summary": summarize(two), "targets": targets(two)}
        res["two"]["efficiency"] = efficiency(res["two"]["summary"], 2)
        if not args.no_four:
            four = launch({**job, "target_runs": False}, 4, Path(tmp))
            res["four"] = {"summary": summarize(four)}
    res["load_after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / "mesh_scaling.md")
    print((out / "mesh_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
