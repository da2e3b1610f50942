"""Independent serial references for the tests, written from the papers with plain torch only.

Nothing here imports parml: the ODE-ResNet is a step-by-step loop (no fused chunk, no executor),
the transfers are written from their definitions (R is the transpose of an explicit matrix), and
MG/OPT is Algorithm 1 of Gaedke-Merzhäuser et al. with plain GD (Algorithm 3). Parameters are dicts
keyed like parml's state dict ("opening.weight", "chunks.{s}.weight", "chunks.{s}.bias",
"projections.{s}.weight", "head.weight", "head.bias"), so results compare name by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as tf

SIGMA = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def is_block(name: str) -> bool:
    return name.startswith("chunks.")


def stages(params: dict) -> int:
    return sum(1 for n in params if n.startswith("chunks.") and n.endswith(".weight"))


# --- the network (paper eq. 3-8) ---------------------------------------------------------------------

def forward(params: dict, x: torch.Tensor, T: float = 1.0, activation: str = "tanh") -> torch.Tensor:
    """y_0 = Q x; per stage (after its projection) y_{k+1} = y_k + h σ(W_k y_k + b_k), h = T/K_s; head."""
    sigma = SIGMA[activation]
    y = x @ params["opening.weight"].T
    for s in range(stages(params)):
        if s > 0:
            y = y @ params[f"projections.{s}.weight"].T
        W, b = params[f"chunks.{s}.weight"], params[f"chunks.{s}.bias"]
        h = T / W.shape[0]
        for k in range(W.shape[0]):
            y = y + h * sigma(y @ W[k].T + b[k])
    return y @ params["head.weight"].T + params["head.bias"]


def objective(params: dict, x, y, beta: float = 0.0, block_weight: float = 1.0, T: float = 1.0,
              activation: str = "tanh") -> torch.Tensor:
    """Mean cross-entropy + β (w Σ_k ‖θ_k‖² + ‖θ_shared‖²)."""
    loss = tf.cross_entropy(forward(params, x, T, activation), y)
    if beta:
        reg = sum((block_weight if is_block(n) else 1.0) * p.square().sum() for n, p in params.items())
        loss = loss + beta * reg
    return loss


def value_and_grad(params: dict, x, y, **kw) -> tuple[float, dict]:
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    loss = objective(leaves, x, y, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return float(loss.detach()), dict(zip(leaves, grads))


# --- transfers in time (dim 0 of block tensors) --------------------------------------------------------

def prolong_rows(c: torch.Tensor, interpolation: str) -> torch.Tensor:
    """constant: fine 2j, 2j+1 <- c_j; linear: fine 2j <- c_j, 2j+1 <- (c_j + c_{j+1})/2, c_J := c_{J-1}."""
    if interpolation == "constant":
        return c.repeat_interleave(2, dim=0)
    J = c.shape[0]
    out = c.new_empty((2 * J, *c.shape[1:]))
    for j in range(J):
        out[2 * j] = c[j]
        out[2 * j + 1] = (c[j] + c[min(j + 1, J - 1)]) / 2
    return out


def prolongation_matrix(coarse_rows: int, interpolation: str, dtype=torch.float64) -> torch.Tensor:
    """I as an explicit [2J, J] matrix (its columns are the prolongated unit vectors)."""
    return prolong_rows(torch.eye(coarse_rows, dtype=dtype), interpolation)


def prolong(coarse: dict, interpolation: str) -> dict:
    return {n: prolong_rows(t, interpolation) if is_block(n) else t.clone() for n, t in coarse.items()}


def restrict_grad(fine: dict, interpolation: str) -> dict:
    """R = Iᵀ, applied as the transpose of the explicit matrix."""
    out = {}
    for n, g in fine.items():
        if is_block(n):
            P = prolongation_matrix(g.shape[0] // 2, interpolation, g.dtype)
            out[n] = torch.einsum("fc,f...->c...", P, g)
        else:
            out[n] = g.clone()
    return out


def restrict_params(fine: dict, interpolation: str) -> dict:
    """parml's left inverse of I: the mean of each pair (constant), injection of even rows (linear)."""
    def rows(f):
        return (f[0::2] + f[1::2]) / 2 if interpolation == "constant" else f[0::2].clone()
    return {n: rows(t) if is_block(n) else t.clone() for n, t in fine.items()}


def axpy(a: dict, alpha: float, b: dict) -> dict:
    return {n: a[n] + alpha * b[n] for n in a}


