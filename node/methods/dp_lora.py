"""DP-LoRA: differentially private federated LoRA, protecting one example or one node.

``unit`` says what one neighbouring dataset differs by:

* ``unit: "example"`` (the default): example-level DP-SGD at every node (Abadi et al. 2016).
  Node i with N_i examples trains with Poisson batches at q_i = min(1, B / N_i) (B =
  ``expected_batch_size``), per-example clipping to C and Gaussian noise sigma_i * C on the
  sum, for ``local_steps`` steps per round and ``rounds`` rounds; sigma_i is calibrated by the
  node from ``target_epsilon`` for its own q_i over all ``rounds * local_steps`` steps (or is
  the given ``noise_multiplier``). Each example lives on one node, so the nodes compose in
  parallel: the job's epsilon is the largest node's. The trained delta is sent as is
  (post-processing) and the coordinator averages it. The node, not the coordinator, enforces
  the budget: it charges the whole planned job to its privacy ledger before its first step and
  refuses a task that would cross its budget (``node/privacy_guard.py``). Options that spend
  the noise on fewer coordinates: ``train_only: "lora-b"`` (FFA-LoRA: A frozen at its random
  init, B and the head trained), ``"head"`` (the classifier only), and a smaller LoRA rank
  (the job's model spec). ``no_noise: true`` is the control (sampling and clipping, sigma 0):
  not private, so a node treats it as a non-private task.
* ``unit: "node"``: DP-FedAvg, as below (for many-node deployments).

The rest of this docstring is the node-level form.

Liu et al., "Differentially Private Low-Rank Adaptation of Large Language Model Using Federated
Learning" (arXiv 2312.17493), in the DP-FedAvg form of McMahan et al., "Learning Differentially
Private Recurrent Language Models" (ICLR 2018), as this module runs it:

    Job parameters: C = clip_norm, sigma = noise_multiplier (or target_epsilon + rounds, from
    which sigma is derived), delta, mode ("local", "central" or "distributed"), noise_seed
    (tests only).
    Trainable state w: the LoRA A and B matrices and the task head (``trainable = "lora"``).

    Coordinator, before round r (before_round):
        q = selected / registered nodes                                  (clamped to (0, 1])
        if target_epsilon > 0 and epsilon(sigma, q, steps=r, delta) > target_epsilon:
            stop the job cleanly, saying so                  (the privacy budget is spent)

    Node i (client_update), after local training moved w_{r-1} to w_i:
        1. Delta_i = w_i - w_{r-1}                           (all adapter tensors, one vector)
        2. Delta_i <- Delta_i * min(1, C / ||Delta_i||_2)              (clip to L2 norm C)
        3. local mode:   send Delta_i + N(0, sigma^2 C^2 I)  (the node never sends it unnoised)
           central mode: send Delta_i                  (clipped; noise comes once, at the sum)

    Coordinator (aggregate), over the n valid updates of the round:
        4. central mode: S = sum_i clip_C(Delta_i) + N(0, sigma^2 C^2 I)
                         (re-clipping is a no-op for honest nodes and enforces the bound)
           distributed:  S = the securely aggregated sum of the nodes' Delta_i, each rounded
                         and noised in the ring with N_Z(0, sigma^2 D^2 / t) at its node
                         (privacy.secagg.distributed_dp; the coordinator adds nothing)
           local mode:   S = sum_i Delta_i                     (each already carries noise)
        5. w_r = w_{r-1} + S / n                                         (unweighted mean)

    Coordinator, after round r (round_metrics):
        epsilon = epsilon(sigma, q, steps=r, delta), plus sigma, C, delta, q;
        local mode also epsilon_local (below).

Privacy unit and accounting. The protected unit is one node (all of its data): neighbouring
jobs differ by adding or removing one node. A node's clipped update moves the sum by at most C
(its sensitivity), the noise has std sigma * C, so each round is the sampled Gaussian mechanism
with noise multiplier sigma and sampling rate q, one step per round. Google's dp-accounting
(``privacy.dp.RdpAccountant``, RDP over dp-accounting's default orders) turns (sigma, q, rounds,
delta) into epsilon. The coordinator may restart, so nothing is remembered between rounds:
epsilon after round r is computed from r and this round's q as if every round so far had used
the same q and sigma. That holds when nodes_per_round and the registered population do not
change during the job (the common case: every node in every round, q = 1); if q changes, the
report is only as good as that assumption. A round that ran but was not committed before a
restart runs again under the same number and is counted once (only committed global states are
released).

Caveats the numbers rest on (read before quoting an epsilon below q = 1):

* Amplification by sampling assumes Poisson sampling of every registered node with probability
  q, secret from the adversary. The coordinator instead draws a fixed-size sample of the
  *online* nodes from a seed in the job spec and names the selected nodes in its round events;
  q = selected / registered is the usual approximation (as Opacus and TF Privacy treat shuffled
  fixed-size batches), and the amplified epsilon holds only against a party that sees the global
  models but not the selection. With q = 1 (every node, every round) none of this matters.
* Dividing by n (step 5) is post-processing only because n is public and fixed by the
  coordinator's selection; DP-FedAvg's strict form under Poisson sampling divides by the
  expected count q * N instead.
* Local mode: ``epsilon`` bounds what the released global models reveal (the sum carries n
  noise draws, more than central mode's one, so the central figure is an upper bound). Against
  the coordinator, which sees every node's own update, a node has only local DP:
  ``epsilon_local`` = the Gaussian mechanism with sensitivity 2C (sigma / 2 effective), no
  amplification, composed over r rounds (a node in every round). It is reported, not enforced:
  ``target_epsilon`` applies to ``epsilon``.
* Noise comes from torch's generator seeded by ``os.urandom`` (``noise_seed = -1``): an
  unpredictable seed, not a CSPRNG nor a discrete Gaussian (see ``privacy.dp``). With
  ``noise_seed >= 0`` the noise can be replayed and removed: for tests only, never private.

Why the aggregation is unweighted. FedAvg-LoRA weights node i by its example count n_i. Here
the weights are fixed (1/n each) because DP-FedAvg's sensitivity argument needs them to be: with
weights n_i / sum_j n_j one node's influence on the mean is C * n_i / sum_j n_j, unbounded in
n_i (a node reporting a million examples dominates, and removing it shifts the other weights), so
the bound C on the sum that the noise is calibrated to no longer bounds the release; and the
example counts themselves would be released without noise. Equal weights keep each node's
contribution to S at most C, and num_examples is ignored.

What is aggregated (the LoRA A/B trap). Like FedAvg-LoRA, this method averages the adapter
tensors separately: the new A is the mean of the nodes' A, the new B the mean of their B, and the
head likewise, all clipped and noised together as one vector. The model however adds B @ A to
its frozen weights, and mean(B_i) @ mean(A_i) != mean(B_i @ A_i): the difference is the
cross-covariance of the nodes' factors, which grows with client drift (non-IID data, many local
steps), on top of which the noise on A multiplies B and vice versa. It is kept on purpose: the
DP-LoRA paper noises and shares the A and B factors too, the FedAvg-LoRA baseline averages them
the same way (so the comparison isolates DP), it keeps the uplink at adapter size,
and the clipping/noise of the factors is what the accountant covers. Exact alternatives change
what is clipped and noised (FedEx-LoRA's residual B @ A term is a full d x k matrix per layer;
stacking grows the rank every round), so they belong to a separate, measured variant.
Measured once (tiny BERT, 4,226 adapter parameters, 3 label-skewed nodes, 20 local steps,
no clipping or noise, 3 rounds): mean(B_i) @ mean(A_i) misses 32-61% of mean(B_i @ A_i) - B @ A
per layer (relative Frobenius error), so the inexactness is real; but at sigma = 1, C = 1 and
n = 3 the noise on the mean update has norm ~22 (central) or ~38 (local) against a signal of at
most C = 1, so at DP noise levels the noise dominates it. Its cost in accuracy is for the
benchmark to show (not measured here).

Utility, in one line: the signal is at most C, the noise on the mean has norm about
sigma * C * sqrt(d) / n in central mode and sigma * C * sqrt(d / n) in local mode (d = adapter
parameters, n = nodes per round). Node-level DP pays off
with many nodes per round (DP-FedAvg used thousands); with a handful of nodes, single-digit
epsilons drown the update.

Rounds and a target epsilon. The method cannot see the job's round count (only its own
parameters reach it, at the node as at the coordinator), and the node must know sigma to add
local noise. So a target is given with the number of rounds it is planned for:
``target_epsilon`` plus ``rounds`` R derives sigma as the smallest multiplier with
epsilon(sigma, q=1, R, delta) <= target_epsilon (dp-accounting's calibration, cached), a pure
function of the parameters that node and coordinator compute identically. Calibrating at q = 1
is conservative: amplification (q < 1) can only spend less, and q is known only at the
coordinator, per round. The job then runs all R rounds; if it is longer, it stops cleanly when
the next round would exceed the target. With ``noise_multiplier`` given, ``target_epsilon`` is
a pure budget (stop when spent) and ``rounds`` must be left 0.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from confide.node.methods.base import (
    ClientUpdate,
    FederatedMethod,
    MethodConfig,
    State,
    UpdateError,
)
from confide.privacy.dp import (
    RdpAccountant,
    SampledGaussian,
    clip_by_global_norm,
    gaussian_noise_like,
    secure_generator,
)
from confide.protos.codec import WireTensor, to_dense

MODES = ("local", "central", "distributed")
UNITS = ("example", "node")
TRAIN_ONLY = ("all", "lora-b", "head")

_ACCOUNTANT = RdpAccountant()


@dataclass(frozen=True)
class DPLoRAConfig(MethodConfig):
    """DP-LoRA's job parameters.

    ``clip_norm`` C: L2 bound on each node's adapter update (all tensors as one vector).
    ``noise_multiplier`` sigma: noise std is sigma * C; 0 means derive it from
    ``target_epsilon`` and ``rounds``. ``target_epsilon``: the budget; 0 means no budget (then
    sigma is required). ``delta``: the delta epsilon is reported at. ``mode``: "local" (each node
    noises its own update), "central" (the coordinator noises the sum once) or "distributed"
    (each node adds its share of the sum's noise inside secure aggregation: the coordinator
    sees only the noised sum; needs ``secure_aggregation``). ``rounds``: the rounds a target is
    calibrated for (only with sigma = 0).
    ``noise_seed``: -1 for unpredictable noise; >= 0 replays the noise (tests only, no privacy).
    """

    unit: str = "example"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    mode: str = "local"
    rounds: int = 0
    noise_seed: int = -1
    expected_batch_size: int = 64
    local_steps: int = 10
    train_only: str = "all"
    no_noise: bool = False


@dataclass(frozen=True)
class ExamplePlan:
    """What one node runs for an example-level job: its q, its sigma and the whole job's
    accounting event (``rounds * local_steps`` Poisson-sampled Gaussian steps)."""

    sample_rate: float
    noise_multiplier: float
    local_steps: int
    rounds: int
    clip_norm: float
    train_only: str
    delta: float

    @property
    def event(self) -> SampledGaussian | None:
        """The ledger's charge for the whole job; None for the no-noise control (not DP)."""
        if self.noise_multiplier <= 0:
            return None
        return SampledGaussian(self.noise_multiplier, self.sample_rate,
                               self.rounds * self.local_steps)

    def epsilon_after(self, round_number: int) -> float:
        """epsilon this node has spent on the job after ``round_number`` rounds."""
        if self.noise_multiplier <= 0:
            return math.inf
        return _ACCOUNTANT.epsilon(self.noise_multiplier, self.sample_rate,
                                   round_number * self.local_steps, self.delta)


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, rounds: int) -> float:
    return _ACCOUNTANT.noise_multiplier_for(target_epsilon, delta, sampling_rate=1.0, steps=rounds)


