"""Activations and time steppers: one small class per stepper (a torchdiffeq-style registry)."""
from __future__ import annotations

import torch

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


STEPPERS: dict[str, type] = {}


def register_stepper(name):
    def wrap(cls):
        cls.name = name
        STEPPERS[name] = cls
        return cls
    return wrap


@register_stepper("euler")
class Euler:
    """Forward Euler, y + h F(y): the plain ResNet block (paper eq. 5)."""

    @staticmethod
    def step(f, y, h):
        return torch.add(y, f(y), alpha=h)


@register_stepper("rk2")
class RK2:
    """Midpoint RK2 with one parameter set per step (Zang): k1 = F(y), k2 = F(y + h/2 k1)."""

    @staticmethod
    def step(f, y, h):
        k1 = f(y)
        return torch.add(y, f(torch.add(y, k1, alpha=h / 2)), alpha=h)


def choose(kind, name, table):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]
