"""Federated learning methods, one module each; ``get_method`` finds one by its job name."""

from __future__ import annotations

from node.methods.base import (
    ClientUpdate,
    FederatedMethod,
    MethodConfig,
    UpdateError,
    method_params,
)
from node.methods.fedavg_lora import FedAvgLoRA

METHODS: dict[str, FederatedMethod] = {m.name: m for m in (FedAvgLoRA(),)}


def get_method(name: str) -> FederatedMethod:
    """The method registered under ``name``; ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


__all__ = [
    "METHODS",
    "ClientUpdate",
    "FederatedMethod",
    "MethodConfig",
    "UpdateError",
    "get_method",
    "method_params",
]
