"""What the test session's fork server loads once, so that each gloo rank it forks starts in
milliseconds instead of importing torch, torch._dynamo and parml and loading the compiled kernels
again (~3-5 s of CPU per rank on 2 cores). On one thread the kernels start no thread pool, and
importing starts no thread either, so forking stays safe. The test session itself calls
``warm_kernels`` first (tests/conftest.py)."""
import os

import torch

import parml.training.trainer  # noqa: F401  (imports the model, executor, multilevel and comm packages)
from parml.comm import SelfComm
from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.executor import LayerParallel


def warm_kernels(first: int = 0) -> None:
    """Compile the fused CPU kernels (or load them from numba's cache) for both dtypes, inline and
    deferred weight gradients. A first compile takes ~15-20 s per dtype: inside a test whose ranks
    are threads under a 10 s message timeout (the NCCL model) it would look like a hung peer, and
    ranks started together in a fresh clone would each compile the same code at once.
    ``first``: which dtype to start with; the test workers start with different ones, so in a fresh
    clone each compiles one and loads the other from the cache the other worker wrote."""
    spec = ModelSpec(2, 2, (StageSpec(3, 4),))
    dtypes = (torch.float32, torch.float64)
    for dtype in dtypes[first % 2:] + dtypes[:first % 2]:
        x, y = torch.randn(8, 2, dtype=dtype), torch.randint(0, 2, (8,))
        for weight_grads in ("deferred", "inline"):
            lp = LayerParallel(build_model(spec, seed=0, dtype=dtype), SelfComm(), "gpipe", 1,
                               weight_grads=weight_grads, kernel="auto")
            lp.forward_backward(x, y)
            lp.evaluate(x, y)


def warm_imports() -> None:
    """What a training rank imports lazily, once per process: torch's optimizers (the momentum and
    adam level optimizers) import torch._dynamo on their first construction (~2 s of CPU), rank 0's
    run plot matplotlib (~0.5 s).
    In the fork server each forked rank inherits them."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    from matplotlib.figure import Figure  # noqa: F401


if os.environ.get("PARML_TEST_FORK_SERVER") == "1":     # set only while tests/multiproc.py starts it
    warm_kernels()
    warm_imports()
