"""The interface every federated learning method implements.

A method is split the way its paper's algorithm box is: what a node does with the global
state it received (``client_update``: turn local training into the bytes it sends), and the
pure aggregation the coordinator runs over the nodes' updates (``aggregate``). Both sides are
pure functions of tensors and a config, so the coordinator can import them without importing
any node daemon internals, and tests can run them without processes.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from google.protobuf import json_format

from confide.protos.codec import SeedProjectedTensor, SparseTensor, WireTensor

State = dict[str, torch.Tensor]


def method_params(spec) -> dict[str, Any]:
    """The job's method parameters (a ``google.protobuf.Struct``) as a plain dict."""
    if not spec.HasField("method_params"):
        return {}
    return json_format.MessageToDict(spec.method_params)


class UpdateError(ValueError):
    """A node's update does not fit the global state (names, shapes, encodings)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One node's contribution to a round, as it arrived on the wire."""

    node_id: str
    payload: Mapping[str, WireTensor]
    num_examples: int


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; subclasses add their own fields with defaults."""


class Method(ABC):
    """What every learning method has: a job name, a config parsed from the job's parameters,
    and the kind of parameters local training updates."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: which parameters local training updates: "lora" (adapters + task head), "full", or
    #: "sfprompt" (soft prompts + tail of a split model)
    trainable: ClassVar[str] = "lora"
    #: the coordinator pairs the round's nodes with a split-server node (split learning)
    needs_split_server: ClassVar[bool] = False
    #: models travel between peers only; the coordinator runs no aggregation (DIMAT)
    decentralized: ClassVar[bool] = False

    def parse_config(self, params: Mapping[str, Any] | None) -> MethodConfig:
        """Build the method's config from job parameters; unknown keys are an error."""
        params = dict(params or {})
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; "
                f"its parameters are: {known}"
            )
        converted = {}
        for key, value in params.items():
            default = fields[key].default
            # Struct numbers arrive as floats: give ints back their type.
            if isinstance(default, int) and not isinstance(default, bool):
                if float(value) != int(value):
                    raise ValueError(f"parameter {key!r} of {self.name!r} must be an integer")
                value = int(value)
            converted[key] = value
        config = self.config_class(**converted)
        self.validate_config(config)
        return config

    def validate_config(self, config: MethodConfig) -> None:
        """Raise ValueError for parameter values that make no sense (none by default)."""
        return None


class FederatedMethod(Method):
    """A federated learning method: node-side update encoding plus pure aggregation."""

    @abstractmethod
    def client_update(
        self,
        config: MethodConfig,
        global_state: State,
        local_state: State,
        memory: dict[str, torch.Tensor],
    ) -> dict[str, WireTensor]:
        """Node side: what to send after local training moved ``global_state`` to
        ``local_state``. ``memory`` persists at the node between rounds of one job
        (e.g. error-feedback residuals) and never leaves it."""

    @abstractmethod
    def aggregate(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> State:
        """Coordinator side, pure: the next global state from the current one and the
        nodes' updates."""

    def aggregate_compact(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> tuple[State, dict[str, WireTensor] | None]:
        """Coordinator side: ``aggregate``, plus a compact form of it that nodes holding
        ``global_state`` turn into the result through ``apply_compact``, sent instead of the
        whole state (Ferret: the mean scalars); None: broadcast the whole state."""
        return self.aggregate(config, global_state, updates, round_number), None

    def apply_compact(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> State:
        """Node side: the new global state from the previous one and the coordinator's compact
        broadcast, bit for bit what ``aggregate_compact`` returned."""
        raise UpdateError(f"method {self.name!r} has no compact broadcast")

    def keeps_node_states(self, config: MethodConfig) -> bool:
        """Whether the coordinator should keep, per node, the state that node trains from
        (the base of ``node_downlink``); False by default (it keeps only digests)."""
        return False

    def node_downlink(
        self, config: MethodConfig, global_state: State, held: State
    ) -> tuple[dict[str, WireTensor], State] | None:
        """Coordinator side, per node (when ``keeps_node_states``): for a node that holds
        ``held`` (the state it trained from in its last round, digest-checked), a payload
        cheaper than the whole ``global_state``, and the state the node rebuilds from it with
        ``apply_compact`` (bit for bit). That state may differ from ``global_state``: the node
        then trains from, and measures its update against, what it holds (CELLM's sparse
        downlink). None: the whole state goes down."""
        return None

    def before_round(self, config: MethodConfig, round_number: int, population: int,
                     selected: int) -> str | None:
        """Coordinator side, before a round runs: a reason to end the job cleanly instead
        (e.g. the privacy budget would be exceeded), or None to go on. ``population`` is the
        number of registered nodes, ``selected`` the number this round would use."""
        return None

    def round_metrics(self, config: MethodConfig, round_number: int, population: int,
                      selected: int) -> dict[str, float]:
        """Coordinator side, after a round: figures to report with it (e.g. epsilon spent
        so far). Merged into the round's metrics and its ``round.completed`` event."""
        return {}

    def check_update(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> None:
        """Coordinator side, the one validation of an update: raise ``UpdateError`` for one
        that does not fit this job and round (here: names, shapes, finite float values;
        methods add their own rules). The coordinator calls it once, before the node counts
        as a participant, so ``aggregate`` can trust every update it is given and one bad
        node can neither poison nor crash the aggregation."""
        missing = sorted(set(global_state) - set(payload))
        extra = sorted(set(payload) - set(global_state))
        if missing or extra:
            raise UpdateError(
                f"update does not match the global state: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, value in payload.items():
            expected = tuple(global_state[name].shape)
            shape = tuple(value.shape)
            if shape != expected:
                raise UpdateError(f"tensor {name!r} has shape {shape}, expected {expected}")
            if isinstance(value, SeedProjectedTensor):
                continue  # scalars only; the method regenerates the directions
            values = value.values if isinstance(value, SparseTensor) else value
            if not values.dtype.is_floating_point:
                raise UpdateError(f"tensor {name!r} must be floating point, got {values.dtype}")
            if not torch.isfinite(values).all():
                raise UpdateError(f"tensor {name!r} contains NaN or infinity")


class DecentralizedMethod(Method):
    """A method with no coordinator in the data path: each round every node trains its own
    model, then merges it with its neighbours' models fetched peer to peer (the pure merge
    lives in the method's module). The coordinator only schedules the rounds and publishes
    who the neighbours are."""

    decentralized: ClassVar[bool] = True


def weighted_mean_of_deltas(global_state: State, deltas: Sequence[tuple[State, float]]) -> State:
    """global + sum_i w_i * delta_i / sum_i w_i, computed in float64 for stability."""
    total = sum(weight for _, weight in deltas)
    if total <= 0:
        raise UpdateError("no update carries a positive weight (all nodes reported 0 examples)")
    result: State = {}
    for name, value in global_state.items():
        acc = torch.zeros(value.shape, dtype=torch.float64)
        for delta, weight in deltas:
            acc += delta[name].to(torch.float64) * (weight / total)
        result[name] = (value.to(torch.float64) + acc).to(value.dtype)
    return result
