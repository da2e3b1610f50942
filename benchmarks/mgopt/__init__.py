"""MG/OPT scaling study (``benchmarks/mgopt_scaling.py``): records, rank code, analysis, render."""
