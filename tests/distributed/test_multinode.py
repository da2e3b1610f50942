"""Multi-node launches, tested as two "nodes" on localhost; both give the serial run.

* two torchrun agents (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``), each
  starting 2 ranks: a (D, P) = (2, 2) mesh whose layer groups stay inside a "node" and whose data
  groups cross them — the layout ``launch/slurm_gpu.sbatch`` sets up on GPU nodes;
* ``mpirun --hostfile`` with a hostfile of localhost slots, started by ``launch/slurm_mpi.sbatch``
  (``LAUNCHER=mpirun``) as in a 2-node allocation of 2 tasks each.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from multiproc import REPO_ROOT, base_env, mpirun_available
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.launch import free_port, kill_group, mpirun_path
from parml.training.trainer import train

ARGS = ["-K", "32", "-L", "3", "--min-blocks-per-rank", "8", "--dtype", "float64", "--max-cycles", "3",
        "--target-accuracy", "none", "--no-progress", "--data-parallel", "2", "--coarse-layout", "replicate"]


def _serial(tmp_path):
    cfg = TrainConfig(blocks=32, levels=3, min_blocks_per_rank=8, dtype="float64", max_cycles=3,
                      target_accuracy=None, progress=False, out=str(tmp_path), run_name="serial")
    train(cfg, SelfComm())
    return _losses(tmp_path / "serial")


def _losses(folder):
    with open(folder / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r.get("phase") == "train"], rows[-1]["val_loss"]


def _run_all(commands, env, timeout=240):
    """Start every command in its own session, wait for all; kill every one at the deadline."""
    procs = [subprocess.Popen(c, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True, text=True) for c in commands]
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    return [p.returncode for p in procs], outs


def _check(tmp_path, name, codes, outs):
    assert codes == [0] * len(codes), "\n".join(outs)
    losses, val = _losses(tmp_path / name)
    want, want_val = _serial(tmp_path)
    assert len(losses) == 3
    for a, b in zip(losses, want):
        assert abs(a - b) <= 1e-9 * abs(b), (losses, want)
    assert abs(val - want_val) <= 1e-9 * abs(want_val)
    text = "\n".join(outs)
    assert "mesh: 4 rank(s) = 2 data replica(s) x 2 layer rank(s)" in text
    assert "level 1: 8 blocks on 1 layer rank(s) x 4 replica(s)" in text


@pytest.mark.timeout(300)
def test_two_torchrun_agents_on_localhost_give_the_serial_run(tmp_path):
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mesh{port}",
             "-m", "parml.cli", "train", *ARGS, "--ranks", "4", "--out", str(tmp_path), "--run-name", "agents"]
    codes, outs = _run_all([agent, agent], base_env())
    _check(tmp_path, "agents", codes, outs)


# --- the Slurm recipes ------------------------------------------------------------------------------

FAKE = """#!/usr/bin/env bash
# fake srun / scontrol / torchrun: log the call; srun runs the command after its options
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0")" in
    scontrol) printf 'node-a\\nnode-b\\n' ;;
    srun) while [[ "${1:-}" == --* ]]; do shift; done; exec "$@" ;;
esac
"""


def _fakes(tmp_path, names):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_gpu_recipe_starts_one_torchrun_agent_per_node_with_a_c10d_rendezvous(tmp_path):
    bin_dir = _fakes(tmp_path, ["srun", "scontrol", "torchrun"])
    log = tmp_path / "calls"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="77")
    proc = subprocess.run(["bash", str(REPO_ROOT / "launch" / "slurm_gpu.sbatch"), "-K", "2048", "-M", "8"],
                          env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("scontrol show hostnames node-[a-b]")
    assert calls[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun")
    assert calls[2] == ("torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node-a:29500 "
                        "--rdzv-id 77 -m parml.cli train --device cuda --ranks 8 --data-parallel 2 "
                        "--out runs/slurm-77 -K 2048 -M 8")
    env["LAYER_RANKS"] = "3"
    proc = subprocess.run(["bash", str(REPO_ROOT / "launch" / "slurm_gpu.sbatch")], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2 and "LAYER_RANKS=3 does not divide the 8 GPUs" in proc.stderr


def test_slurm_gpu_recipe_takes_the_first_of_a_long_node_list(tmp_path):
    """A large allocation's host list outlives a reader that stops at its first line: under
    ``set -o pipefail`` the writer's SIGPIPE would end the job (exit 141) before any rank starts."""
    bin_dir = _fakes(tmp_path, ["srun", "torchrun"])
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nseq -f "node-%g" 1 200000\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="node-[1-200000]", SLURM_JOB_ID="78")
    proc = subprocess.run(["bash", str(REPO_ROOT / "launch" / "slurm_gpu.sbatch")], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "--rdzv-endpoint node-1:29500 " in (tmp_path / "calls").read_text()


@pytest.mark.timeout(300)
def test_slurm_mpi_recipe_runs_the_mesh(tmp_path):
    """srun (faked: it logs the ranks' command and runs it once) on 2 nodes x 8 tasks; then the real
    mpirun with a hostfile of localhost slots as an "allocation" of 2 nodes x 2 tasks: the (2, 2)
    mesh gives the serial run's losses."""
    bin_dir = _fakes(tmp_path, ["srun"])
    log = tmp_path / "calls"
    base = dict(os.environ, FAKE_LOG=str(log), SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8(x2)", SLURM_JOB_ID="5",
                PATH=f"{bin_dir}:{os.environ['PATH']}")
    fake_python = bin_dir / "python"
    fake_python.write_text(FAKE)
    fake_python.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO_ROOT / "launch" / "slurm_mpi.sbatch"), "-K", "64"], env=base,
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "srun --mpi=pmix --kill-on-bad-exit=1 python -m parml.cli train --backend mpi --ranks 16 --data-parallel 2 "
        "--out runs/slurm-5 -K 64",
        "python -m parml.cli train --backend mpi --ranks 16 --data-parallel 2 --out runs/slurm-5 -K 64"]
    if not mpirun_available():
        pytest.skip("mpirun / mpi4py not available")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=4\n")
    env = base_env({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "LAUNCHER": "mpirun", "SLURM_JOB_ID": "m",
                    "HOSTFILE": str(hostfile), "MPIRUN_OPTIONS": "--oversubscribe --bind-to none",
                    "PATH": f"{os.path.dirname(sys.executable)}:{os.path.dirname(mpirun_path())}:"
                            f"{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT)})
    args = [a for a in ARGS if a not in ("--data-parallel", "2")]
    codes, outs = _run_all([["bash", str(REPO_ROOT / "launch" / "slurm_mpi.sbatch"), *args, "--out", str(tmp_path),
                             "--run-name", "mpi"]], env)
    _check(tmp_path, "mpi", codes, outs)
