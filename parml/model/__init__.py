"""ODE ResNets as plain ``nn.Module``s: the architecture (spec), steppers, blocks and the network.

No communication and no pipeline machinery lives here; layer parallelism cuts a model into
shards from outside (``parml.parallel``), and fused kernels attach to its block chunks
(``parml.kernels``).
"""
from .blocks import BlockChunk, ConvBlockChunk
from .network import ODEResNet, build_model, tikhonov
from .spec import HEADS, INITS, NORMS, PROJECTIONS, STAGE_KINDS, ModelSpec, StageSpec
from .steppers import ACTIVATIONS, STEPPERS, register_stepper

__all__ = ["ACTIVATIONS", "HEADS", "INITS", "NORMS", "PROJECTIONS", "STAGE_KINDS", "STEPPERS", "BlockChunk",
           "ConvBlockChunk", "ModelSpec", "ODEResNet", "StageSpec", "build_model", "register_stepper", "tikhonov"]
