#!/usr/bin/env bash
# Layer-parallel training on one node with torchrun (gloo on CPU, NCCL on GPUs).
#   NPROC   processes = pipeline ranks; each holds ~K/NPROC blocks (rank 0 the opening, the last the head)
#   extra arguments go to `parml train` (e.g. -K 2048 -L 8 -M 8 --schedule 1f1b)
# Example: NPROC=4 launch/torchrun.sh -K 2048 -L 8 --microbatches 4
set -euo pipefail
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}    # one compute thread per rank; ranks are the parallelism
exec torchrun --standalone --nproc_per_node "$NPROC" -m parml.cli train --ranks "$NPROC" "$@"
