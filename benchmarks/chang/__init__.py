"""Chang et al.'s multilevel training study (``benchmarks/chang_multilevel.py``): records, outputs."""
