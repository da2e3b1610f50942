"""Options every study that trains dense ODE blocks shares with the ``parml`` command line."""
from __future__ import annotations

from parml.kernels import KERNELS


def add_kernel_option(ap) -> None:
    """``--kernel auto|torch|fused``: how the dense chunks run their forward and adjoint, as in
    ``parml --kernel`` (auto: fused where available, else torch)."""
    ap.add_argument("--kernel", choices=KERNELS, default="auto",
                    help="dense chunks' forward/adjoint, as parml --kernel (default auto: fused where available)")
