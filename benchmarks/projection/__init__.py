"""Projections to 1,024 ranks (``benchmarks/scaling_projection.py``): the sweep, its summary, outputs."""
