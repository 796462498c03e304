"""FedAvg with full-parameter local training: the "federated full fine-tuning" baseline.

Split learning (SFPrompt) and Ferret are measured against it: every node trains and sends every
parameter of the model, the coordinator averages the deltas weighted by example count
(McMahan et al., FedAvg), exactly as ``fedavg_lora`` does for adapters.
"""

from __future__ import annotations

from confide.node.methods.fedavg_lora import FedAvgLoRA


class FedAvgFull(FedAvgLoRA):
    name = "fedavg-full"
    trainable = "full"
