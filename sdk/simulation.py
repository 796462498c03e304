"""Many virtual nodes from Python: what ``confide simulate`` runs, as one call.

    from confide.sdk.simulation import simulate

    result = simulate(nodes=200, per_round=20, method="fedavg-lora", rounds=5, alpha=0.3,
                      base="minilm", max_steps=4)
    print(result.table())                      # the table `confide simulate` prints
    result.experiment.state, result.experiment.rounds, result.memory

The options are ``SimulationConfig``'s fields (the CLI's flags, with underscores); the work is
``confide.cluster.simulate.run_simulation``: a real coordinator process on 127.0.0.1 and the
virtual nodes on Ray actors (``backend="ray"``, the ``sim`` extra) or in this process
(``backend="local"``). Why a face in the SDK: a user's code imports the SDK, not the cluster
tooling, and gets a refusal of a bad option before any process starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from confide.cluster.simulate import (
    SimulationConfig,
    SimulationError,
    SimulationResult,
    check_config,
    run_simulation,
)

__all__ = ["SimulationConfig", "SimulationError", "SimulationResult", "simulate",
           "simulation_config"]

_FIELDS = tuple(f.name for f in dataclasses.fields(SimulationConfig))


def simulation_config(config: SimulationConfig | None = None, **options: Any
                      ) -> SimulationConfig:
    """``config`` (or the defaults) with ``options`` applied and checked: an unknown option is
    a TypeError that lists the known ones, a bad value a ValueError, both before any work."""
    unknown = sorted(set(options) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown simulation option(s): {', '.join(unknown)} (known: "
                        f"{', '.join(_FIELDS)})")
    cfg = dataclasses.replace(config or SimulationConfig(), **options)
    check_config(cfg)
    return cfg


def simulate(config: SimulationConfig | None = None, **options: Any) -> SimulationResult:
    """Run one simulation to its end and return its result: the job's state and reason, every
    round's participants, drops, loss, bytes and seconds, the held-out figures before and after
    (``result.experiment``), shard sizes, host and memory figures, the listeners. A job that
    fails is a result with ``ok`` False, not an exception; a simulation that cannot start
    raises ``SimulationError``."""
    return run_simulation(simulation_config(config, **options))
