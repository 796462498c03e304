"""Federated learning methods, one module each; ``get_method`` finds one by its job name.

The registry is data (job name -> module and class) so a method module is imported only when
a job uses it, and adding a method is one line here plus its module.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

from confide.node.methods.base import (
    ClientUpdate,
    DecentralizedMethod,
    FederatedMethod,
    Method,
    MethodConfig,
    UpdateError,
    method_params,
)

REGISTRY: dict[str, str] = {
    "fedavg-lora": "confide.node.methods.fedavg_lora:FedAvgLoRA",
    "fedavg-full": "confide.node.methods.fedavg_full:FedAvgFull",
    "dp-lora": "confide.node.methods.dp_lora:DPLoRA",
    "cellm": "confide.node.methods.cellm:CELLM",
    "ferret": "confide.node.methods.ferret:Ferret",
    "sfprompt": "confide.node.methods.sfprompt:SFPrompt",
    "dimat": "confide.node.methods.dimat:DIMAT",
}


@cache
def get_method(name: str) -> Method:
    """The method registered under ``name``; ValueError listing the known ones otherwise."""
    target = REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    module_name, class_name = target.split(":")
    method = getattr(importlib.import_module(module_name), class_name)()
    if method.name != name:
        raise RuntimeError(f"{target} calls itself {method.name!r}, registered as {name!r}")
    return method


def known_methods() -> list[str]:
    """Registered methods whose module is present in this installation."""
    return [name for name, target in REGISTRY.items()
            if importlib.util.find_spec(target.split(":")[0]) is not None]


__all__ = [
    "REGISTRY",
    "ClientUpdate",
    "DecentralizedMethod",
    "FederatedMethod",
    "Method",
    "MethodConfig",
    "UpdateError",
    "get_method",
    "known_methods",
    "method_params",
]
