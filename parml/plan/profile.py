"""A machine's measured costs: what the simulator (``simulate.py``) charges for each action.

A ``Profile`` is written by ``calibrate.py`` (or by hand for a machine not at hand, with its
sources in ``notes``) and read back from JSON. Every cost is a fitted linear combination of
named features (``FEATURES``) with the fit's error on the points it was fitted to:

* per kernel ("dense": fused Euler blocks with deferred weight gradients; "dense-inline"; "conv"):
  forward ``F``, backward ``B`` (input adjoint) and weight-gradient ``W`` seconds of one chunk of
  n blocks on b rows of width v (conv: v channels on s = H*W pixels);
* ``ends``: what the first rank (opening) and the last rank (head + loss) add per micro-batch;
* ``step``: per gradient evaluation (executor, Level.gradient bookkeeping) and per optimizer
  update, against the rank's parameter count p;
* ``comm``: per backend, point-to-point latency, bandwidth and the sender's posting cost, and
  all-reduce seconds against bytes B and group size g; ``*_oversubscribed`` variants hold what
  was measured with more ranks than cores.

``cores`` is how many ranks one node runs without sharing a core (CPU) or device (GPU);
``memory_bytes`` the memory one rank has when the node is full.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

SCHEMA = 1
DEVICES = ("cpu", "cuda")


class ProfileError(ValueError):
    """A profile that cannot be used; the message is one line naming the file and the fix."""


# --- fitted cost functions -------------------------------------------------------------------------

def _g(x, k, default=1.0):
    v = x.get(k, default)
    return float(default if v is None else v)


# variables: n blocks, b rows, v width/channels, s pixels (1 dense), i in features, o out features,
# p parameter elements, g group size, B bytes
# the inputs and outputs of the models on which kernel "network" (``kernels.NetworkGradient``, the
# whole model on one rank) is calibrated; other sizes add the end fits' difference (``StageCost``)
NETWORK_IO = (8, 4)

FEATURES = {
    "1": lambda x: 1.0,
    "n": lambda x: _g(x, "n"),
    "n*b": lambda x: _g(x, "n") * _g(x, "b"),
    "n*b*v*s": lambda x: _g(x, "n") * _g(x, "b") * _g(x, "v") * _g(x, "s"),
    "n*b*v^2*s": lambda x: _g(x, "n") * _g(x, "b") * _g(x, "v") ** 2 * _g(x, "s"),
    "n*v^2": lambda x: _g(x, "n") * _g(x, "v") ** 2,
    "b": lambda x: _g(x, "b"),
    "b*v*s": lambda x: _g(x, "b") * _g(x, "v") * _g(x, "s"),
    "b*i*v*s": lambda x: _g(x, "b") * _g(x, "i") * _g(x, "v") * _g(x, "s"),
    "b*o*v": lambda x: _g(x, "b") * _g(x, "o") * _g(x, "v"),
    "p": lambda x: _g(x, "p"),
    "log2(g)": lambda x: math.log2(max(_g(x, "g"), 1.0)),
    "B": lambda x: _g(x, "B"),
    "B*(g-1)/g": lambda x: _g(x, "B") * (_g(x, "g") - 1) / _g(x, "g"),
}


@dataclass
class Fit:
    """seconds = Σ coef_k · FEATURES[features_k](variables), never negative."""
    features: list[str]
    coef: list[float]
    median_rel_error: float = 0.0
    max_rel_error: float = 0.0
    points: int = 0

    def __post_init__(self):
        bad = [f for f in self.features if f not in FEATURES]
        if bad or len(self.features) != len(self.coef):
            raise ProfileError(f"fit has unknown features {bad} or {len(self.coef)} coefficients "
                               f"for {len(self.features)} features")

    def __call__(self, **x) -> float:
        return max(0.0, sum(c * FEATURES[f](x) for f, c in zip(self.features, self.coef)))

    @classmethod
    def constant(cls, seconds: float) -> Fit:
        return cls(["1"], [float(seconds)])

    @classmethod
    def fitted(cls, features: list[str], points: list[dict], seconds: list[float], floor: float = 1e-12,
               absolute: bool = False) -> Fit:
        """Least squares on relative residuals with non-negative coefficients (features with a
        negative coefficient are dropped and the rest refitted), plus the fit's relative errors.
        Residuals are relative to max(seconds, `floor`): a cost measured as a difference of two
        timings is fitted against the size of those timings, not its own (noisy) size.
        ``absolute``: plain residuals (ordinary least squares), for costs whose noise is additive
        (message times: stalls of ~1 ms whatever the size), where it estimates the mean cost and a
        relative fit would let the one cheapest point set the intercept."""
        y = np.asarray(seconds, dtype=float)
        X = np.array([[FEATURES[f](p) for f in features] for p in points], dtype=float)
        w = np.ones_like(y) if absolute else 1.0 / np.maximum(y, floor)
        active = list(range(len(features)))
        coef = np.zeros(len(features))
        while active:
            sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0.0
                coef[active] = sol
                break
            active = [a for a, c in zip(active, sol) if c > 0] if (sol > 0).any() else []
        pred = X @ coef
        rel = np.abs(pred - y) / np.maximum(y, floor)
        return cls(list(features), [float(c) for c in coef], float(np.median(rel)) if len(rel) else 0.0,
                   float(rel.max()) if len(rel) else 0.0, len(points))


@dataclass
class KernelCost:
    """Seconds of one chunk of n blocks: forward, backward (input adjoint) and weight gradients.

    ``by_width``: fits of each measured width alone ({"v": [F, B, W]}); a width between two
    measured ones interpolates their times geometrically, one outside takes the nearest width's
    time scaled by the global fits. Costs do not follow one formula in the width (vector units,
    caches), so the global fits alone miss some widths by 30 %."""
    forward: Fit
    backward: Fit
    weight: Fit = field(default_factory=lambda: Fit.constant(0.0))
    note: str = ""
    measured: list = field(default_factory=list)    # raw points: [n, b, v, s, F, B, W] seconds
    by_width: dict = field(default_factory=dict)

    def time(self, part: int, **x) -> float:
        """Seconds of part 0 (forward), 1 (backward) or 2 (weight gradients) at variables x."""
        glob = (self.forward, self.backward, self.weight)[part]
        if not self.by_width:
            return glob(**x)
        v = float(x.get("v", 1.0))
        widths = sorted(int(w) for w in self.by_width)
        at = {w: self.by_width[str(w)][part](**dict(x, v=w)) * self._correction(w, part, x) for w in widths}
        lo = max((w for w in widths if w <= v), default=None)
        hi = min((w for w in widths if w >= v), default=None)
        if lo is not None and hi is not None:
            if lo == hi or at[lo] <= 0 or at[hi] <= 0:
                return at[lo] if lo == hi else (at[lo] + at[hi]) / 2
            a = math.log(v / lo) / math.log(hi / lo)
            return at[lo] ** (1 - a) * at[hi] ** a
        near = lo if lo is not None else hi
        ref = glob(**dict(x, v=near))
        return at[near] * glob(**x) / ref if ref > 0 else glob(**x)

    def _correction(self, w: int, part: int, x: dict) -> float:
        """measured / fitted on width `w`'s calibration grid, interpolated bilinearly in (log n,
        log b) and held at the grid's edges (the nearest measured point where a corner was not
        measured). Three terms cannot follow a chunk from a few blocks in cache to thousands whose
        states live in memory: the fits alone missed the largest measured chunks by 20-35 %."""
        grids = self.__dict__.setdefault("_grids", {})
        if (w, part) not in grids:
            fit = self.by_width[str(w)][part]
            pts = {(float(m[0]), float(m[1])): m[4 + part] / f for m in self.measured
                   if int(m[2]) == w and m[3] == 1 and m[4 + part] > 0
                   and (f := fit(n=m[0], b=m[1], v=w, s=1)) > 0}
            grids[(w, part)] = (pts, sorted({k[0] for k in pts}), sorted({k[1] for k in pts}))
        pts, ns, bs = grids[(w, part)]
        if not pts:
            return 1.0
        n, b = _g(x, "n", 1.0), _g(x, "b", 1.0)
        (n0, n1, a), (b0, b1, c) = _bracket(ns, n), _bracket(bs, b)
        corners = [(n0, b0), (n1, b0), (n0, b1), (n1, b1)]
        if all(k in pts for k in corners):
            logs = [math.log(pts[k]) for k in corners]
            return math.exp((1 - a) * (1 - c) * logs[0] + a * (1 - c) * logs[1] + (1 - a) * c * logs[2]
                            + a * c * logs[3])
        near = min(pts, key=lambda k: math.hypot(math.log(k[0] / n), math.log(k[1] / b)))
        return pts[near]


def _bracket(grid: list[float], x: float) -> tuple[float, float, float]:
    """The grid points around x (clamped to the grid) and x's position between them in log scale."""
    x = min(max(x, grid[0]), grid[-1])
    hi = next(g for g in grid if g >= x)
    lo = max(g for g in grid if g <= x)
    return lo, hi, 0.0 if hi == lo else math.log(x / lo) / math.log(hi / lo)


