"""Layouts: block partitions (balanced, aligned), the per-level rank plans of agglomeration and the
redundant coarse levels of the mesh."""
import pytest

from parml.parallel.layout import (LayoutError, describe_mesh, describe_plan, partition_blocks, plan_levels,
                                   plan_mesh)


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


def test_redundant_coarse_levels_run_the_whole_batch_on_every_replica():
    """--coarse-layout redundant: the levels with fewer than min-blocks-per-rank blocks per rank on P
    layer ranks (also at P = 1, where gather and replicate change nothing) are placed as replicate
    places them and take the whole batch, so they need no more samples than micro-batches; the
    finest level always splits its batch."""
    lv = plan_mesh([32, 64, 128, 256], 2, data_parallel=2, min_blocks_per_rank=64, coarse_layout="redundant").levels
    assert [(v.ranks, v.replicas, v.stride, v.redundant, v.shares) for v in lv] == \
        [(1, 2, 1, True, 1), (1, 2, 1, False, 2), (1, 2, 1, False, 2), (1, 2, 1, False, 2)]
    # P = 2: the coarsest level (16 blocks < 16 x 2) on 1 layer rank x 4 replicas, the rest split over D = 2
    lv = plan_mesh([16, 32, 64], 4, data_parallel=2, min_blocks_per_rank=16, coarse_layout="redundant",
                   batch=2).levels
    assert [(v.ranks, v.replicas, v.stride, v.redundant) for v in lv] == \
        [(1, 4, 1, True), (2, 2, 2, False), (2, 2, 2, False)]
    with pytest.raises(LayoutError, match="level 1 runs on 4 replicas with --coarse-layout replicate"):
        plan_mesh([16, 32, 64], 4, data_parallel=2, min_blocks_per_rank=16, coarse_layout="replicate", batch=2)
    # the finest level is never redundant, even with fewer blocks than the threshold
    lv = plan_mesh([8, 16], 2, data_parallel=2, min_blocks_per_rank=64, coarse_layout="redundant").levels
    assert [v.redundant for v in lv] == [True, False]
    assert "level 1: 8 blocks on 1 layer rank(s) x 2 replica(s), 8 blocks per rank; redundant" in \
        describe_mesh(plan_mesh([8, 16], 2, 2, 64, "redundant"))
    # with the default threshold nothing is redundant at P = 1 on these sizes: the plan says so
    assert "--coarse-layout redundant changes nothing here" in describe_mesh(plan_mesh([16, 32], 2, 2, 16, "redundant"))
    assert "changes nothing" not in describe_mesh(plan_mesh([8, 16], 2, 2, 64, "redundant"))
