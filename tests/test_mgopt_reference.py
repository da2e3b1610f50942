"""MG/OPT against an independent reference (tests/reference.py: Algorithm 1 written from the paper).

- V-cycle iterates, per-cycle loss and work units (eq. 10) of parml's ``VCycle`` (built by
  ``train.build_vcycle``) equal the reference's after 2 cycles: L = 2, 3, constant and linear
  interpolation, both step metrics, float64 to 1e-12 per tensor (atol = 1e-12 · max|ref|).
- The coherence of eq. (9) at run time: every gradient a level steps with is ∇L + δg with one δg
  per visit (0 on the finest level), ∇L is the reference gradient at the observed point, and the
  first step of each coarse level sees R ∇H of the level above at the restricted point; serially
  and on 2 ranks (gloo), where the iterates are also compared with the reference.
- Multilevel SGD (Algorithm 2, a V-cycle per mini-batch, through ``train.run_cycles``) and the
  cascade (multilevel initialization, through ``train.train``) against the same reference.
"""
import math

import pytest
import torch

import reference as ref
from multiproc import run_ranks
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import batches, load_dataset
from parml.multilevel.mgopt import CycleSetup
from parml.model import build_model
from parml.training.report import RunWriter, read_metrics
from parml.training.build import build_vcycle
from parml.training.loop import run_cycles
from parml.training.trainer import train

torch.set_num_threads(1)

# parml's cycle notation -> the reference's (pre, post) per level, finest first, and coarsest steps
SETUPS = {"[(1),{2}]": (((1, 0),), 2), "[1,{3}]": (((1, 1),), 3),
          "[(1),1,{2}]": (((1, 0), (1, 1)), 2), "[1,2,{2}]": (((1, 1), (2, 2)), 2), "[{1}]": ((), 1)}
LR, BETA = 0.1, 1e-2


def close(got, want, rtol, what=""):
    """Per-tensor: |got - want| <= rtol · max|want| (exact where want is all zeros)."""
    atol = rtol * float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g} (rtol {rtol:g}, max|ref| {atol / rtol:.3g})"


def close_dict(got, want, rtol, what=""):
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for n in want:
        close(got[n], want[n], rtol, f"{what} {n}")


def data(n=16):
    return load_dataset("circles", seed=0, n_train=n, n_val=8, dtype=torch.float64)


def initial_state(K, width=3, seed=11):
    """Random parameters, nonzero biases included, drawn here (not by parml's initializer)."""
    g = torch.Generator().manual_seed(seed)
    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g, dtype=torch.float64)
    return {"opening.weight": r(width, 2), "chunks.0.weight": r(K, width, width, scale=0.7),
            "chunks.0.bias": r(K, width, scale=0.3), "head.weight": r(2, width), "head.bias": r(2, scale=0.3)}


def config(K, cycle, **kw):
    setup = CycleSetup.parse(cycle)
    base = dict(blocks=K, width=3, levels=setup.levels, cycle=cycle, dtype="float64", lr=LR, beta=BETA,
                activation="tanh", min_blocks_per_rank=1, progress=False, target_accuracy=None)
    base.update(kw)
    return TrainConfig(**base)


def reference_for(cfg, K=None):
    steps, coarsest = SETUPS[cfg.cycle]
    return ref.MGOPT(K or cfg.blocks, steps, coarsest, cfg.interpolation, cfg.metric, cfg.lr, cfg.beta,
                     cfg.T, cfg.activation)


def state(level) -> dict:
    return {n: t.detach().clone() for n, t in level.model.state_dict().items()}


# --- 1. V-cycle iterates, losses, work units ------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "euclidean"])
@pytest.mark.parametrize("interpolation", ["constant", "linear"])
@pytest.mark.parametrize("cycle", ["[(1),{2}]", "[1,{3}]", "[(1),1,{2}]", "[1,2,{2}]"])
def test_vcycle_equals_the_reference_algorithm(cycle, interpolation, metric):
    d = data()
    cfg = config(8, cycle, interpolation=interpolation, metric=metric)
    theta = initial_state(8)
    vcycle = build_vcycle(cfg, d, SelfComm(), init_state=theta)
    mg = reference_for(cfg)
    batch = (d.x_train, d.y_train)
    steps, coarsest = SETUPS[cycle]
    assert math.isclose(ref.eq10(steps, coarsest), cfg.setup.cost(), rel_tol=1e-15)
    for c in range(2):
        loss, work = mg.loss(theta, batch), mg.work
        theta = mg.cycle(theta, batch)
        result = vcycle(batch)
        assert abs(result.loss - loss) <= 1e-12 * abs(loss), (c, result.loss, loss)
        assert math.isclose(mg.work - work, ref.eq10(steps, coarsest), rel_tol=1e-14)
        assert math.isclose(result.work_units, mg.work - work, rel_tol=1e-14), (result.work_units, mg.work - work)
        close_dict(state(vcycle.levels[-1]), theta, 1e-12, f"cycle {c} finest")
        for i, lev in enumerate(vcycle.levels[:-1]):          # where each coarse level ended its visit
            close_dict(state(lev), mg.final[i], 1e-12, f"cycle {c} level {i + 1}")
    moved = max(float((theta[n] - t).abs().max()) for n, t in initial_state(8).items())
    assert moved > 1e-2                                         # the cycles did change the parameters


