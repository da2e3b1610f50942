"""The data x layer mesh study (``benchmarks/mesh_scaling.py``): rank code, analysis, outputs."""
