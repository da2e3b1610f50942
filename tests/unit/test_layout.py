"""Layouts: block partitions (balanced, aligned) and the per-level rank plans of agglomeration."""
import pytest

from parml.parallel.layout import describe_plan, partition_blocks, plan_levels


def test_agglomeration_plan_for_2048_blocks_8_ranks_8_levels():
    blocks = [2048 // 2 ** i for i in range(7, -1, -1)]
    plans = plan_levels(blocks, 8, min_blocks_per_rank=64)
    assert [p.ranks for p in plans] == [1, 1, 1, 2, 4, 8, 8, 8]
    assert plans[-1].partition.bounds == tuple(range(0, 2049, 256))
    assert plans[3].partition.bounds == (0, 64, 128) and plans[4].partition.bounds == (0, 64, 128, 192, 256)
    text = describe_plan(plans)
    assert text.splitlines()[0] == "level 8: 2048 blocks on 8 rank(s), 256 blocks per rank"
    assert text.splitlines()[-1] == "level 1: 16 blocks on 1 rank(s), 16 blocks per rank"
    # every level on all ranks: the coarsest has 2 blocks per rank, chunks aligned by halving
    plans = plan_levels(blocks, 8, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [8] * 8
    for coarse, fine in zip(plans, plans[1:]):
        assert fine.partition.bounds == tuple(2 * b for b in coarse.partition.bounds)
    # edge cases: a level with fewer blocks than ranks, and uneven chunks
    plans = plan_levels([1, 2, 4, 8], 4, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [1, 1, 2, 4]
    assert plans[2].partition.bounds == (0, 2, 4) and plans[0].partition.bounds == (0, 1)
    plans = plan_levels([3, 6, 12], 5, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [3, 3, 5]
    assert all(b % 2 == 0 for b in plans[2].partition.bounds)
    with pytest.raises(ValueError, match=r"more ranks \(5\) than the finest level can use"):
        plan_levels([2, 4, 8], 5)
    with pytest.raises(ValueError, match="--min-blocks-per-rank 0"):
        plan_levels([2, 4], 2, min_blocks_per_rank=0)


def test_partition_is_balanced_and_aligned():
    assert partition_blocks(11, 4).bounds == (0, 2, 5, 8, 11)
    p = partition_blocks(2048, 8, align=128)
    assert p.bounds == tuple(range(0, 2049, 256))
    assert p.coarsened(128).bounds == tuple(range(0, 17, 2))
    with pytest.raises(ValueError, match=r"more ranks \(5\) than blocks \(4\)"):
        partition_blocks(4, 5)
    with pytest.raises(ValueError, match="at most 2 ranks"):
        partition_blocks(16, 4, align=8)
