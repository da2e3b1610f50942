"""Rank the layouts of a training run by their simulated time (``simulate.predict``).

Candidates: every D × P = ranks, M (powers of two that the batch allows), both schedules,
``gather`` / ``replicate`` coarse levels and a few min-blocks-per-rank values (only where they
change the level layouts). Each record says what it is, the predicted seconds per GD step and per
V-cycle, the efficiency against one process (T_1 / (N · T_N)), the memory per rank and whether it
fits the profile's memory. Layouts that fit come first, fastest first.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace

from ..config import ConfigError, TrainConfig
from ..parallel.layout import LayoutError
from .costs import COARSE_LAYOUTS, Layout, Workload, level_layouts
from .predict import predict
from .profile import Profile, ProfileError

# what the planner needs of a dataset without loading it: (in features, classes/outputs, train
# samples, per-sample image shape for conv networks, task)
DATASET_SHAPES = {
    "circles": (2, 2, 2000, None, "classification"),
    "regression": (1, 1, 2000, None, "regression"),
    "mnist": (784, 10, 60000, (1, 28, 28), "classification"),
    "fashion-mnist": (784, 10, 60000, (1, 28, 28), "classification"),
    "cifar10": (3072, 10, 50000, (3, 32, 32), "classification"),
    "digits": (64, 10, 1438, (1, 8, 8), "classification"),
}
SCHEDULE_CHOICES = ("1f1b", "gpipe")
MIN_BLOCKS_CHOICES = (1, 4, 16, 64, 256)
MAX_MICROBATCHES = 64


def workload_for(cfg, n_train: int | None = None) -> Workload:
    """The workload of a ``TrainConfig`` on its dataset's known sizes."""
    if cfg.dataset not in DATASET_SHAPES:
        raise ProfileError(f"--dataset {cfg.dataset!r}: the planner knows {', '.join(DATASET_SHAPES)}")
    i, o, n, shape, task = DATASET_SHAPES[cfg.dataset]
    return Workload.from_config(cfg, i, o, n_train or n, shape if cfg.arch == "conv" else None, task)


def _powers(most: int) -> list[int]:
    return [2 ** k for k in range(most.bit_length()) if 2 ** k <= most]


