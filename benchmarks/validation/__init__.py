"""The scaling model against measurement (``benchmarks/plan_validation.py``): rank code, analysis, outputs."""
