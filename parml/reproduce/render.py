"""A reproduction's outputs: statistics over seeds, the markdown table, the JSON, the plots."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics

import torch

from ..training.report import read_metrics
from .paper import PAPER_SENSITIVITY, THRESHOLDS
from .plan import Plan, Row, _fmt_beta


def first_reach(folder: str, thresholds) -> dict:
    """For each accuracy t: [V-cycle, work units] of the first validation with val acc >= t (None if never)."""
    try:
        recs = read_metrics(folder)
    except OSError:
        return {}
    out = {}
    for t in thresholds:
        hit = next((r for r in recs if r.get("val_acc") is not None and r["val_acc"] >= t - 1e-12), None)
        out[f"{t:g}"] = [hit["cycle"], hit["work_units"]] if hit else None
    return out


def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def medians(runs: list[dict]) -> dict:
    keys = ("cycles", "work_units", "uc", "seconds", "compute_seconds", "val_acc")
    m = {k: median([r.get(k) for r in runs]) for k in keys}
    cyc = [r["cycles"] for r in runs]
    m.update(cycles_min=min(cyc), cycles_max=max(cyc), reached=sum(r["reached_target"] for r in runs),
             diverged=sum(r["status"] == "diverged" for r in runs), n=len(runs))
    return m


# --- ratios -----------------------------------------------------------------------------------------

def _ratio(a, b):
    return a / b if a is not None and b else None


def table1_ratio(results: dict) -> dict | None:
    """U(L=1) / U(L=max) from the medians over seeds, the same for wall-clock and compute seconds."""
    by_l = {r["row"].levels: r for r in results["rows"]}
    if 1 not in by_l or len(by_l) < 2:
        return None
    hi = max(by_l)
    a, b = by_l[1], by_l[hi]
    out = {"levels": [1, hi], "U": _ratio(a["median"]["work_units"], b["median"]["work_units"]),
           "cycles": _ratio(a["median"]["cycles"], b["median"]["cycles"]),
           "seconds": _ratio(a["median"]["seconds"], b["median"]["seconds"]),
           "compute_seconds": _ratio(a["median"]["compute_seconds"], b["median"]["compute_seconds"]),
           "U_per_seed": [_ratio(x["work_units"], y["work_units"]) for x, y in zip(a["runs"], b["runs"])],
           "seconds_per_seed": [_ratio(x["seconds"], y["seconds"]) for x, y in zip(a["runs"], b["runs"])],
           "all_reached": a["median"]["reached"] == a["median"]["n"] and b["median"]["reached"] == b["median"]["n"]}
    if a["row"].paper_u and b["row"].paper_u:
        out["paper"] = {"U_L1": a["row"].paper_u, "U_Lmax": b["row"].paper_u,
                        "U": a["row"].paper_u / b["row"].paper_u}
    return out


def relative_u(results: dict) -> dict | None:
    """U of every row over U of a reference row (Table 1: L = 1; Table 2: the paper's setup, the last row),
    for the paper and for parml's medians: the shape of the table, free of the absolute scale."""
    plan: Plan = results["plan"]
    rows = results["rows"]
    if plan.mode == "table1":
        ref = next((r for r in rows if r["row"].levels == 1), None)
    elif plan.mode == "table2":
        ref = rows[-1] if rows else None
    else:
        return None
    if ref is None or len(rows) < 2:
        return None
    pu, mu = ref["row"].paper_u, ref["median"]["work_units"]
    return {"reference": ref["row"].label,
            "paper": [_ratio(r["row"].paper_u, pu) if r["row"].paper_u is not None else None for r in rows],
            "parml": [_ratio(r["median"]["work_units"], mu) for r in rows]}


def reach_table(results: dict) -> dict | None:
    """Median work units (and V-cycles) to first reach each accuracy in THRESHOLDS, per row; ratio L=1 / L=max."""
    plan: Plan = results["plan"]
    if plan.mode != "table1":
        return None
    ts = [f"{t:g}" for t in THRESHOLDS[plan.task]]
    rows = []
    for r in results["rows"]:
        cells = {}
        for t in ts:
            hits = [run.get("first_reach", {}).get(t) for run in r["runs"]]
            got = [h for h in hits if h]
            cells[t] = {"U": median([h[1] for h in got]) if len(got) == len(hits) else None,
                        "cycles": median([h[0] for h in got]) if len(got) == len(hits) else None,
                        "seeds_reached": len(got)}
        rows.append({"levels": r["row"].levels, "label": r["row"].label, "cells": cells})
    by_l = {x["levels"]: x for x in rows}
    ratio = None
    if 1 in by_l and len(by_l) > 1:
        hi = by_l[max(by_l)]
        ratio = {"levels": [1, hi["levels"]],
                 "U": {t: _ratio(by_l[1]["cells"][t]["U"], hi["cells"][t]["U"]) for t in ts}}
    return {"thresholds": ts, "rows": rows, "ratio": ratio}


def sensitivity_summary(results: dict) -> dict:
    """Per (lr, β): U(L=1) / U(L=8) of the medians; their mean and relative standard deviation."""
    cells = {}
    for r in results["rows"]:
        row = r["row"]
        cells.setdefault((row.lr, row.beta), {})[row.levels] = r
    out = []
    for (lr, beta), c in cells.items():
        if 1 not in c or 8 not in c:
            continue
        a, b = c[1], c[8]
        out.append({"lr": lr, "beta": beta, "U_L1": a["median"]["work_units"], "U_L8": b["median"]["work_units"],
                    "U_ratio": _ratio(a["median"]["work_units"], b["median"]["work_units"]),
                    "seconds_ratio": _ratio(a["median"]["seconds"], b["median"]["seconds"]),
                    "U_ratio_per_seed": [_ratio(x["work_units"], y["work_units"])
                                         for x, y in zip(a["runs"], b["runs"])],
                    "all_reached": all(r["median"]["reached"] == r["median"]["n"] for r in (a, b))})
    ratios = [c["U_ratio"] for c in out if c["U_ratio"] is not None]
    secs = [c["seconds_ratio"] for c in out if c["seconds_ratio"] is not None]
    mean = statistics.fmean(ratios) if ratios else None
    rsd = 100 * statistics.stdev(ratios) / mean if len(ratios) > 1 and mean else None
    reached = [c["U_ratio"] for c in out if c["all_reached"] and c["U_ratio"] is not None]
    mean_r = statistics.fmean(reached) if reached else None
    return {"cells": out, "mean_U_ratio": mean, "rsd_percent": rsd,
            "mean_seconds_ratio": statistics.fmean(secs) if secs else None,
            "cells_all_reached": len(reached), "mean_U_ratio_reached_cells": mean_r,
            "rsd_percent_reached_cells": (100 * statistics.stdev(reached) / mean_r
                                          if len(reached) > 1 and mean_r else None),
            "rsd_definition": "sample standard deviation (n-1) / mean of the per-cell ratios",
            "paper": {"mean_U_ratio": PAPER_SENSITIVITY["mean_ratio"], "rsd_percent": PAPER_SENSITIVITY["rsd_percent"]}}


# --- output -----------------------------------------------------------------------------------------

def _f(x, fmt, dash="–"):
    return dash if x is None else format(x, fmt)


TITLES = {"table1": "Table 1", "table2": "Table 2", "sensitivity": "§4.5 sensitivity to lr and β"}
HEADER = ("| L / setup | paper V-cycles | paper U_c | paper U | parml V-cycles (median, min–max) | parml U_c "
          "| parml U (median) | seconds (median) | final val acc |")


def render_markdown(results: dict, command: str = "") -> str:
    """The reproduction's markdown: setup, the table beside the paper's, ratios, reach table, grid."""
    plan: Plan = results["plan"]
    lines = _md_intro(results, command) + _md_table(results) + _md_relative(results)
    if plan.mode == "table1":
        lines += _md_table1_ratios(results)
    if plan.mode == "sensitivity":
        lines += _md_sensitivity(results)
    lines.append(f"Curves (first seed): `{plan.name}-cycles.png`, `{plan.name}-work-units.png`; "
                 f"every number per seed: `{plan.name}.json`; run folders: `runs/`.")
    return "\n".join(lines) + "\n"


def _md_intro(results: dict, command: str) -> list[str]:
    plan: Plan = results["plan"]
    task = "co-centric circles" if plan.task == "circles" else "MNIST"
    b = plan.base
    lines = [f"# {TITLES[plan.mode]}, {task}: parml vs. Gaedke-Merzhäuser et al.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    reused = sum(bool(run.get("reused")) for r in results["rows"] for run in r["runs"])
    lrs = sorted({r.lr for r in plan.rows})
    betas = sorted({r.beta for r in plan.rows})
    batch = "full-batch GD" if b.get("batch_size") is None else f"mini-batches of {b['batch_size']}"
    lines += [f"K = {b['blocks']}, width {b['width']}, lr {', '.join(f'{x:g}' for x in lrs)}, "
              f"β {', '.join(_fmt_beta(x) for x in betas)}, {batch}, target validation accuracy "
              f"{b['target_accuracy']:g}, at most {b['max_cycles']} V-cycles; seeds "
              f"{', '.join(map(str, plan.seeds))} (the seed sets the initialization, the data draw/split and "
              f"the batch order). {results['world_size']} rank(s) [{results['backend']}], {results['device']}, "
              f"torch {torch.__version__}. Wall time of the whole table: {results['elapsed_s']:.0f} s"
              + (f" ({reused} run(s) reused from an earlier invocation: their own seconds are in their rows, "
                 f"not in this total)." if reused else "."), ""]
    lines += [f"- {n}" for n in plan.notes]
    if plan.notes:
        lines.append("")
    return lines


def _md_table(results: dict) -> list[str]:
    plan: Plan = results["plan"]
    lines = []
    lines += [HEADER, "|" + "---|" * 9]
    flags = set()
    for r in results["rows"]:
        row, m = r["row"], r["median"]
        mark = ""
        if m["diverged"]:
            mark += " ‡"
            flags.add("‡")
        if m["reached"] < m["n"]:
            mark += f" † ({m['reached']}/{m['n']} reached)"
            flags.add("†")
        puc = _f(row.paper_uc, ".2f") + (f" {row.note}" if row.note else "")
        lines.append(f"| {row.label} | {_f(row.paper_cycles, 'd')} | {puc} | {_f(row.paper_u, 'g')} "
                     f"| {_f(m['cycles'], 'g')} ({m['cycles_min']}–{m['cycles_max']}){mark} | {_f(m['uc'], '.2f')} "
                     f"| {_f(m['work_units'], '.1f')} | {_f(m['seconds'], '.1f')} | {_f(m['val_acc'], '.4f')} |")
    lines.append("")
    if "†" in flags:
        lines.append("† not every seed reached the target within the V-cycle budget: those counts are lower bounds.")
    if "‡" in flags:
        lines.append("‡ at least one seed diverged (non-finite loss); its counts are where it stopped.")
    if plan.mode == "table2":
        lines.append("[a] eq. (10) gives U_c = 5.96 for [1,1,1,1,1,1,1,{1}] and 5.97 for [1,1,1,1,1,1,1,{2}]; "
                     "the paper's Table 2 prints them swapped (5.97, 5.96). The paper column shows eq. (10)'s "
                     "values; U (42 for both) is the same either way.")
    lines.append("U_c (parml) is measured: work units counted by the trainer / V-cycles. Seconds include the "
                 "validation after every V-cycle.")
    lines.append("")
    return lines


def _md_relative(results: dict) -> list[str]:
    """The paragraph of U / U(reference) beside the paper's; none where the plan has no reference row."""
    rel = relative_u(results)
    if not rel:
        return []
    short = any(r["median"]["reached"] < r["median"]["n"] for r in results["rows"])
    return [f"U / U({rel['reference']}), medians, row by row: paper "
            f"{', '.join(_f(x, '.2f') for x in rel['paper'])}; "
            f"parml {', '.join(_f(x, '.2f') for x in rel['parml'])}"
            + (" († rows stopped at the budget, so these are not cost ratios)." if short else "."), ""]


def _md_table1_ratios(results: dict) -> list[str]:
    lines = []
    ratio = table1_ratio(results)
    if ratio:
        hi = ratio["levels"][1]
        paper = ratio.get("paper")
        ptxt = f" (paper {paper['U_L1']:g}/{paper['U_Lmax']:g} = {paper['U']:.2f})" if paper else ""
        lines.append(f"**U(L=1)/U(L={hi})**, medians over seeds: parml {_f(ratio['U'], '.2f')}{ptxt}; "
                     f"V-cycle ratio {_f(ratio['cycles'], '.1f')}; wall-clock ratio (median seconds) "
                     f"{_f(ratio['seconds'], '.2f')}, training compute only {_f(ratio['compute_seconds'], '.2f')}."
                     + ("" if ratio["all_reached"] else " Not every run reached the target: a bound, not a ratio."))
        lines.append("")
    reach = reach_table(results)
    if reach and any(run.get("first_reach") for r in results["rows"] for run in r["runs"]):
        ts = reach["thresholds"]
        lines += ["Work units (median over seeds) when the validation accuracy first reached each level, read from "
                  "the runs' logs (– : not reached by every seed within the budget):", "",
                  "| L / setup | " + " | ".join(f"val acc ≥ {t}" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        for x in reach["rows"]:
            lines.append(f"| {x['label']} | " + " | ".join(
                f"{_f(x['cells'][t]['U'], '.1f')} ({_f(x['cells'][t]['cycles'], 'g')} cyc.)"
                if x["cells"][t]["U"] is not None else "–" for t in ts) + " |")
        if reach["ratio"]:
            hi = reach["ratio"]["levels"][1]
            lines.append(f"| U(L=1)/U(L={hi}) | " + " | ".join(_f(reach["ratio"]["U"][t], ".2f") for t in ts) + " |")
        lines.append("")
    return lines


def _md_sensitivity(results: dict) -> list[str]:
    lines = []
    s = sensitivity_summary(results)
    lines += ["| α (lr) | β | parml U(L=1) | parml U(L=8) | U ratio | wall-clock ratio |", "|---|---|---|---|---|---|"]
    for c in s["cells"]:
        lines.append(f"| {c['lr']:g} | {_fmt_beta(c['beta'])} | {_f(c['U_L1'], '.1f')} | {_f(c['U_L8'], '.1f')} "
                     f"| {_f(c['U_ratio'], '.2f')}{'' if c['all_reached'] else ' †'} "
                     f"| {_f(c['seconds_ratio'], '.2f')} |")
    lines += ["", f"**Mean U(L=1)/U(L=8)** over the {len(s['cells'])} cells: parml {_f(s['mean_U_ratio'], '.2f')}, "
              f"relative standard deviation {_f(s['rsd_percent'], '.2f')} % (paper: "
              f"{PAPER_SENSITIVITY['mean_ratio']}, {PAPER_SENSITIVITY['rsd_percent']} %); mean wall-clock ratio "
              f"{_f(s['mean_seconds_ratio'], '.2f')}. Over the {s['cells_all_reached']} cells where every run "
              f"reached the target: {_f(s['mean_U_ratio_reached_cells'], '.2f')}, "
              f"{_f(s['rsd_percent_reached_cells'], '.2f')} %. ({s['rsd_definition']}.)", ""]
    return lines


def to_json(results: dict, command: str = "") -> dict:
    plan: Plan = results["plan"]
    rows = []
    for r in results["rows"]:
        row = r["row"]
        rows.append({"key": row.key, "label": row.label, "levels": row.levels, "cycle": row.cycle, "lr": row.lr,
                     "beta": row.beta, "eq10_uc": row.eq10,
                     "paper": {"v_cycles": row.paper_cycles, "uc": row.paper_uc, "uc_printed": row.paper_uc_printed,
                               "U": row.paper_u},
                     "median": r["median"], "runs": r["runs"]})
    out = {"mode": plan.mode, "task": plan.task, "name": plan.name, "quick": plan.quick, "command": command,
           "max_work_units": plan.max_work_units,
           "seeds": plan.seeds, "config": plan.base, "notes": plan.notes, "rows": rows,
           "elapsed_s": results["elapsed_s"], "world_size": results["world_size"], "backend": results["backend"],
           "device": results["device"], "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if plan.mode == "table1":
        out["ratio"] = table1_ratio(results)
    if plan.mode in ("table1", "table2"):
        out["relative_U"] = relative_u(results)
    if plan.mode == "table1":
        out["first_reach"] = reach_table(results)
    if plan.mode == "sensitivity":
        out["sensitivity"] = sensitivity_summary(results)
    return out


def plot_curves(results: dict, out: str) -> list[str]:
    """Loss (solid, log scale) and validation accuracy (dashed) of the first seed, one curve per setup,
    against V-cycles and against work units (paper Fig. 5). Sensitivity: one panel per (lr, β).
    The loss is drawn where it was evaluated (before the cycle), the accuracy after the cycle."""
    plan: Plan = results["plan"]
    curves = []
    for r in results["rows"]:
        folder = r["runs"][0]["folder"]
        try:
            recs = read_metrics(folder)
        except OSError:
            recs = []
        curves.append((r["row"], recs))
    if plan.mode == "sensitivity":
        panels = {}
        for row, recs in curves:
            panels.setdefault(f"α={row.lr:g}, β={_fmt_beta(row.beta)}", []).append((f"L={row.levels}", recs))
        panels = list(panels.items())
    else:
        label = (lambda row: f"L={row.levels}") if plan.mode == "table1" else (lambda row: row.cycle)
        task = "co-centric circles" if plan.task == "circles" else "MNIST"
        panels = [(f"{TITLES[plan.mode]}, {task}, K={plan.base['blocks']}",
                   [(label(row), recs) for row, recs in curves])]
    from matplotlib.figure import Figure   # where a plot is drawn: 0.5 s at every `parml` start otherwise
    from matplotlib.lines import Line2D

    paths = []
    for xkey, xlabel, suffix in (("cycle", "V-cycles", "cycles"), ("work_units", "work units", "work-units")):
        cols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(6.5 * cols if cols == 1 else 5 * cols, 4.2 * nrows))
        axes = fig.subplots(nrows, cols, squeeze=False)
        for ax, (title, group) in zip(axes.flat, panels):
            twin = ax.twinx()
            for i, (name, recs) in enumerate(group):
                if not recs:
                    continue
                # a record's loss is the objective at the start of its cycle, its cycle / work units are
                # counted at the end: plot the loss at the previous record's x (0 before the first cycle)
                xs = [0.0] + [x[xkey] for x in recs[:-1]]
                ax.semilogy(xs, [x["loss"] for x in recs], color=f"C{i}", label=name)
                acc = [(x[xkey], x["val_acc"]) for x in recs if x.get("val_acc") is not None]
                if acc:
                    twin.plot(*zip(*acc), "--", color=f"C{i}")
            twin.set_ylim(0, 1.02)
            twin.set_ylabel("validation accuracy (dashed)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (solid)")
            ax.set_title(title, fontsize=9)
            styles = [Line2D([], [], color="0.3", label="loss"), Line2D([], [], color="0.3", ls="--", label="val acc")]
            ax.legend(handles=ax.get_legend_handles_labels()[0] + styles, fontsize=7, loc="center right")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out, f"{plan.name}-{suffix}.png")
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths


def write_outputs(results: dict, out: str, command: str = "") -> dict:
    """Write the markdown, JSON and PNGs (call on rank 0 only); returns their paths and the table."""
    plan: Plan = results["plan"]
    os.makedirs(out, exist_ok=True)
    md = render_markdown(results, command)
    paths = {"md": os.path.join(out, f"{plan.name}.md"), "json": os.path.join(out, f"{plan.name}.json")}
    with open(paths["md"], "w") as f:
        f.write(md)
    with open(paths["json"], "w") as f:
        json.dump(to_json(results, command), f, indent=2, default=str)
    paths["png"] = plot_curves(results, out)
    paths["table"] = md
    return paths


def load_results(path: str) -> dict:
    """The results of an earlier run back from its JSON (to render the table again without training)."""
    with open(path) as f:
        d = json.load(f)
    plan = Plan(d["mode"], d["task"], [], d["seeds"], d["config"], d["quick"], d["notes"], d.get("max_work_units"))
    rows = []
    for r in d["rows"]:
        p = r["paper"]
        differs = p["uc_printed"] is not None and p["uc"] is not None and round(p["uc"], 2) != round(p["uc_printed"], 2)
        note = "[a]" if differs else ""
        row = Row(r["key"], r["label"], r["levels"], r["cycle"], r["lr"], r["beta"], p["v_cycles"], p["uc"], p["U"],
                  p["uc_printed"], note)
        plan.rows.append(row)
        for run in r["runs"]:
            if "first_reach" not in run and run.get("folder") and os.path.isdir(run["folder"]):
                run["first_reach"] = first_reach(run["folder"], THRESHOLDS[plan.task])
        rows.append({"row": row, "runs": r["runs"], "median": r["median"]})
    return {"plan": plan, "rows": rows, "elapsed_s": d["elapsed_s"], "world_size": d["world_size"],
            "backend": d["backend"], "device": d["device"], "command": d.get("command", "")}