@dataclass
class CommCost:
    """One backend: one-way message = latency + bytes / bandwidth, plus CPU on both ends (LogP's o):
    the sender's posting cost (``overhead``) and the receiver's cost once the message is there
    (``receive``: waking up, the transport threads' copies, bookkeeping). On a machine whose ranks
    fill its cores that CPU is taken from compute, which is what makes many small messages slow."""
    latency: float
    bandwidth: float
    overhead: float = 0.0
    allreduce: Fit = field(default_factory=lambda: Fit(["log2(g)", "B*(g-1)/g"], [0.0, 0.0]))
    oversubscribed: CommCost | None = None     # measured with more ranks than cores
    inter_node: CommCost | None = None         # between nodes (a cluster profile), else the same
    measured: dict = field(default_factory=dict)  # raw points: {"p2p": [[bytes, s]], "allreduce": [[g, bytes, s]]}
    note: str = ""
    receive: float = 0.0
    # the receiver's CPU per message while its node's cores are all busy computing: waking up for
    # a core, and the transport threads beside each rank taking CPU from compute (measured in a
    # relay whose ranks compute between messages, oversubscribed runs only); 0: as `receive`
    receive_busy: float = 0.0

    def busy_extra(self) -> float:
        """What a message costs its receiver beyond `receive` when its node has no free core."""
        return max(self.receive_busy - self.receive, 0.0)

    def message(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth

    def allreduce_seconds(self, nbytes: float, group: int) -> float:
        return 0.0 if group <= 1 else self.allreduce(B=nbytes, g=group)


@dataclass
class Profile:
    device: str                      # "cpu" | "cuda": the device type the costs were measured on
    kernels: dict[str, KernelCost]
    comm: dict[str, CommCost]
    ends: dict[str, Fit] = field(default_factory=dict)    # "first", "last": per micro-batch, F and B
    step: dict[str, Fit] = field(default_factory=dict)    # "gradient", "update", "transfer": per rank
    cores: int = 1
    memory_bytes: float = float("inf")
    dtype: str = "float32"
    threads: int = 1
    device_name: str = ""
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    date: str = ""
    notes: str = ""
    schema: int = SCHEMA

    # -- costs the simulator asks for
    def kernel(self, name: str) -> KernelCost:
        if name not in self.kernels:
            raise ProfileError(f"the profile has no costs for kernel {name!r} (has: "
                               f"{', '.join(sorted(self.kernels))}); calibrate it (parml calibrate)")
        return self.kernels[name]

    def backend(self, name: str) -> CommCost:
        if name not in self.comm:
            raise ProfileError(f"--backend {name!r} was not calibrated in this profile (has: "
                               f"{', '.join(sorted(self.comm)) or 'none'})")
        return self.comm[name]

    def end_cost(self, role: str, kind: str, manual: bool = False, **x) -> float:
        """The opening's (role "first") or the head and loss's ("last") extra seconds; `manual`: on a
        shard trained without autograd (``PipelineStage.manual``), where the profile measured it."""
        fit = (self.ends.get(f"{role}_{kind}_manual") if manual else None) or self.ends.get(f"{role}_{kind}")
        return fit(**x) if fit is not None else 0.0

    def step_cost(self, what: str, **x) -> float:
        fit = self.step.get(what)
        return fit(**x) if fit is not None else 0.0

    # -- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> Profile:
        if not isinstance(d, dict) or "schema" not in d or "device" not in d:
            raise ProfileError(f"{where} is not a parml profile (no 'schema'/'device'); "
                               f"create one with: parml calibrate")
        if d["schema"] != SCHEMA:
            raise ProfileError(f"{where} has profile schema {d['schema']}, this parml reads schema {SCHEMA}; "
                               f"recalibrate with: parml calibrate")
        try:
            def fit(f):
                return Fit(**f)

            def comm(c):
                if c is None:
                    return None
                c = dict(c)
                c["allreduce"] = fit(c["allreduce"])
                c["oversubscribed"] = comm(c.get("oversubscribed"))
                c["inter_node"] = comm(c.get("inter_node"))
                return CommCost(**c)
            kernels = {k: KernelCost(fit(v["forward"]), fit(v["backward"]), fit(v["weight"]), v.get("note", ""),
                                     v.get("measured", []),
                                     {w: [fit(f) for f in fs] for w, fs in v.get("by_width", {}).items()})
                       for k, v in d["kernels"].items()}
            rest = {k: v for k, v in d.items() if k not in ("kernels", "comm", "ends", "step")}
            prof = cls(kernels=kernels, comm={k: comm(v) for k, v in d["comm"].items()},
                       ends={k: fit(v) for k, v in d.get("ends", {}).items()},
                       step={k: fit(v) for k, v in d.get("step", {}).items()}, **rest)
        except ProfileError as e:
            raise ProfileError(f"{where} is corrupt: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{where} is corrupt ({type(e).__name__}: {e}); "
                               f"recalibrate with: parml calibrate") from None
        if prof.device not in DEVICES:
            raise ProfileError(f"{where} has device {prof.device!r}; valid: {', '.join(DEVICES)}")
        return prof

    def save(self, path) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=_json_default)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device: str | None = None, option: str = "--profile") -> Profile:
        """Read `path`; with `device`, refuse a profile measured on another device type."""
        where = f"{option} {path}"
        if not os.path.isfile(path):
            raise ProfileError(f"{where}: no such file; create one with: parml calibrate --out {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{where} is corrupt (not JSON: {e.msg} at line {e.lineno}); "
                               f"recalibrate with: parml calibrate --out {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"{where} cannot be read ({type(e).__name__}); "
                               f"recalibrate with: parml calibrate") from None
        prof = cls.from_dict(data, where)
        if device is not None:
            check_device(prof, device, where)
        return prof


