"""Checkpoints: per-rank shards plus a manifest, written atomically, resumable on any mesh shape.

``<run>/checkpoints/cycle-000120/`` holds ``rank<r>.pt`` (that rank's block chunks, shared
parameters and level-optimizer states) and ``manifest.json`` (position, counters, shard sizes and
SHA-256). Each file is written to a temporary name, fsynced and renamed; the manifest is written
last, after every shard exists, so a checkpoint without a manifest is incomplete. Loading checks
sizes and hashes and falls back to the previous complete checkpoint with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import torch

from ..parallel.sharding import assemble_state, shard_entries, shard_state

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message names the folder."""


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_pieces(level) -> list:
    """A level optimizer's per-parameter state keyed by position (block rows or shared name), so
    a different partition can cut it again: [(key, lo, hi, {name: tensor or number})]."""
    model = level.model
    entries = shard_entries(model.spec, model.start, model.stop)
    return [(e.key, e.lo, e.hi, {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                 for k, v in level.optimizer.state.get(p, {}).items()})
            for e, p in zip(entries, level.params)]


def restore_optimizer(level, pieces: list) -> None:
    """Give `level`'s optimizer the state saved by ``optimizer_pieces`` on any partition (`pieces`
    from every old rank). Block rows are reassembled by position and cut to this rank's rows."""
    by_key = {}
    for key, lo, hi, st in pieces:
        by_key.setdefault(key, []).append((lo, st))
    model = level.model
    for e, p in zip(shard_entries(model.spec, model.start, model.stop), level.params):
        parts = sorted(by_key.get(e.key, []), key=lambda t: t[0])
        if not parts or not parts[0][1]:
            continue
        state = {}
        for name, value in parts[0][1].items():
            if torch.is_tensor(value) and value.dim() > 0 and e.key[0] == "block":
                value = torch.cat([st[name] for _, st in parts])[e.lo:e.hi]
            state[name] = value.to(p.device) if torch.is_tensor(value) and value.dim() > 0 else value
        level.optimizer.state[p] = state


def _first_replica(level) -> bool:
    """Whether this rank holds `level` in its first data replica (replicas hold the same values)."""
    return level is not None and getattr(level.executor, "replica", 0) == 0


def save(run_dir: str, comm, cycle: int, finest_model, levels: list, manifest: dict, keep: int = 2) -> str:
    """Collective: every rank of a level's first data replica writes its shard (a rank that holds
    nothing of a first replica writes no file), rank 0 the manifest; keeps the newest `keep`."""
    folder = os.path.join(run_dir, "checkpoints", f"cycle-{cycle:06d}")
    if comm.rank == 0:
        os.makedirs(folder, exist_ok=True)
    comm.barrier()
    shard = {"model": shard_state(finest_model) if _first_replica(levels[-1]) else None,
             "optimizers": [optimizer_pieces(lev) if _first_replica(lev) else None for lev in levels]}
    mine = None
    if shard["model"] is not None or any(o is not None for o in shard["optimizers"]):
        path = os.path.join(folder, f"rank{comm.rank}.pt")
        _atomic_write(path, lambda f: torch.save(shard, f))
        mine = (os.path.basename(path), os.path.getsize(path), _digest(path))
    files = [f for f in comm.allgather_object(mine) if f is not None]
    if comm.rank == 0:
        body = {**manifest, "cycle": cycle, "ranks": comm.size,
                "files": {name: {"bytes": size, "sha256": digest} for name, size, digest in files}}
        _atomic_write(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(body, indent=1).encode()))
        for old in complete_checkpoints(run_dir, verify=False)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return folder


def complete_checkpoints(run_dir: str, verify: bool = True) -> list[str]:
    """Checkpoint folders with a manifest, newest first; with `verify`, only intact ones."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root), reverse=True):
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, MANIFEST)):
            continue
        if verify:
            problem = _problem(folder)
            if problem:
                warnings.warn(f"checkpoint {folder} is unusable ({problem}); trying the previous one")
                continue
        found.append(folder)
    return found


def _problem(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"manifest: {e}"
    for name, meta in manifest.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != meta["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {meta['bytes']}"
        if _digest(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def load_latest(run_dir: str) -> tuple[dict, dict, list]:
    """(manifest, full finest-model state dict, per-level optimizer pieces from all ranks) of the
    newest intact checkpoint."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume {run_dir}: no complete checkpoint in {os.path.join(run_dir, 'checkpoints')}")
    folder = found[0]
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    names = sorted(manifest["files"], key=lambda n: int(n[4:-3]))          # rank<r>.pt
    shards = [torch.load(os.path.join(folder, name), weights_only=False) for name in names]
    state = assemble_state([s["model"] for s in shards if s["model"] is not None])
    manifest["folder"] = folder
    levels = len(shards[0]["optimizers"])
    pieces = [[piece for s in shards if s["optimizers"][i] for piece in s["optimizers"][i]] for i in range(levels)]
    return manifest, state, pieces
