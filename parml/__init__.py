"""parml: layer-parallel, multilevel training of deep residual networks."""

__version__ = "0.1.0"
