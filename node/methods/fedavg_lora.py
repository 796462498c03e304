"""FedAvg-LoRA: the baseline every other federated method is measured against.

Algorithm (McMahan et al., FedAvg, applied to PEFT LoRA adapters):

1. The coordinator broadcasts the global adapter state (LoRA A/B matrices and the task head).
2. Each selected node loads it, trains locally for the configured epochs/steps and sends its
   delta ``local - global``, densely.
3. The coordinator sets ``global += sum_i n_i * delta_i / sum_i n_i`` (n_i: examples).

Note the known inexactness: averaging A and B separately is not averaging the products B @ A
that the model actually adds to its weights. The baseline keeps plain FedAvg on purpose (it is
what the literature compares against); exact variants belong to the methods that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from confide.node.methods.base import (
    ClientUpdate,
    FederatedMethod,
    MethodConfig,
    State,
    UpdateError,
    weighted_mean_of_deltas,
)
from confide.protos.codec import WireTensor, to_dense


@dataclass(frozen=True)
class FedAvgLoRAConfig(MethodConfig):
    """FedAvg-LoRA has no parameters of its own; LoRA rank etc. live in the model spec."""


class FedAvgLoRA(FederatedMethod):
    name = "fedavg-lora"
    config_class = FedAvgLoRAConfig

    def client_update(
        self,
        config: MethodConfig,
        global_state: State,
        local_state: State,
        memory: dict[str, torch.Tensor],
    ) -> dict[str, WireTensor]:
        return {name: local_state[name] - global_state[name] for name in global_state}

    def aggregate(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> State:
        if not updates:
            raise UpdateError("cannot aggregate a round without updates")
        deltas = [
            ({name: to_dense(value) for name, value in update.payload.items()},
             float(update.num_examples))
            for update in updates
        ]
        return weighted_mean_of_deltas(global_state, deltas)