def cosine_lr(lr_max: float, lr_min: float, steps: int, i: int) -> float:
    """Cosine annealing (Chang et al.), restarted per stage."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * min(i, steps) / steps))


# --- MG/OPT (Algorithm 1) with GD on every level (Algorithm 3) -----------------------------------------

class MGOPT:
    """Levels i = 0 (coarsest) .. L-1 (finest), K_i = K / 2^(L-1-i) blocks, h_i = T / K_i.

    `steps`: (pre, post) per non-coarsest level, finest first; `coarsest`: steps on level 1.
    Tikhonov weight w_i = h_i ("l2") or 2^(L-1-i) ("euclidean"); "l2" divides block gradients by h_i
    in the step. `work` counts gradient evaluations in fine-gradient units, K_i / K (eq. 10).
    """

    def __init__(self, K, steps, coarsest, interpolation="constant", metric="l2", lr=0.1, beta=1e-3,
                 T=1.0, activation="tanh"):
        self.L = len(steps) + 1
        self.K, self.steps, self.coarsest = K, list(steps), coarsest
        self.interpolation, self.metric, self.lr, self.beta = interpolation, metric, lr, beta
        self.T, self.activation = T, activation
        self.work = 0.0
        self.final = [None] * self.L          # each level's parameters at the end of its last visit

    def blocks(self, i):
        return self.K >> (self.L - 1 - i)

    def h(self, i):
        return self.T / self.blocks(i)

    def grad(self, i, theta, batch):
        self.work += self.blocks(i) / self.K
        w = self.h(i) if self.metric == "l2" else 2.0 ** (self.L - 1 - i)
        return value_and_grad(theta, *batch, beta=self.beta, block_weight=w, T=self.T,
                              activation=self.activation)[1]

    def smooth(self, i, theta, dg, n, batch, g0=None):
        """n GD steps on H^i = L^i + <δg, θ>; g0 = ∇L^i(theta) if already evaluated (the δg one)."""
        for s in range(n):
            g = g0 if (s == 0 and g0 is not None) else self.grad(i, theta, batch)
            gH = axpy(g, 1.0, dg) if dg is not None else g
            scale = {n_: (1 / self.h(i) if self.metric == "l2" and is_block(n_) else 1.0) for n_ in theta}
            theta = {n_: theta[n_] - self.lr * scale[n_] * gH[n_] for n_ in theta}
        return theta

    def cycle(self, theta, batch, i=None, dg=None, g0=None):
        """One V-cycle from level i (default finest) at theta, with coupling term dg (None = 0)."""
        i = self.L - 1 if i is None else i
        if i == 0:
            self.final[0] = self.smooth(0, theta, dg, self.coarsest, batch, g0)
            return self.final[0]
        pre, post = self.steps[self.L - 1 - i]
        theta = self.smooth(i, theta, dg, pre, batch, g0)
        g = g0 if (pre == 0 and g0 is not None) else self.grad(i, theta, batch)
        gH = axpy(g, 1.0, dg) if dg is not None else g                    # ∇H^i at θ^{i,μ1}
        c0 = restrict_params(theta, self.interpolation)                   # θ^{i-1,0}
        gc0 = self.grad(i - 1, c0, batch)                                 # ∇L^{i-1}(θ^{i-1,0})
        dg_c = axpy(restrict_grad(gH, self.interpolation), -1.0, gc0)     # eq. (9)
        c = self.cycle(c0, batch, i - 1, dg_c, gc0)
        theta = axpy(theta, 1.0, prolong(axpy(c, -1.0, c0), self.interpolation))
        self.final[i] = self.smooth(i, theta, dg, post, batch)
        return self.final[i]

    def loss(self, theta, batch) -> float:
        """The finest objective L^L (what a cycle reports at its start)."""
        w = self.h(self.L - 1) if self.metric == "l2" else 1.0
        with torch.no_grad():
            return float(objective(theta, *batch, beta=self.beta, block_weight=w, T=self.T,
                                   activation=self.activation))


def eq10(steps, coarsest) -> float:
    """U_c = 2^(1-L) μ^1 + Σ_{l=2..L} (μ1^l + μ2^l + 1) 2^(l-L) (paper eq. 10); steps finest first."""
    L = len(steps) + 1
    return coarsest * 2.0 ** (1 - L) + sum((a + b + 1) * 2.0 ** (lev - L)
                                           for lev, (a, b) in zip(range(L, 1, -1), steps))