def test_reference_transfers_are_what_the_papers_define():
    c = torch.arange(3.0, dtype=torch.float64)
    assert ref.prolong_rows(c, "constant").tolist() == [0, 0, 1, 1, 2, 2]
    assert ref.prolong_rows(c, "linear").tolist() == [0, 0.5, 1, 1.5, 2, 2]
    for interp in ("constant", "linear"):
        P = ref.prolongation_matrix(3, interp)
        g = torch.randn(6, 2, dtype=torch.float64)
        e = torch.randn(3, 2, dtype=torch.float64)
        lhs = (ref.restrict_grad({"chunks.0.bias": g}, interp)["chunks.0.bias"] * e).sum()
        assert abs(float(lhs - (g * (P @ e)).sum())) < 1e-13            # <R g, e> = <g, I e>
        back = ref.restrict_params({"chunks.0.bias": ref.prolong_rows(e, interp)}, interp)["chunks.0.bias"]
        assert torch.equal(back, e)                                       # a left inverse of I


# --- 2. coherence (eq. 9) at run time ---------------------------------------------------------------------

def _layout(level):
    """(name, first row) of each entry of the level's ordered parameters on this rank."""
    where = {}
    for c in level.model.block_chunks():
        where[id(c.weight)] = (f"chunks.{c.stage}.weight", c.first)
        where[id(c.bias)] = (f"chunks.{c.stage}.bias", c.first)
    for n, p in level.model.named_parameters():
        where.setdefault(id(p), (n, None))
    return [where[id(p)] for p in level.params]


def _observed_run(comm, K, cycle, cycles=2, **kw):
    """Run `cycles` V-cycles recording every observation as (cycle, level, kind, pieces of θ, ∇L, ∇H)."""
    d = data()
    cfg = config(K, cycle, **kw)
    vcycle = build_vcycle(cfg, d, comm, init_state=initial_state(K))
    layouts = [None if lev is None else _layout(lev) for lev in vcycle.levels]
    obs, now = [], [0]

    def observer(i, kind, theta, g_loss, g_h):
        keyed = [[(name, first, t.detach().cpu().clone()) for (name, first), t in zip(layouts[i], ts)]
                 for ts in (theta, g_loss, g_h)]
        obs.append((now[0], i, kind, *keyed))

    vcycle.observer = observer
    results, states = [], []
    for c in range(cycles):
        now[0] = c
        r = vcycle((d.x_train, d.y_train))
        results.append((r.loss, r.work_units))
        states.append(vcycle.levels[-1].executor.gather_state())
    return {"obs": obs, "results": results, "states": states, "ranks": [p.ranks for p in vcycle.plans]}


def _assemble(pieces_per_rank):
    """Full tensors from the ranks' (name, first row, tensor) pieces."""
    rows, shared = {}, {}
    for pieces in pieces_per_rank:
        for name, first, t in pieces:
            if first is None:
                shared[name] = t
            else:
                rows.setdefault(name, []).append((first, t))
    full = {n: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for n, parts in rows.items()}
    return {**full, **shared}


def _merge(runs):
    """Per (cycle, level): the observations in order, each assembled over the ranks holding that level."""
    per_rank = []
    for run in runs:
        seen, mine = {}, {}
        for cyc, i, kind, *keyed in run["obs"]:
            j = seen[(cyc, i)] = seen.get((cyc, i), -1) + 1
            mine[(cyc, i, j)] = (kind, keyed)
        per_rank.append(mine)
    keys = sorted(set().union(*per_rank))
    out = {}
    for cyc, i, j in keys:
        have = [r[(cyc, i, j)] for r in per_rank if (cyc, i, j) in r]
        assert len({k for k, _ in have}) == 1
        out.setdefault((cyc, i), []).append((have[0][0], *[_assemble([h[1][f] for h in have]) for f in range(3)]))
    return out


