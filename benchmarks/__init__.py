"""parml's benchmarks: one harness (``benchmarks.harness``) and a script per study.

Run a study as ``python benchmarks/<study>.py [--quick] [--out DIR]``; results of the committed
runs live in ``benchmarks/results/<study>/``.
"""
