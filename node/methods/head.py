"""Which trainable tensors are the task head (classifier / score), by name.

Full-parameter methods treat the head apart from the pretrained body: it starts fresh, so it
wants its own learning rate (``TrainSpec.head_learning_rate``), and it is small, so Ferret
sends it exactly. A pure module: the coordinator needs it (through Ferret) without a model.
"""

from __future__ import annotations

__all__ = ["HEAD_MODULES", "is_head_parameter"]

#: module names of a classification or LM task head (node/models.py builds these heads)
HEAD_MODULES = ("pre_classifier", "classifier", "score")


def is_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to the task head (a path component names a head module)."""
    return any(part in HEAD_MODULES for part in name.split("."))