def _check_coherence(merged, cfg, K, batch):
    mg = reference_for(cfg, K)
    L = cfg.levels
    cycles = sorted({c for c, _ in merged})
    for c in cycles:
        dgs = {}
        for i in range(L):
            seq = merged[(c, i)]
            w = mg.h(i) if cfg.metric == "l2" else 2.0 ** (L - 1 - i)
            for n_obs, (kind, theta, g_loss, g_h) in enumerate(seq):
                what = f"cycle {c} level {i + 1} {kind} #{n_obs}"
                # ∇L is the gradient of the level's objective at the observed point (the reference's)
                _, g_ref = ref.value_and_grad(theta, *batch, beta=cfg.beta, block_weight=w, T=cfg.T,
                                              activation=cfg.activation)
                close_dict(g_loss, g_ref, 1e-10, what + " ∇L")
                # one δg per visit of the level (eq. 9), δg^L = 0 on the finest
                dg = dgs.setdefault(i, {n: g_h[n] - g_loss[n] for n in g_h})
                if i == L - 1:
                    assert all(float(t.abs().max()) == 0 for t in dg.values()), what
                close_dict(g_h, ref.axpy(g_loss, 1.0, dg), 1e-12, what + " ∇L + δg")
            if i > 0:
                # the coarse level starts at R_θ θ^{i,μ1} with ∇H^{i-1} = R ∇H^i (first-order coherence)
                kind, theta_f, _, g_f = next(o for o in seq if o[0] == "restrict")
                _, theta_c, _, g_c = merged[(c, i - 1)][0]
                close_dict(theta_c, ref.restrict_params(theta_f, cfg.interpolation), 1e-12,
                           f"cycle {c} level {i} start")
                close_dict(g_c, ref.restrict_grad(g_f, cfg.interpolation), 1e-12,
                           f"cycle {c} level {i} first ∇H vs R∇H of level {i + 1}")
                assert max(float(t.abs().max()) for t in dgs[i - 1].values()) > 1e-6   # δg is not trivially 0


def _check_iterates(run, cfg, K, batch):
    mg = reference_for(cfg, K)
    theta = initial_state(K)
    for c, ((loss, units), got) in enumerate(zip(run["results"], run["states"])):
        want_loss, work = mg.loss(theta, batch), mg.work
        theta = mg.cycle(theta, batch)
        assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
        assert math.isclose(units, mg.work - work, rel_tol=1e-14)
        close_dict(got, theta, 1e-12, f"cycle {c} finest")


@pytest.mark.parametrize("metric", ["l2", "euclidean"])
@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_coherence_at_run_time_serial(interpolation, metric):
    for cycle in ("[(1),1,{2}]", "[1,2,{2}]"):
        run = _observed_run(SelfComm(), 8, cycle, interpolation=interpolation, metric=metric)
        cfg = config(8, cycle, interpolation=interpolation, metric=metric)
        batch = (data().x_train, data().y_train)
        merged = _merge([run])
        assert [k for k, *_ in merged[(0, 1)]] == (["pre", "restrict", "post"] if cycle == "[(1),1,{2}]"
                                                   else ["pre", "pre", "restrict", "post", "post"])
        _check_coherence(merged, cfg, 8, batch)
        _check_iterates(run, cfg, 8, batch)


# (K, cycle, interpolation, min blocks per rank): every level on both ranks (linear reads halos
# across the boundary), and the coarsest level gathered onto rank 0 (movers)
PARALLEL_RUNS = [(8, "[(1),1,{2}]", "constant", 1), (8, "[1,2,{2}]", "linear", 1),
                 (16, "[(1),1,{2}]", "linear", 4), (16, "[1,2,{2}]", "constant", 8)]


def _parallel_worker(comm, runs):
    return [_observed_run(comm, K, cycle, interpolation=interp, min_blocks_per_rank=mb)
            for K, cycle, interp, mb in runs]


@pytest.mark.timeout(120)
def test_coherence_at_run_time_on_two_ranks():
    ranks = run_ranks("tests.test_mgopt_reference:_parallel_worker", 2, "gloo", timeout=100,
                      args={"runs": PARALLEL_RUNS})
    batch = (data().x_train, data().y_train)
    for n, (K, cycle, interp, mb) in enumerate(PARALLEL_RUNS):
        runs = [r[n] for r in ranks]
        cfg = config(K, cycle, interpolation=interp, min_blocks_per_rank=mb)
        expected = {1: [2, 2, 2], 4: [1, 2, 2], 8: [1, 1, 2]}[mb]
        assert runs[0]["ranks"] == expected, runs[0]["ranks"]
        _check_coherence(_merge(runs), cfg, K, batch)
        _check_iterates(runs[0], cfg, K, batch)
        # every rank reports the loss; work units are complete on rank 0 only (which holds every level)
        assert runs[1]["states"] == [None, None]
        assert [r[0] for r in runs[1]["results"]] == [r[0] for r in runs[0]["results"]]


