"""A GPU-node profile for ``parml plan`` built from published numbers: ESTIMATES, not measurements.

    python benchmarks/gpu_profile.py --out benchmarks/results/projection/profile_gpu_estimate.json

No GPU was lent to this study, so nothing here is measured. The node is a DGX H100-class machine:

* 8 × H100 SXM5 80 GB per node (NVIDIA H100 datasheet): 67 TFLOP/s FP32 (no TF32: PyTorch's
  default for matmuls), 3.35 TB/s HBM3, 80 GB per GPU. Kernels are charged at 60 % of peak FLOP/s
  and 80 % of peak bandwidth (an estimate of what small GEMMs and elementwise kernels reach).
* Per kernel launch a floor of 5 µs (PyTorch eager dispatch plus the launch; estimate), and per
  block: forward 3 kernels (matmul, activation, axpy), backward 4, deferred weight gradient 1.
  A block's time is launch floor + FLOPs / FLOP/s + bytes / bandwidth (a sum, not a max: it
  overestimates by at most 2× where compute and launch overhead are equal).
* NVLink 4 through NVSwitch inside a node: 900 GB/s per GPU both directions, so 450 GB/s one way
  (NVIDIA H100 / NVLink pages); NCCL point-to-point latency 8 µs (estimate: NVLink hardware
  latency is below 1 µs, NCCL's protocol and stream synchronisation dominate).
* Between nodes, one ConnectX-7 InfiniBand NDR port per GPU: 400 Gb/s = 50 GB/s one way (NVIDIA
  Quantum-2 / ConnectX-7 data sheets; switch port-to-port latency ~130 ns); NCCL point-to-point
  latency 15 µs (estimate).
* All-reduce: 2·latency·log2(g) + 2·(g−1)/g · bytes / bandwidth (tree latency, ring bandwidth).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from parml.plan.profile import CommCost, Fit, KernelCost, Profile  # noqa: E402

PEAK_FLOPS = 67e12 * 0.6          # H100 SXM FP32 (non-tensor) at 60 %
BANDWIDTH = 3.35e12 * 0.8         # HBM3 at 80 %
LAUNCH = 5e-6                     # per kernel (estimate)
MEMORY = 80e9
GPUS_PER_NODE = 8
NVLINK = (8e-6, 450e9)            # (latency, bytes/s one way)
INFINIBAND = (15e-6, 50e9)
FP32 = 4


def _kernel(launches, flops, bytes_, conv=False) -> Fit:
    """launches per block, FLOPs per (row · width² · pixel), bytes per (row · width · pixel)."""
    f = flops * (9 if conv else 1)
    return Fit(["n", "n*b*v^2*s", "n*b*v*s"], [launches * LAUNCH, f / PEAK_FLOPS, bytes_ * FP32 / BANDWIDTH])


def kernels() -> dict:
    """Dense (deferred and inline weight gradients) and 3x3 conv blocks."""
    dense = KernelCost(_kernel(3, 2, 4), _kernel(4, 2, 6), _kernel(1, 2, 2), "estimate: H100 roofline + launch floor")
    inline = KernelCost(dense.forward, _kernel(5, 4, 8), Fit.constant(0.0), "estimate: weight gradients in backward")
    conv = KernelCost(_kernel(3, 2, 4, True), _kernel(5, 4, 8, True), Fit.constant(0.0), "estimate: 3x3 conv blocks")
    return {"dense": dense, "dense-inline": inline, "conv": conv}


def ends() -> dict:
    """Opening (b·i·v), head and loss (b·o·v) per micro-batch: a few kernels each."""
    opening = [2 / PEAK_FLOPS, 2 * FP32 / BANDWIDTH]
    head = [2 / PEAK_FLOPS, 2 * FP32 / BANDWIDTH]
    return {"first_F": Fit(["1", "b*i*v*s", "b*v*s"], [2 * LAUNCH, *opening]),
            "first_B": Fit(["1", "b*i*v*s", "b*v*s"], [2 * LAUNCH, *opening]),
            "last_F": Fit(["1", "b*o*v", "b*v*s"], [4 * LAUNCH, *head]),
            "last_B": Fit(["1", "b*o*v", "b*v*s"], [4 * LAUNCH, *head])}


def steps() -> dict:
    """Per gradient evaluation, update, transfer and .grad writing: launches + passes over p."""
    def passes(launches, n):
        return Fit(["1", "p"], [launches * LAUNCH, n * FP32 / BANDWIDTH])
    return {"gradient": passes(30, 3), "update": passes(10, 3), "transfer": passes(4, 2), "finish": passes(4, 2)}


def link(latency, bandwidth, note) -> CommCost:
    return CommCost(latency, bandwidth, 5e-6, Fit(["log2(g)", "B*(g-1)/g"], [2 * latency, 2 / bandwidth]), note=note)


def gpu_node_profile() -> Profile:
    nccl = link(*NVLINK, "estimate: NVLink 4 / NVSwitch, 450 GB/s one way, NCCL latency 8 us")
    nccl.inter_node = link(*INFINIBAND, "estimate: InfiniBand NDR 400 Gb/s per GPU, NCCL latency 15 us")
    return Profile("cuda", kernels(), {"nccl": nccl}, ends(), steps(), cores=GPUS_PER_NODE, memory_bytes=MEMORY,
                   device_name="H100 SXM5 80GB (estimated from published numbers)",
                   machine={"gpus_per_node": GPUS_PER_NODE, "estimate": True},
                   notes="ESTIMATES from vendor specifications, not measured; see benchmarks/gpu_profile.py")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection" / "profile_gpu_estimate.json"))
    a = ap.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    gpu_node_profile().save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
