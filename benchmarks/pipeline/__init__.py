"""Pipeline scaling study (``benchmarks/pipeline_scaling.py``): records, rank code, analysis, render."""