@functools.lru_cache(maxsize=256)
def _calibrated_example(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    return _ACCOUNTANT.noise_multiplier_for(target_epsilon, delta, sampling_rate=q, steps=steps)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"confide-dp-lora")
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def _tensor_bytes(state: State) -> bytes:
    return b"".join(
        name.encode()
        + t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, t in sorted(state.items())
    )


def _replayable_generator(seed: int, *parts: bytes) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_digest(str(seed).encode(), *parts))
    return generator


def sampling_rate(population: int, selected: int) -> float:
    """q = selected / population, clamped to (0, 1] (1 when either count is unknown)."""
    if population <= 0 or selected <= 0:
        return 1.0
    return min(1.0, selected / population)


class DPLoRA(FederatedMethod):
    name = "dp-lora"
    config_class = DPLoRAConfig

    # ------------------------------------------------------------------ parameters

    def validate_config(self, config: MethodConfig) -> None:
        assert isinstance(config, DPLoRAConfig)
        if config.unit not in UNITS:
            raise ValueError(
                f"dp-lora: unit must be one of {', '.join(UNITS)}, got {config.unit!r}"
            )
        for field in ("clip_norm", "noise_multiplier", "target_epsilon", "delta"):
            value = getattr(config, field)
            if not _is_number(value):
                raise ValueError(f"dp-lora: {field} must be a finite number, got {value!r}")
        if config.clip_norm <= 0:
            raise ValueError(f"dp-lora: clip_norm (C) must be > 0, got {config.clip_norm}")
        if config.unit == "example":
            self._validate_example(config)
            return
        if config.noise_multiplier < 0:
            raise ValueError(
                f"dp-lora: noise_multiplier (sigma) must be >= 0, got {config.noise_multiplier}"
            )
        if config.target_epsilon < 0:
            raise ValueError(f"dp-lora: target_epsilon must be >= 0, got {config.target_epsilon}")
        if not 0 < config.delta < 1:
            raise ValueError(f"dp-lora: delta must be in (0, 1), got {config.delta}")
        if config.mode not in MODES:
            raise ValueError(
                f"dp-lora: mode must be one of {', '.join(MODES)}, got {config.mode!r}"
            )
        if config.noise_seed < -1:
            raise ValueError(
                f"dp-lora: noise_seed must be -1 (random noise) or >= 0 (tests), "
                f"got {config.noise_seed}"
            )
        if config.rounds < 0:
            raise ValueError(f"dp-lora: rounds must be >= 0, got {config.rounds}")
        if config.noise_multiplier == 0 and config.target_epsilon == 0:
            raise ValueError(
                "dp-lora: a noise level is required: set noise_multiplier (sigma > 0), or "
                "target_epsilon (> 0) with rounds to derive sigma from"
            )
        if config.noise_multiplier == 0:
            if config.rounds < 1:
                raise ValueError(
                    "dp-lora: target_epsilon without noise_multiplier needs rounds (>= 1): the "
                    "number of rounds the budget is calibrated for (usually the job's rounds)"
                )
            self.noise_multiplier(config)  # an unreachable target fails at submission
        elif config.rounds:
            raise ValueError(
                "dp-lora: rounds only calibrates sigma from target_epsilon; with "
                "noise_multiplier given it has no effect, leave it 0"
            )

    def _validate_example(self, config: DPLoRAConfig) -> None:
        if config.noise_multiplier < 0 or config.target_epsilon < 0:
            raise ValueError("dp-lora: noise_multiplier and target_epsilon must be >= 0")
        if not 0 < config.delta < 1:
            raise ValueError(f"dp-lora: delta must be in (0, 1), got {config.delta}")
        for field in ("rounds", "expected_batch_size", "local_steps"):
            value = getattr(config, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"dp-lora: {field} must be an integer >= 1 with unit 'example' (the node "
                    f"charges the whole planned job to its budget up front), got {value!r}"
                )
        if config.train_only not in TRAIN_ONLY:
            raise ValueError(
                f"dp-lora: train_only must be one of {', '.join(TRAIN_ONLY)}, "
                f"got {config.train_only!r}"
            )
        if not isinstance(config.no_noise, bool):
            raise ValueError(f"dp-lora: no_noise must be true or false, got {config.no_noise!r}")
        noise_given = config.noise_multiplier > 0 or config.target_epsilon > 0
        if config.no_noise and noise_given:
            raise ValueError("dp-lora: no_noise (the control) takes no noise_multiplier or "
                             "target_epsilon")
        if not config.no_noise and not noise_given:
            raise ValueError(
                "dp-lora: a noise level is required: target_epsilon (each node calibrates its "
                "sigma for its own sampling rate) or noise_multiplier; no_noise: true is the "
                "non-private control"
            )
        if config.noise_multiplier > 0 and config.target_epsilon > 0:
            raise ValueError("dp-lora: give target_epsilon or noise_multiplier, not both")
        if config.target_epsilon > 0:
            # the strictest node (q = 1) must be able to reach the target
            _calibrated_example(float(config.target_epsilon), float(config.delta), 1.0,
                                config.rounds * config.local_steps)

    def example_plan(self, config: DPLoRAConfig, n_examples: int) -> ExamplePlan:
        """A node's plan for an example-level job over its ``n_examples`` examples:
        q = min(1, B / N), sigma calibrated for that q over the whole job (or the given one)."""
        if n_examples < 1:
            raise ValueError("dp-lora: this node has no example to train on")
        q = min(1.0, config.expected_batch_size / n_examples)
        steps = config.rounds * config.local_steps
        if config.no_noise:
            sigma = 0.0
        elif config.noise_multiplier > 0:
            sigma = float(config.noise_multiplier)
        else:
            sigma = _calibrated_example(float(config.target_epsilon), float(config.delta), q,
                                        steps)
        return ExamplePlan(q, sigma, config.local_steps, config.rounds, float(config.clip_norm),
                           config.train_only, float(config.delta))

    def noise_multiplier(self, config: DPLoRAConfig) -> float:
        """sigma: the configured one, or the smallest that keeps epsilon <= target_epsilon
        over ``rounds`` rounds at q = 1 (see the module docstring)."""
        if config.noise_multiplier > 0:
            return float(config.noise_multiplier)
        return _calibrated(float(config.target_epsilon), float(config.delta), int(config.rounds))

    # ------------------------------------------------------------------ node side

    def client_update(
        self,
        config: MethodConfig,
        global_state: State,
        local_state: State,
        memory: dict[str, torch.Tensor],
    ) -> dict[str, WireTensor]:
        assert isinstance(config, DPLoRAConfig)
        # 1. the update, as one vector over every adapter tensor (subtracted in float64, sent
        #    in the state's dtype)
        delta = {
            name: (local_state[name].to(torch.float64) - global_state[name].to(torch.float64)).to(
                global_state[name].dtype
            )
            for name in global_state
        }
        if config.unit == "example":
            return delta  # DP-SGD made the training private: the delta is post-processing
        # 2. clip to L2 norm C (in the wire dtype, so rounding cannot lift the norm above C)
        clipped, _norm = clip_by_global_norm(delta, config.clip_norm)
        if config.mode in ("central", "distributed"):
            # 3. central: the coordinator adds the noise, once, to the sum; distributed: the
            # node adds its share in the ring while masking (node/secagg.py), never unmasked
            return clipped
        # 3. local: the node adds N(0, sigma^2 C^2) itself and never sends the clean update
        std = self.noise_multiplier(config) * config.clip_norm
        noise = gaussian_noise_like(clipped, std, self._node_generator(config, clipped))
        return {
            name: (clipped[name].to(torch.float64) + noise[name].to(torch.float64)).to(
                clipped[name].dtype
            )
            for name in global_state
        }

    @staticmethod
    def _node_generator(config: DPLoRAConfig, clipped: State) -> torch.Generator:
        if config.noise_seed < 0:
            return secure_generator()
        # replayable (tests): different per node and per round through the update's bytes
        return _replayable_generator(config.noise_seed, b"node", _tensor_bytes(clipped))

    # ------------------------------------------------------------------ coordinator side

    def aggregate(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> State:
        assert isinstance(config, DPLoRAConfig)
        if not updates:
            raise UpdateError("cannot aggregate a round without updates")
        # 4. the sum of the nodes' updates (num_examples is ignored: fixed weights)
        total = {
            name: torch.zeros(v.shape, dtype=torch.float64) for name, v in global_state.items()
        }
        if config.mode == "distributed" and len(updates) != 1:
            raise UpdateError("dp-lora mode 'distributed' is aggregated securely: one update "
                              "with the noised mean, never the nodes' own")
        for update in updates:
            delta = {
                name: to_dense(update.payload[name]).to(torch.float64) for name in global_state
            }
            if config.mode == "central":
                delta, _norm = clip_by_global_norm(delta, config.clip_norm)
            for name in total:
                total[name] += delta[name]
        if config.mode == "central":
            std = self.noise_multiplier(config) * config.clip_norm
            noise = gaussian_noise_like(
                total, std, self.coordinator_generator(config, round_number)
            )
            total = {name: total[name] + noise[name] for name in total}
        # 5. w_r = w_{r-1} + S / n
        n = len(updates)
        return {
            name: (value.to(torch.float64) + total[name] / n).to(value.dtype)
            for name, value in global_state.items()
        }

    @staticmethod
    def coordinator_generator(config: DPLoRAConfig, round_number: int) -> torch.Generator:
        """The generator of central mode's noise in ``round_number``: unpredictable, or
        replayable from ``noise_seed`` (tests)."""
        if config.noise_seed < 0:
            return secure_generator()
        return _replayable_generator(config.noise_seed, b"coordinator", str(round_number).encode())

    def epsilon(
        self, config: DPLoRAConfig, round_number: int, population: int, selected: int
    ) -> float:
        """epsilon spent after ``round_number`` rounds at this round's q (constant-q
        assumption, see the module docstring)."""
        return _ACCOUNTANT.epsilon(
            self.noise_multiplier(config),
            sampling_rate(population, selected),
            round_number,
            config.delta,
        )

    def before_round(
        self, config: MethodConfig, round_number: int, population: int, selected: int
    ) -> str | None:
        assert isinstance(config, DPLoRAConfig)
        if config.unit == "example":
            if round_number > config.rounds:  # the nodes charged exactly `rounds` rounds
                return (f"the nodes' privacy budgets were charged for {config.rounds} rounds "
                        f"(dp-lora rounds); round {round_number} would exceed them")
            return None
        if config.target_epsilon <= 0:
            return None
        after = self.epsilon(config, round_number, population, selected)
        if after > config.target_epsilon:
            return (
                f"privacy budget epsilon={config.target_epsilon:g} at delta={config.delta:g} "
                f"would be exceeded: after round {round_number} epsilon would be {after:.4g} "
                f"(sigma={self.noise_multiplier(config):.4g}, "
                f"q={sampling_rate(population, selected):.4g})"
            )
        return None

    def round_metrics(
        self, config: MethodConfig, round_number: int, population: int, selected: int
    ) -> dict[str, float]:
        assert isinstance(config, DPLoRAConfig)
        if config.unit == "example":
            # each node reports its own epsilon, sigma and q with its update; the round's
            # epsilon is their maximum (parallel composition: coordinator/job.py)
            return {"delta": float(config.delta), "clip_norm": float(config.clip_norm)}
        sigma = self.noise_multiplier(config)
        metrics = {
            "epsilon": self.epsilon(config, round_number, population, selected),
            "delta": float(config.delta),
            "noise_multiplier": sigma,
            "clip_norm": float(config.clip_norm),
            "sampling_rate": sampling_rate(population, selected),
        }
        if config.mode == "local":
            metrics["epsilon_local"] = _ACCOUNTANT.local_epsilon(sigma, round_number, config.delta)
        return metrics