def divisor_pairs(ranks: int) -> list[tuple[int, int]]:
    """(D, P) with D · P = ranks, pure data parallelism first."""
    return [(ranks // p, p) for p in range(1, ranks + 1) if ranks % p == 0]


def _structures(work: Workload, ranks: int, backend: str, schedules, coarse_layouts, min_blocks, weight_grads,
                ranks_per_node, data_parallel, background):
    """(D, P, coarse layout, min-blocks, schedules) whose level layouts differ, and the most M."""
    coarse = list(coarse_layouts or (COARSE_LAYOUTS if work.levels > 1 else ("gather",)))
    mbprs = list(min_blocks or (MIN_BLOCKS_CHOICES if work.levels > 1 else (16,)))
    out = []
    for D, P in divisor_pairs(ranks):
        if D > work.batch or (data_parallel and D not in data_parallel):
            continue
        scheds = list(schedules) if P > 1 else [schedules[0]]
        seen = set()
        for mbpr in mbprs:
            for cl in (coarse if D * P > 1 else ["gather"]):
                probe = Layout(D, P, 1, scheds[0], cl, mbpr, weight_grads, backend, ranks_per_node, background)
                try:
                    shape = tuple((lv.ranks, lv.replicas, lv.redundant) for lv in level_layouts(work, probe))
                except LayoutError:
                    continue
                if shape not in seen:       # the same level layouts: the same predictions
                    seen.add(shape)
                    out.append((probe, scheds, work.batch // D))
    return out


def candidates(work: Workload, ranks: int, backend: str, microbatches=None, schedules=SCHEDULE_CHOICES,
               coarse_layouts=None, min_blocks=None, weight_grads: str = "auto",
               ranks_per_node: int | None = None, data_parallel=None, background: float = 0.0,
               max_microbatches: int = MAX_MICROBATCHES) -> list[Layout]:
    """Every candidate layout: D x P, M (powers of two the batch allows, or `microbatches`),
    schedule, coarse layout and min-blocks-per-rank values that change the level layouts."""
    if ranks < 1:
        raise LayoutError(f"--ranks {ranks} must be at least 1")
    out = []
    for probe, scheds, most in _structures(work, ranks, backend, schedules, coarse_layouts, min_blocks,
                                           weight_grads, ranks_per_node, data_parallel, background):
        ms = list(microbatches) if microbatches else _powers(min(most, max_microbatches))
        for m in ms:
            if m <= most:       # one micro-batch: every schedule runs F then B
                out += [replace(probe, microbatches=m, schedule=s) for s in (scheds if m > 1 else scheds[:1])]
    return out


def _record(work, lay, pr, t1, ranks, cap, oversubscribed) -> dict:
    t = pr.cycle_seconds if work.levels > 1 else pr.step_seconds
    mem = max(pr.memory_bytes)
    return {
        "data_parallel": lay.data_parallel, "layer_ranks": lay.layer_ranks, "microbatches": lay.microbatches,
        "schedule": lay.schedule, "coarse_layout": lay.coarse_layout if work.levels > 1 else None,
        "min_blocks_per_rank": lay.min_blocks_per_rank if work.levels > 1 else None,
        "weight_grads": lay.weight_grads, "backend": lay.backend,
        "predicted_step_seconds": pr.step_seconds, "predicted_cycle_seconds": pr.cycle_seconds,
        "efficiency": t1 / (ranks * t) if t > 0 else 0.0, "speedup": t1 / t if t > 0 else 0.0,
        "bubble": pr.bubble, "memory_bytes_per_rank": mem, "activation_bytes_per_rank": max(pr.activation_bytes),
        "fits_memory": mem <= cap, "allreduce_overlap": pr.allreduce.get("overlap"),
        "levels": pr.levels, "oversubscribed": oversubscribed,
    }


def _evaluate(work, lay, profile, cache):
    try:
        return predict(work, lay, profile, cache=cache)
    except LayoutError:
        return None


def _greedy(work, profile, structures, microbatches, cache, key, max_microbatches):
    """Per structure: M = 1, 2, 4, ... on the first schedule until two doublings in a row do not
    help, then the other schedules at the best M. Yields (layout, prediction)."""
    for probe, scheds, most in structures:
        ms = list(microbatches) if microbatches else _powers(min(most, max_microbatches))
        best, worse = None, 0
        for m in ms:
            lay = replace(probe, microbatches=m, schedule=scheds[0])
            pr = _evaluate(work, lay, profile, cache)
            if pr is None:
                continue
            yield lay, pr
            if best is None or key(pr) < key(best[1]):
                best, worse = (lay, pr), 0
            else:
                worse += 1
                if worse >= 2 and not microbatches:
                    break
        for s in scheds[1:]:
            if best is not None and best[0].microbatches > 1:
                lay = replace(best[0], schedule=s)
                pr = _evaluate(work, lay, profile, cache)
                if pr is not None:
                    yield lay, pr


def plan(work: Workload, ranks: int, profile: Profile, backend: str | None = None, local: bool = False,
         memory_per_rank: float | None = None, search: str = "auto", ranks_per_node: int | None = None,
         background: float = 0.0, microbatches=None, schedules=SCHEDULE_CHOICES, coarse_layouts=None,
         min_blocks=None, weight_grads: str = "auto", data_parallel=None,
         max_microbatches: int = MAX_MICROBATCHES) -> list[dict]:
    """Ranked records (best first) for `ranks` ranks. `local`: every rank on this one node (more
    ranks than cores share them); else `ranks_per_node` (default: the profile's cores per node).
    `search`: "all" candidates, "greedy" in M (see ``_greedy``), or "auto" (all up to 16 ranks)."""
    backend = backend or next(iter(profile.comm), "gloo")
    if profile.comm:
        profile.backend(backend)
    rpn = ranks if local else ranks_per_node
    structures = _structures(work, ranks, backend, list(schedules), coarse_layouts, min_blocks, weight_grads, rpn,
                             data_parallel, background)
    if not structures:
        raise LayoutError(f"--ranks {ranks} do not fit the blocks: no D x P layout works for "
                          f"{work.spec.total_blocks} blocks on {work.levels} level(s) with batch {work.batch}")
    serial = predict(work, Layout(1, 1, 1, "1f1b", "gather", 16, weight_grads, backend, 1, background), profile)
    t1 = serial.cycle_seconds if work.levels > 1 else serial.step_seconds
    cap = profile.memory_bytes if memory_per_rank is None else memory_per_rank
    over = bool(min(ranks, rpn or profile.cores) > profile.cores)
    cache: dict = {}

    def key(pr):
        return pr.cycle_seconds if work.levels > 1 else pr.step_seconds
    if search == "all" or (search == "auto" and ranks <= 16):
        pairs = ((lay, _evaluate(work, lay, profile, cache)) for lay in
                 candidates(work, ranks, backend, microbatches, schedules, coarse_layouts, min_blocks, weight_grads,
                            rpn, data_parallel, background, max_microbatches))
    else:
        pairs = _greedy(work, profile, structures, microbatches, cache, key, max_microbatches)
    records = [_record(work, lay, pr, t1, ranks, cap, over) for lay, pr in pairs if pr is not None]
    if not records:
        raise LayoutError(f"--ranks {ranks} do not fit the blocks or the batch: no layout could be simulated")
    field = "predicted_cycle_seconds" if work.levels > 1 else "predicted_step_seconds"
    records.sort(key=lambda r: (not r["fits_memory"], r[field], r["layer_ranks"], r["microbatches"]))
    for i, r in enumerate(records):
        r["rank"] = i + 1
    return records


def best(records: list[dict]) -> dict:
    return records[0]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def format_table(records: list[dict], limit: int | None = 20) -> str:
    """A ranked, aligned text table of `records` (the first `limit`)."""
    head = ["#", "D x P", "M", "schedule", "coarse", "min-blk", "step", "V-cycle", "eff.", "bubble", "mem/rank", ""]
    rows = []
    for r in records[:limit] if limit else records:
        rows.append([str(r["rank"]), f"{r['data_parallel']} x {r['layer_ranks']}", str(r["microbatches"]),
                     r["schedule"], r["coarse_layout"] or "-", str(r["min_blocks_per_rank"] or "-"),
                     _secs(r["predicted_step_seconds"]), _secs(r["predicted_cycle_seconds"]),
                     f"{r['efficiency']:.2f}", f"{r['bubble']:.2f}", _bytes(r["memory_bytes_per_rank"]),
                     "" if r["fits_memory"] else "does not fit memory"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) if i in (0, 2, 6, 7, 8, 9, 10) else x.ljust(w)
                       for i, (x, w) in enumerate(zip(row, widths))).rstrip() for row in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    if limit and len(records) > limit:
        lines.append(f"... {len(records) - limit} more")
    return "\n".join(lines)


def to_json(records: list[dict]) -> str:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(records), indent=1)


def main(argv=None) -> int:
    """``python -m parml.plan.planner --profile p.json --ranks 4 -K 2048 -L 8``: the ranked table
    (the integrator's ``parml plan`` takes the same options)."""
    ap = argparse.ArgumentParser(description="Rank parml layouts by simulated time.")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--dataset", default="circles")
    ap.add_argument("--arch", default="dense")
    ap.add_argument("--channels", default=None)
    ap.add_argument("-K", "--blocks", type=int, default=2048)
    ap.add_argument("--width", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("-L", "--levels", type=int, default=8)
    ap.add_argument("--cycle", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--local", action="store_true", help="every rank on this machine (oversubscribe past its cores)")
    ap.add_argument("--microbatches", default=None, help="comma-separated M values to try")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--limit", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        cfg = TrainConfig(dataset=a.dataset, arch=a.arch, channels=a.channels, blocks=a.blocks, width=a.width,
                          batch_size=a.batch_size, levels=a.levels, cycle=a.cycle)
        cfg.validate()
        prof = Profile.load(a.profile, device=a.device)
        ms = [int(m) for m in a.microbatches.split(",")] if a.microbatches else None
        recs = plan(workload_for(cfg), a.ranks, prof, a.backend, local=a.local, microbatches=ms)
    except (ConfigError, ProfileError, LayoutError, ValueError) as e:
        print(f"parml: error: {e}", file=sys.stderr)
        return 2
    print(to_json(recs) if a.json else format_table(recs, a.limit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
