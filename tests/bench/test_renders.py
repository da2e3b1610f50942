"""The committed results render from their records: tables equal to the committed markdown, the
stored analysis equal to a fresh one, plots written; results of the pre-harness layout still load."""
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import from_json, to_json  # noqa: E402
from benchmarks.harness.render import STYLE  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def png_width(path: Path) -> int:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[16:20])[0]


def test_type_is_at_least_9_points():
    assert min(v for k, v in STYLE.items() if k.endswith("size")) >= 9


@pytest.mark.timeout(120)
def test_pipeline_renders_from_its_records(tmp_path):
    from benchmarks.pipeline.analyse import goals
    from benchmarks.pipeline.markdown import markdown
    from benchmarks.pipeline.plot import plot
    from benchmarks.pipeline.records import PipelineResults, migrate
    res = from_json(PipelineResults, migrate(json.loads((RESULTS / "pipeline" / "results.json").read_text())))
    assert to_json(goals(res)) == to_json(res.goals)
    assert "\n".join(markdown(res)) + "\n" == (RESULTS / "pipeline" / "pipeline_scaling.md").read_text()
    # the committed run meets the goal: parml >= 1.1x torch pipelining at every M with a core per rank
    assert res.goals.torch_ratio_goal_met and min(res.goals.torch_ratio_min_by_M_pipelined.values()) >= 1.1
    plot(res, tmp_path / "p.png")
    assert png_width(tmp_path / "p.png") > 1000


def test_pipeline_records_of_the_old_layout_migrate():
    from benchmarks.pipeline.records import PipelineResults, migrate
    rank = {"step_s": 1.0, "compute_s": 0.5, "wait_s": 0.4, "other_s": 0.1, "step_min_s": 0.9,
            "peak_saved_bytes": 8, "blocks": [0, 4], "other_isend_s": 0.2, "other_loss_broadcast_s": 0.1}
    entry = {"model": "m", "backend": "gloo", "P": 2, "M": 1, "schedule": "gpipe", "oversubscribed": False,
             "step_s": 1.0, "step_min_s": 0.9, "steps_s": [1.0], "per_rank": [rank], "busiest_compute_s": 0.5,
             "efficiency": 0.5, "bound": 0.5, "eff_over_bound": 1.0, "samples_per_s": 8.0, "loss": 2.3,
             "peak_saved_bytes_max": 8, "torch": {"error": "Schedule1F1B needs M >= P"}}
    old = {"config": {"models": {}, "P": [2], "microbatches": [1], "schedules": ["gpipe"], "backends": ["gloo"],
                      "warmup": 1, "steps": 1, "serial_steps": 1},
           "meta": {"wall_s": 12.0, "mpi_skipped": "mpirun not found"}, "entries": [entry]}
    res = from_json(PipelineResults, migrate(old))
    r = res.entries[0].per_rank[0]
    assert (r.send_s, r.loss_broadcast_s) == (0.2, 0.1) and res.entries[0].torch.error.startswith("Schedule1F1B")
    assert res.meta.elapsed_s == 12.0 and res.config.mpi_skipped == "mpirun not found"


@pytest.mark.timeout(120)
def test_mgopt_renders_from_its_records(tmp_path):
    from benchmarks.mgopt.analyse import analyse
    from benchmarks.mgopt.records import MgResults
    import benchmarks.mgopt_scaling as study
    res = from_json(MgResults, json.loads((RESULTS / "mgopt" / "results.json").read_text()))
    assert to_json(analyse(res)) == to_json(res.analysis)
    out = tmp_path / "mgopt"
    (out / "euclidean").mkdir(parents=True)
    (out / "euclidean" / "results.json").write_bytes((RESULTS / "mgopt" / "euclidean" / "results.json").read_bytes())
    study.render(res, out)
    assert (out / "mgopt_scaling.md").read_text() == (RESULTS / "mgopt" / "mgopt_scaling.md").read_text()
    assert png_width(out / "mgopt_scaling.png") > 800
    # P = 2 gives the P = 1 iterates for every configuration and seed (the runs are deterministic)
    assert res.analysis.exactness and all(x.equal for x in res.analysis.exactness)


@pytest.mark.timeout(120)
def test_mesh_renders_from_its_records(tmp_path):
    """The committed mesh results (gloo; MPI) are analysed from their samples into the committed
    markdown; the plot has a panel per workload, the time to the target and, with 4 ranks, the
    coarse layouts. RESULTS.md quotes these numbers."""
    import benchmarks.mesh_scaling as study
    from benchmarks.mesh.markdown import markdown
    from benchmarks.mesh.plot import panels, plot
    for folder, worlds, mnist in (("mesh", [2, 4], 1.70), ("mesh-mpi", [2], 2.19)):
        res = study.load(RESULTS / folder)
        assert [w.ranks for w in res.worlds] == worlds and len(res.samples) == 15 * 3 + 5 * 3 * (len(worlds) - 1)
        assert "\n".join(markdown(res)) + "\n" == (RESULTS / folder / "mesh_scaling.md").read_text()
        two = res.world(2)
        assert len(two.rows) == 15 and len(two.targets) == 5 and res.config.steps == {
            "circles-gd": 10, "circles-vcycle": 10, "mnist-sgd": 3}
        r = next(r for r in two.rows if r.workload == "mnist-sgd" and (r.layout.D, r.layout.P) == (2, 1))
        assert r.speedup == pytest.approx(mnist, abs=0.005) and r.wall_eff == pytest.approx(r.speedup / 2)
        assert f"| {mnist:.2f} |" in (RESULTS.parent / "RESULTS.md").read_text()
        assert [p[0].__name__ for p in panels(res)] == ["_workload"] * 3 + ["_targets"] + ["_coarse"] * (4 in worlds)
        plot(res, tmp_path / f"{folder}.png")
        assert png_width(tmp_path / f"{folder}.png") > 1000


@pytest.mark.timeout(120)
def test_projection_renders_from_its_records():
    """The committed full-size projection loads as records and renders its markdown."""
    from benchmarks.harness import read_json
    from benchmarks.projection.analyse import summary_rows
    from benchmarks.projection.markdown import markdown
    from benchmarks.projection.records import ProjectionResults
    res = read_json(RESULTS / "projection" / "results.json", ProjectionResults)
    assert len(res.series) == 80 and res.ranks[-1] == 1024 and not res.config.quick
    assert "\n".join(markdown(res)) + "\n" == (RESULTS / "projection" / "projection.md").read_text()
    w512 = next(r for r in summary_rows(res) if (r.series.profile, r.series.workload, r.series.scaling,
                                                  r.series.levels) == ("cpu", "dense K=2048 w=512", "strong", 1))
    assert w512.n == 1024 and w512.lp_wins[-1][0] == 1024 and w512.lp_wins[-1][1] == pytest.approx(4.97, abs=0.005)
    # RESULTS.md quotes the committed projection, not an older one
    assert f"| dense width 512 | K 2048: {w512.lp_wins[-1][1]:.2f}× / ∞" in (RESULTS.parent / "RESULTS.md").read_text()
