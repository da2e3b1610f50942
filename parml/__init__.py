"""parml: layer-parallel, multilevel (MG/OPT) training of deep residual networks.

The public names: the model (``ModelSpec``, ``StageSpec``, ``ODEResNet``, ``build_model``), the
hierarchy transfers, the V-cycle (``CycleSetup``, ``VCycle``), the layer-parallel wrapper
(``LayerParallel``), the communicator factory (``make_communicator``) and the trainer
(``TrainConfig``, ``train``).
"""

from .comm import make_communicator
from .config import TrainConfig
from .model import ModelSpec, ODEResNet, StageSpec, build_model
from .multilevel.hierarchy import level_specs, prolongate, restrict_gradient, restrict_parameters
from .multilevel.mgopt import CycleSetup, VCycle
from .parallel.executor import LayerParallel
from .training.trainer import train

__version__ = "0.1.0"

__all__ = ["CycleSetup", "LayerParallel", "ModelSpec", "ODEResNet", "StageSpec", "TrainConfig", "VCycle",
           "build_model", "level_specs", "make_communicator", "prolongate", "restrict_gradient",
           "restrict_parameters", "train", "__version__"]
