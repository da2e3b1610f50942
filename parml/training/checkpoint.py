"""Checkpoints: per-rank shards plus a manifest, written atomically, resumable on any mesh shape.

``<run>/checkpoints/cycle-000120/`` holds ``rank<r>.pt`` (that rank's block chunks, shared
parameters and level-optimizer states) and ``manifest.json`` (position, counters, shard sizes and
SHA-256). Each shard is serialized in memory, written to a temporary name, fsynced, read back and
renamed; the manifest is written last, after every shard exists, so a checkpoint without a manifest
is incomplete. A failed write on any rank ends the save on every rank with the same ``WriteError``.
Older checkpoints are removed only once ``keep`` newer verified ones exist (``prune``). Loading
checks sizes and hashes and falls back to the previous complete checkpoint with a warning.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from ..parallel.sharding import assemble_state, shard_entries, shard_state
from .files import WriteError, agree, atomic_write, attempt, file_digest, remove_temporaries, sha256, torch_bytes, \
    write_error

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message names the folder."""


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


def save(run_dir: str, comm, cycle: int, finest_model, levels: list, manifest: dict, keep: int = 3,
         verified: set | None = None) -> str:
    """Collective: every rank of a level's first data replica writes and re-reads its shard (a rank
    that holds nothing of a first replica writes no file), rank 0 the manifest; then complete
    checkpoints older than the `keep` newest verified ones are removed. A failed write on any rank
    raises the same WriteError on every rank and removes the incomplete checkpoint."""
    folder = os.path.join(run_dir, "checkpoints", f"cycle-{cycle:06d}")
    verified = set() if verified is None else verified
    agree(comm, attempt(lambda: _make_folder(folder)) if comm.rank == 0 else None)
    shard = {"model": shard_state(finest_model) if _first_replica(levels[-1]) else None,
             "optimizers": [optimizer_pieces(lev) if _first_replica(lev) else None for lev in levels]}
    mine = None
    if shard["model"] is not None or any(o is not None for o in shard["optimizers"]):
        path = os.path.join(folder, f"rank{comm.rank}.pt")
        data = torch_bytes(shard)
        error = attempt(lambda: atomic_write(path, data, verify=True))
        mine = str(error) if error else (os.path.basename(path), len(data), sha256(data))
    files = [f for f in comm.allgather_object(mine) if f is not None]
    failed = next((f for f in files if isinstance(f, str)), None)
    if failed is None and comm.rank == 0:
        body = {**manifest, "cycle": cycle, "ranks": comm.size,
                "files": {name: {"bytes": size, "sha256": digest} for name, size, digest in files}}
        error = attempt(lambda: atomic_write(os.path.join(folder, MANIFEST), json.dumps(body, indent=1).encode()))
        failed = None if error is None else str(error)
    if failed is not None and comm.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)        # incomplete: no manifest, no use
    agree(comm, WriteError(failed) if failed and comm.rank == 0 else None)
    verified.add(folder)
    if comm.rank == 0:
        prune(run_dir, keep, verified)
    return folder


def _make_folder(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    remove_temporaries(folder)          # left by a process killed while writing this checkpoint


def prune(run_dir: str, keep: int, verified: set) -> list[str]:
    """Remove the checkpoint folders older than the `keep` newest verified ones (those in `verified`
    or whose files match their manifest's sizes and SHA-256); a damaged checkpoint is not counted,
    so nothing is removed while fewer than `keep` verified ones exist. Returns the removed folders."""
    root = os.path.join(run_dir, "checkpoints")
    folders = [os.path.join(root, name) for name in sorted(os.listdir(root), reverse=True)]
    good = 0
    for i, folder in enumerate(folders):
        if os.path.exists(os.path.join(folder, MANIFEST)) and (folder in verified or _problem(folder) is None):
            verified.add(folder)
            good += 1
        if good == keep:
            for old in folders[i + 1:]:
                shutil.rmtree(old, ignore_errors=True)
            return folders[i + 1:]
    return []


def last_complete(run_dir: str) -> str:
    """The newest checkpoint with a manifest, for messages ('none' if there is none)."""
    found = complete_checkpoints(run_dir, verify=False)
    return found[0] if found else "none"


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
        if file_digest(path) != meta["sha256"]:
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
