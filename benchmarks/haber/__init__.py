"""Haber et al.'s resolution study (``benchmarks/haber_resolution.py``): records, outputs."""