def check_device(prof: Profile, device: str, where: str = "--profile") -> None:
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise ProfileError(f"--device {device!r} is not one of: {', '.join(DEVICES)}")
    if prof.device != kind:
        raise ProfileError(f"{where} was calibrated on device type {prof.device!r} but this run uses {kind!r}; "
                           f"calibrate on this machine with: parml calibrate --device {kind}")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def uniform_profile(forward: float = 1.0, backward: float = 1.0, weight: float = 0.0, latency: float = 0.0,
                    bandwidth: float = float("inf"), per_row: bool = True, cores: int = 10 ** 9,
                    memory_bytes: float = float("inf"), device: str = "cpu") -> Profile:
    """A synthetic profile: each block costs `forward`/`backward`/`weight` seconds per row (or per
    block call with ``per_row=False``), no overheads, messages take latency + bytes/bandwidth.
    The simulator tests (bubble bound, hand-built timelines, eq. (10)) run on it."""
    feat = "n*b" if per_row else "n"
    k = KernelCost(Fit([feat], [forward]), Fit([feat], [backward]), Fit([feat], [weight]), "uniform")
    comm = CommCost(latency, bandwidth, 0.0,
                    Fit(["log2(g)", "B*(g-1)/g"], [latency, 2.0 / bandwidth if bandwidth else 0.0]))
    return Profile(device, {"dense": k, "dense-inline": KernelCost(k.forward, Fit([feat], [backward + weight]),
                                                                  Fit.constant(0.0)), "conv": k},
                   {"gloo": comm, "mpi": comm, "nccl": comm}, cores=cores, memory_bytes=memory_bytes,
                   notes="synthetic uniform costs")
