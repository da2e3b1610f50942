"""Checkpoint re-partitioning on one process: model shards and level-optimizer state saved on one
partition come back on any other (1 <-> 2 <-> 3 ranks), row for row. End to end under the
launchers: tests/distributed/test_checkpoint.py."""
from types import SimpleNamespace

import pytest
import torch

from cases import SPEC
from parml.model import build_model
from parml.multilevel.hierarchy import ordered_parameters
from parml.parallel.layout import partition_blocks
from parml.parallel.sharding import assemble_state, shard_entries, shard_state
from parml.training.checkpoint import optimizer_pieces, restore_optimizer

FULL = build_model(SPEC, seed=2, dtype=torch.float64)
PARTITIONS = [partition_blocks(SPEC.total_blocks, n) for n in (1, 2, 3)] + [partition_blocks(SPEC.total_blocks, 4)]


def _shards(partition):
    return [FULL if partition.ranks == 1 else FULL.shard(*partition.range(r)) for r in range(partition.ranks)]


def _level(shard):
    params = ordered_parameters(shard)
    return SimpleNamespace(model=shard, params=params, optimizer=torch.optim.SGD(params, lr=0.1, momentum=0.9))


def _buffers():
    """A momentum buffer for every parameter of the full model, by name: distinct values per row."""
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in FULL.named_parameters()}


def _expected(shard, buffers):
    """The rows of `buffers` that belong to `shard`, in its ordered_parameters order."""
    out = []
    for e in shard_entries(SPEC, shard.start, shard.stop):
        if e.key[0] == "shared":
            out.append(buffers[e.key[1]])
        else:
            out.append(buffers[f"chunks.{e.key[1]}.{e.key[2]}"][e.lo:e.hi])
    return out


def _saved(partition, buffers):
    """optimizer_pieces of every rank of `partition`, with the buffers' rows and a step counter."""
    pieces = []
    for shard in _shards(partition):
        level = _level(shard)
        for p, value in zip(level.params, _expected(shard, buffers)):
            level.optimizer.state[p] = {"momentum_buffer": value.clone(), "step": torch.tensor(3.0)}
        pieces += optimizer_pieces(level)
    return pieces


@pytest.mark.parametrize("saved", PARTITIONS, ids=lambda p: f"saved-on-{p.ranks}")
@pytest.mark.parametrize("restored", PARTITIONS, ids=lambda p: f"restored-on-{p.ranks}")
def test_optimizer_state_is_cut_again_for_any_partition(saved, restored):
    buffers = _buffers()
    pieces = _saved(saved, buffers)
    for shard in _shards(restored):
        level = _level(shard)
        restore_optimizer(level, pieces)
        want = _expected(shard, buffers)
        assert len(level.params) == len(want)
        for p, w in zip(level.params, want):
            state = level.optimizer.state[p]
            assert torch.equal(state["momentum_buffer"], w), (saved.bounds, restored.bounds, shard.start)
            assert float(state["step"]) == 3.0


@pytest.mark.parametrize("partition", PARTITIONS, ids=lambda p: f"{p.ranks}-ranks")
def test_shard_states_assemble_to_the_full_model(partition):
    state = assemble_state([shard_state(s) for s in reversed(_shards(partition))])    # any order of parts
    full = FULL.state_dict()
    assert state.keys() == full.keys()
    for name in full:
        assert torch.equal(state[name], full[name]), name