# --- 3. multilevel SGD (Algorithm 2) and the cascade --------------------------------------------------------

@pytest.mark.parametrize("cycle,interpolation", [("[{1}]", "constant"), ("[(1),1,{2}]", "constant"),
                                                 ("[1,2,{2}]", "linear")])
def test_multilevel_sgd_is_a_vcycle_per_minibatch(cycle, interpolation, tmp_path):
    """Two epochs of 3 mini-batches (6, 6, 4 samples) through run_cycles against Algorithm 2."""
    d = data()
    cfg = config(8, cycle, interpolation=interpolation, batch_size=6, max_cycles=6)
    vcycle = build_vcycle(cfg, d, SelfComm(), init_state=initial_state(8))
    records = []
    run_cycles(vcycle, d, cfg, RunWriter(str(tmp_path), active=False), 0.0, cfg.max_cycles,
               after_cycle=lambda s: records.append((s.record["loss"], s.record["work_units"])))
    mg = reference_for(cfg)
    theta, want = initial_state(8), []
    for epoch in range(2):
        for idx in batches(16, 6, cfg.seed, epoch):
            batch = (d.x_train[idx], d.y_train[idx])
            loss = mg.loss(theta, batch)
            theta = mg.cycle(theta, batch)
            want.append((loss, mg.work))
    assert len(records) == len(want) == 6
    for (loss, units), (want_loss, want_units) in zip(records, want):
        assert abs(loss - want_loss) <= 1e-12 * abs(want_loss), (records, want)
        assert math.isclose(units, want_units, rel_tol=1e-14)
    assert math.isclose(want[-1][1], 6 * cfg.setup.cost(), rel_tol=1e-14)
    close_dict(state(vcycle.levels[-1]), theta, 1e-12, "after 2 epochs")
    # the mini-batches differ: one V-cycle on the full batch per step would give other iterates
    assert len({round(loss, 12) for loss, _ in records}) == 6


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_cascade_then_mgopt_equals_the_reference(interpolation, metric, tmp_path):
    """K = 2 -> 4 (3 GD steps each, cosine LR restarted), prolongated to 8, then 2 V-cycles."""
    d = data()
    cfg = config(8, "[(1),{2}]", metric=metric, cascade=2, cascade_cycles=3, cascade_interpolation=interpolation,
                 lr_min=0.01, max_cycles=2, out=str(tmp_path), run_name="c")
    summary = train(cfg, SelfComm(), d)
    rows = read_metrics(str(tmp_path / "c"))
    batch = (d.x_train, d.y_train)
    spec = cfg.spec_for(d)
    # the first stage starts from parml's seeded draw (initial values only; everything else is ours)
    theta = dict(build_model(spec.coarsened(4), seed=cfg.seed, dtype=torch.float64).state_dict())
    want, units = [], 0.0
    for depth in (2, 4):
        gd = ref.MGOPT(depth, (), 1, metric=metric, lr=cfg.lr, beta=cfg.beta, activation=cfg.activation)
        for i in range(cfg.cascade_cycles):
            gd.lr = ref.cosine_lr(cfg.lr, cfg.lr_min, cfg.cascade_cycles, i)
            want.append((f"cascade K={depth}", gd.loss(theta, batch)))
            theta = gd.cycle(theta, batch)
        units += gd.work * depth / cfg.blocks
        theta = ref.prolong(theta, interpolation)
    mg = reference_for(cfg)
    for _ in range(cfg.max_cycles):
        want.append(("train", mg.loss(theta, batch)))
        theta = mg.cycle(theta, batch)
    got = [(r["phase"], r["loss"]) for r in rows]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (phase, loss), (_, want_loss) in zip(got, want):
        assert abs(loss - want_loss) <= 1e-12 * abs(want_loss), (phase, got, want)
    assert math.isclose(summary["cascade_work_units"], units, rel_tol=1e-14)
    assert math.isclose(units, 3 * 2 / 8 + 3 * 4 / 8, rel_tol=1e-14)
    assert math.isclose(summary["work_units"], units + 2 * cfg.setup.cost(), rel_tol=1e-14)
    close_dict(state(summary["levels"][-1]), theta, 1e-12, "after cascade + 2 V-cycles")
