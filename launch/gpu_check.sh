#!/usr/bin/env bash
# The one prepared check for a lent GPU machine: at most 6 minutes, no installs, no network.
#
#   bash launch/gpu_check.sh [OUT_DIR]        # results under OUT_DIR (default /tmp/parml-gpu)
#
# Each step runs under its own timeout (together at most 360 s) and ends with a summary line
# "gpu_check: STEP: ok | FAILED (...) | skipped (...)"; a failing step makes the script exit 1,
# and the later steps still run. One GPU: the GPU unit tests (NCCL at P = 1, MPI staging CUDA
# tensors through host memory at P = 1 and 2), training with NCCL at P = 1 and with MPI at P = 2
# sharing the GPU, the fused-kernel and pipeline benchmarks in quick mode. Two or more GPUs: also NCCL at P = 2
# (exactness in the unit tests, a short training run, the benchmark's NCCL rows) and the D = 2 data x layer
# mesh on NCCL against the P = 1 run.
#
#   PARML_PYTHON   the python to run (default: python)
#   PARML_MPIRUN   the mpirun to use (default: mpirun on PATH)
set -u
cd "$(dirname "$0")/.."
out="${1:-/tmp/parml-gpu}"
mkdir -p "$out"
PY="${PARML_PYTHON:-python}"
MPIRUN="${PARML_MPIRUN:-$(command -v mpirun || echo mpirun)}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
status=0
summary=()

step() {   # step NAME SECONDS COMMAND...: run COMMAND under a timeout, record the outcome
    local name=$1 limit=$2 rc=0 t0=$SECONDS why
    shift 2
    echo "== $name (timeout ${limit} s)"
    timeout -k 5 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        summary+=("gpu_check: $name: ok ($((SECONDS - t0)) s)")
    else
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after $limit s"; else why="exit $rc"; fi
        summary+=("gpu_check: $name: FAILED ($why)")
        status=1
    fi
}

# what is installed (nothing is installed here); the GPU count goes to $out/gpus
step "imports and GPUs" 20 "$PY" -c '
import importlib, sys
missing = []
for name in ("torch", "mpi4py", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({exc})")
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
open(sys.argv[1], "w").write(str(n))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {n} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(n)) or "none")
if missing:
    sys.exit("missing (install before running this check): " + "; ".join(missing))
if n == 0:
    sys.exit("no CUDA device visible: the GPU steps below will fail")
' "$out/gpus"
ngpu=$(cat "$out/gpus" 2>/dev/null || echo 0)
case "$ngpu" in ''|*[!0-9]*) ngpu=0 ;; esac

step "parml info" 15 "$PY" -m parml.cli info

step "GPU unit tests (exactness, kernels)" 100 \
    "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider

step "train NCCL P=1" 40 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m parml.cli train -K 256 -L 4 --device cuda --max-cycles 5 --no-progress --out "$out/train" \
    --run-name nccl1

step "train MPI P=2 on one GPU (host staging)" 40 "$MPIRUN" -n 2 --oversubscribe --bind-to none \
    "$PY" -m parml.cli train --backend mpi --device cuda --ranks 2 -K 256 -L 4 --max-cycles 5 \
    --no-progress --out "$out/train" --run-name mpi2

if [ "$ngpu" -ge 2 ]; then
    step "train NCCL P=2" 35 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m parml.cli train --ranks 2 -M 2 -K 256 -L 4 --device cuda --max-cycles 5 --no-progress \
        --out "$out/train" --run-name nccl2
    # the data x layer mesh on NCCL: D = 2 replicas, the coarsest level (32 blocks < 64) redundant on
    # both, the P = 1 run's options;
    # its last loss must be the P = 1 run's to float32 rounding
    step "train NCCL P=2 mesh D=2" 25 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m parml.cli train --ranks 2 --data-parallel 2 --coarse-layout redundant --min-blocks-per-rank 64 \
        -K 256 -L 4 --device cuda --max-cycles 5 --no-progress --out "$out/train" --run-name mesh2
    step "NCCL P=2 mesh D=2 equals P=1" 5 "$PY" -c 'import json, sys; a, b = (json.load(open(f"{sys.argv[1]}/{n}/summary.json"))["final_loss"] for n in ("nccl1", "mesh2")); print(f"final loss P=1 {a:.6g}, mesh D=2 {b:.6g}"); sys.exit(0 if abs(a - b) <= 1e-4 * abs(a) else "the mesh differs from P = 1")' "$out/train"
else
    summary+=("gpu_check: train NCCL P=2: skipped (needs 2 GPUs, found $ngpu)")
    summary+=("gpu_check: train NCCL P=2 mesh D=2: skipped (needs 2 GPUs, found $ngpu)")
    summary+=("gpu_check: NCCL P=2 mesh D=2 equals P=1: skipped (needs 2 GPUs, found $ngpu)")
fi

step "kernel benchmark (quick)" 40 "$PY" benchmarks/kernels.py --device cuda --quick --reps 3 \
    --out "$out/kernels_cuda"
head -n 30 "$out/kernels_cuda/kernels.md" 2>/dev/null

# quick sizes, compute-bound model only: NCCL rows at P = 1 (and 2), MPI rows at P = 1, 2
step "pipeline benchmark (quick)" 40 "$PY" benchmarks/pipeline_scaling.py --device cuda --quick \
    --only compute --out "$out/pipeline_cuda"
head -n 40 "$out/pipeline_cuda/pipeline_scaling.md" 2>/dev/null

echo "== summary"
printf '%s\n' "${summary[@]}"
echo "gpu_check: $([ "$status" -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')"
exit "$status"
