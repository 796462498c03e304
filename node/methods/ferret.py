"""Ferret: federated full-parameter tuning with shared randomness.

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models"
(arXiv 2409.06277, reference code allen4747/Ferret; its shared-seed idea comes from FedKSeed,
Qin et al., arXiv 2312.06353), as this module runs it:

    Job parameters: k (directions per group), estimator ("reference" or "projection"),
    direction_clip, exact_max, adaptive, seed, server_lr.
    Trainable state w: every floating parameter of the model (``trainable = "full"``).

    Groups (fixed for a job; every party derives them from the state's names and shapes):
        walk the tensors in sorted name order and pack consecutive ones into a group until
        the next would take it past floor(0.9 x median tensor size); a tensor larger than that
        is a group of its own; the task head's tensors (classifier / score) form the last
        group. Group g, flattened, has d_g elements and K_g = min(k, d_g) directions. The head
        group and every group of at most ``exact_max`` elements are *exact*: sent as the dense
        delta (the head of a MiniLM classifier is 7.7 KB). On the wire a group is named
        "group:0007".

    Shared randomness of a round (nobody chooses it):
        nu = BLAKE2b(names, dtypes, shapes and bytes of w_{r-1}), the global state the
        coordinator broadcast, so it is fresh every round and tied to the job's weights.
        Direction j of group g is v_{g,j} in R^{d_g}, drawn in chunks of 2^16 elements; chunk c
        comes from a CPU torch.Generator seeded with (H(seed, nu, g) + j * chunks_g + c) mod 2^32
        as float32 uniforms sent through the inverse CDF of a standard normal truncated to
        [-1/sqrt(d_g), 1/sqrt(d_g)] (the reference's truncation), in float64, rounded to float32.
        Generated on the CPU whatever the node trains on: CPU and CUDA nodes and the
        coordinator get the same bits. The wire carries only the direction ids j; the seeds
        behind them follow from nu, which the node cannot choose.

    Node i (client_update), after local training moved w_{r-1} to w_i:
        1. for each group g: delta_g = w_i[g] - w_{r-1}[g]                       (flattened)
        2.   n_g = K_g, or with ``adaptive`` the reference's rule
                 n_g = clip(floor(k * |delta_g| / max_h |delta_h|), min(2, K_g), K_g)
        3.   V_g = the first n_g directions, and n_g scalars a_g:
               estimator "reference" (the paper's, unbiased): c_j = <delta_g, v_j>, clipped to
                 +-direction_clip when that is > 0, then a_j = c_j / (n_g s_g^2), s_g^2 the
                 variance of a direction's entry, so E[V_g^T a_g] = delta_g (for unclipped c)
               estimator "projection": a_g = argmin_a |delta_g - V_g^T a|^2
                                             = (V_g V_g^T)^{-1} V_g delta_g
             an exact group sends delta_g itself
        4. send, per group, the direction ids 0..n_g-1 and a_g as float32 (exact groups: the
           dense float32 delta), plus the first 8 bytes of nu as the round tag.

    Coordinator (check_update, aggregate):
        5. drop an update whose round tag is not this round's nu, or whose groups, direction
           ids, counts, shapes or generator differ from what nu and the config prescribe, or
           whose scalars are not finite
        6. abar_g = sum_i n_i a_{i,g} / sum_i n_i  (n_i: node i's examples; a_{i,g} padded
           with zeros to the longest n_g, which is exact: the ids are a shared prefix; an
           exact group's mean delta likewise)
        7. w_r[g] = w_{r-1}[g] + server_lr * V_g^T abar_g, V_g regenerated from the same seeds
           (an exact group: w_{r-1}[g] + its mean delta, FedAvg's step).

Estimators. "reference" is the paper's: unbiased, so a round's step is the nodes' mean update
in expectation, at the price of variance (its norm is about sqrt(d_g / n_g) times |delta_g|: a
147k-element matrix at 24 directions, ~80x), which the paper tames with the server learning
rate and per-direction clipping. Its scale 1 / (n_g s_g^2) uses the exact variance of the
truncated normal entries (about 1 / (3 d_g): they are bounded by 1/sqrt(d_g)), so the estimate
is unbiased for these directions. The node needs only inner products, direction by direction
(no Gram matrix), so k may go to :data:`MAX_K`.

"projection" (the default until the benchmark shows the reference estimator ahead on MiniLM:
on the tiny test model it learned less in 3 rounds): a_g are least-squares coordinates;
V_g^T a_g is the orthogonal projection of delta_g onto the span of the round's directions (the
Gram matrix V_g V_g^T orthogonalises). It is never longer than delta_g and always points along
it (<P delta, delta> = |P delta|^2 >= 0), and exact when n_g = d_g, but its steps on big groups
are short (E|P delta|^2 = n_g/d_g |delta|^2: 24 directions keep 1.6e-4 of a 384 x 384 matrix),
which is why it learned little on MiniLM. The node pays a Gram matrix (n_g^2 d_g flops; k up
to :data:`MAX_K_PROJECTION`). Either way reconstruction is a plain sum of directions,
elementwise and bit-reproducible, and ``server_lr`` scales it.

Server momentum. The reference keeps momentum on its seed pool: its K candidate seeds are drawn
once per job, so the same directions recur every round and a buffer of K scalars per group is
exact momentum. Here the directions are fresh every round (derived from the round's state) and
``aggregate`` is pure (the coordinator keeps no method state between rounds), so momentum would
need a full-size buffer carried from round to round by the coordinator, as ``memory`` is at a
node. It is not offered; the reference's published run script uses momentum 0.0 as well.

Cost. Node and coordinator each draw sum_g n_g d_g truncated normals per round, about k times
the parameter count: for MiniLM at k = 24, 545M draws, ~8 s for ``client_update`` and ~5 s for
``aggregate`` on one CPU core.

Wire. Per group: the name, n_g direction ids (one varint byte each below 128), n_g float32
scalars, the flattened shape and the generator name; plus the 8-byte round tag. For
all-MiniLM-L6-v2 (22.7M parameters, 105 groups) at the default k = 24 that is about 16 KB per
node per round (``tests/unit/test_ferret.py`` measures it). The downlink is the same: the
coordinator broadcasts the mean scalars abar (``aggregate_compact``) and each node that holds
w_{r-1} rebuilds w_r from the seeds (``apply_compact``), checked against the state's digest;
a node without w_{r-1} (it sat the last round out, or restarted) gets the whole state. The
first round's w_0 is the seeded initial state, which every node builds itself.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from confide.node.methods.base import (
    ClientUpdate,
    FederatedMethod,
    MethodConfig,
    State,
    UpdateError,
)
from confide.node.methods.head import is_head_parameter
from confide.protos.codec import SeedProjectedTensor, WireTensor
from confide.protos.state import state_digest as base_state_digest

GENERATOR = "ferret-tn1"
"""The direction generator's name on the wire (truncated normal, chunks of ``CHUNK``)."""

ROUND_KEY = "ferret:round"
"""Payload entry holding the first 8 bytes of the global state's digest (uint8[8])."""

GROUP_FACTOR = 0.9
"""A group fills up to this fraction of the median tensor size (the reference's rule). Fixed, not
a job parameter: the coordinator must derive the groups before it sees any config."""

CHUNK = 1 << 16
"""Elements per independently seeded piece of a direction (part of the generator's definition):
bounds the memory of a k x CHUNK block of directions, even for huge groups and k = MAX_K."""

MAX_K = 4096
"""Most directions per group a job may ask for (the paper's largest); the projection estimator
keeps its k x k Gram matrix and k x CHUNK block to :data:`MAX_K_PROJECTION`."""

MAX_K_PROJECTION = 1024

ESTIMATORS = ("reference", "projection")

MAX_EXACT = 1 << 22
"""Largest ``exact_max`` a job may set (4M elements: a group that large sent dense defeats the
method; fedavg-full exists for that)."""

_DOMAIN = b"confide/ferret/v1"


@dataclass(frozen=True)
class FerretConfig(MethodConfig):
    """Ferret's job parameters.

    ``k``: directions per parameter group (at most the group's size); with ``adaptive``, the
    most a group gets. ``estimator``: "reference" (the paper's unbiased estimate) or
    "projection" (least squares on the directions). ``direction_clip``: bound on each inner
    product <delta, v_j> (reference estimator; 0: none). ``exact_max``: groups of at most this
    many elements go dense, exactly (the task head always does). ``adaptive``: the reference's
    per-group counts, proportional to the group's update norm (at least 2). ``seed``: salt of
    the shared randomness, mixed with each round's state digest. ``server_lr``: scale of the
    reconstructed mean update (projected groups; exact groups take FedAvg's step).
    """

    k: int = 24
    estimator: str = "projection"
    direction_clip: float = 0.0
    exact_max: int = 0
    adaptive: bool = False
    seed: int = 0
    server_lr: float = 1.0


@dataclass(frozen=True)
class Group:
    """Consecutive tensors (sorted names) updated through one set of directions."""

    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...]
    head: bool = False

    @property
    def key(self) -> str:
        return group_key(self.index)

    @property
    def size(self) -> int:
        return sum(self.numels)

    @property
    def bound(self) -> float:
        """Truncation of the directions' entries: +-1/sqrt(d_g), as in the reference."""
        return 1.0 / math.sqrt(self.size)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.size / CHUNK))

    def directions(self, k: int) -> int:
        """K_g: the directions this group gets for a job parameter ``k``."""
        return min(k, self.size)

    def exact(self, config: FerretConfig) -> bool:
        """Sent as its dense delta: the task head, or a group of at most ``exact_max``."""
        return self.head or self.size <= config.exact_max

    def entries(self, config: FerretConfig) -> int:
        """What the group puts on the wire: its size (exact) or its direction count."""
        return self.size if self.exact(config) else self.directions(config.k)

    @property
    def entry_variance(self) -> float:
        """Variance of a direction's entry: a standard normal truncated to +-bound."""
        a = self.bound
        return 1.0 - a * math.sqrt(2.0 / math.pi) * math.exp(-a * a / 2.0) / math.erf(
            a / math.sqrt(2.0))

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[name].detach().reshape(-1) for name in self.names])


def group_key(index: int) -> str:
    return f"group:{index:04d}"


def group_parameters(state: Mapping[str, torch.Tensor]) -> list[Group]:
    """The parameter groups of a trainable state, from its names and shapes only.

    Sorted names, then the reference's greedy packing: a group takes tensors until the next
    would take it past ``GROUP_FACTOR`` x the median tensor size; a tensor at least that big
    stands alone. The task head's tensors (``node.methods.head``) form one last group, sent
    exactly. Empty tensors belong to no group. Every party computes the same groups from the
    same state.
    """
    names = sorted(state)
    if not names:
        raise UpdateError("the global state is empty: nothing to train")
    for name in names:
        if not state[name].dtype.is_floating_point:
            raise UpdateError(
                f"Ferret trains floating tensors only; {name!r} is {state[name].dtype}"
            )
    names = [name for name in names if state[name].numel() > 0]  # nothing to update
    if not names:
        raise UpdateError("every tensor of the global state is empty: nothing to train")
    body = [name for name in names if not is_head_parameter(name)]
    head = [name for name in names if is_head_parameter(name)] if body else []
    names = body or names  # a state of head tensors only is grouped like any other
    numels = [state[name].numel() for name in names]
    ordered = sorted(numels)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    target = max(1, int(GROUP_FACTOR * median))
    groups: list[Group] = []
    current: list[str] = []
    filled = 0

    def close() -> None:
        groups.append(
            Group(
                index=len(groups),
                names=tuple(current),
                shapes=tuple(tuple(state[n].shape) for n in current),
                numels=tuple(state[n].numel() for n in current),
            )
        )

    for name, numel in zip(names, numels, strict=True):
        if current and filled + numel > target:
            close()
            current, filled = [], 0
        current.append(name)
        filled += numel
    close()
    if head:  # the task head: one exact group, last
        groups.append(Group(index=len(groups), names=tuple(head),
                            shapes=tuple(tuple(state[n].shape) for n in head),
                            numels=tuple(state[n].numel() for n in head), head=True))
    return groups


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """The global state's digest under Ferret's domain: what makes a round's randomness fresh,
    and what a node's round tag must match."""
    return base_state_digest(state, person=b"confide-ferret")


def round_tag(digest: bytes) -> torch.Tensor:
    return torch.tensor(list(digest[:8]), dtype=torch.uint8, device="cpu")


def group_seed(salt: int, digest: bytes, index: int) -> int:
    """The base generator seed of one group in one round (32 bits: torch's CPU generator
    seeds its Mersenne Twister from 32 bits)."""
    material = _DOMAIN + struct.pack("<QQ", salt, index) + digest
    return int.from_bytes(hashlib.blake2b(material, digest_size=4).digest(), "little")


def direction_chunk(seed: int, length: int, bound: float) -> torch.Tensor:
    """``length`` float32 draws of a standard normal truncated to [-bound, bound].

    CPU generator, float32 uniforms (exact multiples of 2^-24), then the inverse CDF in
    float64: u -> sqrt(2) * erfinv((2u - 1) * erf(bound / sqrt(2))). Independent of the device
    the caller trains on; identical in every process for the same arguments.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    u = torch.empty(length, dtype=torch.float32, device="cpu")
    u.uniform_(0.0, 1.0, generator=generator)
    y = u.to(torch.float64).mul_(2.0).sub_(1.0).mul_(math.erf(bound / math.sqrt(2.0)))
    x = torch.special.erfinv(y).mul_(math.sqrt(2.0))
    return x.to(torch.float32).clamp_(-bound, bound)


def _chunk_seed(base: int, group: Group, direction: int, chunk: int) -> int:
    return (base + direction * group.chunks + chunk) % (1 << 32)


def _chunk_bounds(group: Group) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK, group.size)) for start in range(0, group.size, CHUNK)]


def group_directions(group: Group, base: int, count: int) -> torch.Tensor:
    """The first ``count`` directions of a group as a (count, d_g) float32 matrix (for tests
    and small groups; the method itself works chunk by chunk)."""
    out = torch.empty(count, group.size, dtype=torch.float32, device="cpu")
    for c, (start, stop) in enumerate(_chunk_bounds(group)):
        for j in range(count):
            out[j, start:stop] = direction_chunk(
                _chunk_seed(base, group, j, c), stop - start, group.bound
            )
    return out


def project(group: Group, base: int, count: int, delta: torch.Tensor) -> torch.Tensor:
    """Least-squares coordinates (float64, ``count``) of a flattened group update on the
    group's first ``count`` directions: (V V^T)^{-1} V delta, V built chunk by chunk."""
    gram = torch.zeros(count, count, dtype=torch.float64, device="cpu")
    rhs = torch.zeros(count, dtype=torch.float64, device="cpu")
    delta = delta.detach().to("cpu", torch.float64)
    for c, (start, stop) in enumerate(_chunk_bounds(group)):
        block = torch.empty(count, stop - start, dtype=torch.float64, device="cpu")
        for j in range(count):
            block[j] = direction_chunk(_chunk_seed(base, group, j, c), stop - start, group.bound)
        gram += block @ block.T
        rhs += block @ delta[start:stop]
    try:
        return torch.linalg.solve(gram, rhs)
    except RuntimeError:  # numerically singular (repeated directions): minimum-norm solution
        return torch.linalg.pinv(gram, hermitian=True) @ rhs


def inner_products(group: Group, base: int, count: int, delta: torch.Tensor) -> torch.Tensor:
    """<delta, v_j> (float64, ``count``) for the group's first ``count`` directions, chunk by
    chunk and direction by direction: memory of one chunk, whatever ``count``."""
    out = torch.zeros(count, dtype=torch.float64, device="cpu")
    delta = delta.detach().to("cpu", torch.float64)
    for c, (start, stop) in enumerate(_chunk_bounds(group)):
        piece = delta[start:stop]
        for j in range(count):
            v = direction_chunk(_chunk_seed(base, group, j, c), stop - start, group.bound)
            out[j] += torch.dot(v.to(torch.float64), piece)
    return out


def reference_coefficients(group: Group, base: int, count: int, delta: torch.Tensor,
                           clip: float = 0.0) -> torch.Tensor:
    """The paper's unbiased estimate's scalars: <delta, v_j> clipped to +-``clip`` (when > 0)
    and scaled by 1 / (count * s_g^2), so that E[sum_j a_j v_j] = delta (unclipped)."""
    products = inner_products(group, base, count, delta)
    if clip > 0:
        products = products.clamp(-clip, clip)
    return products / (count * group.entry_variance)


def reconstruct(group: Group, base: int, coefficients: Sequence[float]) -> torch.Tensor:
    """sum_j coefficients[j] * v_j as a flat float64 tensor.

    Only elementwise products and sums in a fixed order (no BLAS, no reductions): the same bits
    on any machine that regenerates the same directions.
    """
    out = torch.zeros(group.size, dtype=torch.float64, device="cpu")
    for c, (start, stop) in enumerate(_chunk_bounds(group)):
        piece = out[start:stop]
        for j, coefficient in enumerate(coefficients):
            if coefficient == 0.0:
                continue
            v = direction_chunk(_chunk_seed(base, group, j, c), stop - start, group.bound)
            piece.add_(v.to(torch.float64).mul_(float(coefficient)))
    return out


class Ferret(FederatedMethod):
    name = "ferret"
    config_class = FerretConfig
    trainable = "full"

    def validate_config(self, config: MethodConfig) -> None:
        assert isinstance(config, FerretConfig)
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"ferret: estimator must be one of {', '.join(ESTIMATORS)}, got "
                             f"{config.estimator!r}")
        most = MAX_K if config.estimator == "reference" else MAX_K_PROJECTION
        if isinstance(config.k, bool) or not isinstance(config.k, int) or not 1 <= config.k <= most:
            raise ValueError(f"ferret: k must be an integer in [1, {most}] with the "
                             f"{config.estimator} estimator, got {config.k!r}")
        clip = config.direction_clip
        if (isinstance(clip, bool) or not isinstance(clip, int | float)
                or not (math.isfinite(clip) and clip >= 0)):
            raise ValueError(f"ferret: direction_clip must be a finite number >= 0 (0: no "
                             f"clipping), got {clip!r}")
        if (isinstance(config.exact_max, bool) or not isinstance(config.exact_max, int)
                or not 0 <= config.exact_max <= MAX_EXACT):
            raise ValueError(f"ferret: exact_max must be an integer in [0, {MAX_EXACT}], got "
                             f"{config.exact_max!r}")
        if not isinstance(config.adaptive, bool):
            raise ValueError(f"ferret: adaptive must be true or false, got {config.adaptive!r}")
        if not isinstance(config.seed, int) or not 0 <= config.seed < 1 << 63:
            raise ValueError(f"ferret: seed must be an integer in [0, 2^63), got {config.seed!r}")
        lr = config.server_lr
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (math.isfinite(lr) and lr > 0)
        ):
            raise ValueError(f"ferret: server_lr must be a finite number > 0, got {lr!r}")

    # ---------------------------------------------------------------- node side

    def client_update(
        self,
        config: MethodConfig,
        global_state: State,
        local_state: State,
        memory: dict[str, torch.Tensor],
    ) -> dict[str, WireTensor]:
        assert isinstance(config, FerretConfig)
        differ = sorted(set(global_state) ^ set(local_state))
        if differ:
            raise ValueError(f"local and global states differ in tensors {differ[:5]}")
        digest = state_digest(global_state)
        groups = group_parameters(global_state)
        deltas = [
            group.flatten(local_state).to(torch.float64)
            - group.flatten(global_state).to(torch.float64)
            for group in groups
        ]
        counts = self._counts(config, groups, deltas)
        payload: dict[str, WireTensor] = {ROUND_KEY: round_tag(digest)}
        for group, delta, count in zip(groups, deltas, counts, strict=True):
            if group.exact(config):  # the head and small groups: the delta itself
                payload[group.key] = delta.to(torch.float32)
                continue
            base = group_seed(config.seed, digest, group.index)
            if config.estimator == "reference":
                coefficients = reference_coefficients(group, base, count, delta,
                                                      float(config.direction_clip))
            else:
                coefficients = project(group, base, count, delta)
            payload[group.key] = SeedProjectedTensor(
                shape=(group.size,),
                dtype=torch.float32,
                seeds=tuple(range(count)),
                coefficients=tuple(coefficients.tolist()),
                generator=GENERATOR,
            )
        return payload

    @staticmethod
    def _counts(
        config: FerretConfig, groups: Sequence[Group], deltas: Sequence[torch.Tensor]
    ) -> list[int]:
        caps = [group.directions(config.k) for group in groups]
        if not config.adaptive:
            return caps
        norms = [float(delta.norm()) for delta in deltas]
        finite = [n for n in norms if math.isfinite(n)]
        largest = max(finite, default=0.0)
        counts = []
        for cap, norm in zip(caps, norms, strict=True):
            share = norm / largest if largest > 0 and math.isfinite(norm) else 0.0
            counts.append(max(min(2, cap), min(cap, int(share * config.k))))
        return counts

    # ---------------------------------------------------------------- coordinator side

    def check_update(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> None:
        """Reject an update that does not fit this round: names are groups (not parameters),
        the round tag must be this global state's, every group's direction ids must be
        0..n-1 with n what the config allows, shapes and the generator must match, and the
        scalars must be finite."""
        assert isinstance(config, FerretConfig)
        self._check(group_parameters(global_state), state_digest(global_state), payload, config)

    @staticmethod
    def _check(
        groups: Sequence[Group],
        digest: bytes,
        payload: Mapping[str, WireTensor],
        config: FerretConfig,
    ) -> None:
        expected = {group.key for group in groups} | {ROUND_KEY}
        missing = sorted(expected - set(payload))
        extra = sorted(set(payload) - expected)
        if missing or extra:
            raise UpdateError(
                f"update does not match this job's parameter groups: missing "
                f"{missing[:5]}, unexpected {extra[:5]}"
            )
        tag = payload[ROUND_KEY]
        if (
            not isinstance(tag, torch.Tensor)
            or tag.dtype != torch.uint8
            or tuple(tag.shape) != (8,)
            or not torch.equal(tag, round_tag(digest))
        ):
            raise UpdateError(
                f"{ROUND_KEY!r} does not name this round's global state: the update was "
                "computed from another state (a stale or foreign round), so its directions "
                "are not this round's"
            )
        for group in groups:
            value = payload[group.key]
            what = f"{group.key} ({group.names[0]}{', ...' if len(group.names) > 1 else ''})"
            if group.exact(config):
                if (not isinstance(value, torch.Tensor) or value.dtype != torch.float32
                        or tuple(value.shape) != (group.size,)):
                    raise UpdateError(f"{what} is sent exactly: a dense float32 tensor of "
                                      f"shape ({group.size},)")
                if not bool(torch.isfinite(value).all()):
                    raise UpdateError(f"{what} holds NaN or infinity")
                continue
            if not isinstance(value, SeedProjectedTensor):
                raise UpdateError(f"{what} must be seed-projected, got {type(value).__name__}")
            if value.generator != GENERATOR:
                raise UpdateError(
                    f"{what} uses generator {value.generator!r}, expected {GENERATOR!r}"
                )
            if tuple(value.shape) != (group.size,) or value.dtype != torch.float32:
                raise UpdateError(
                    f"{what} declares {value.dtype} {tuple(value.shape)}, expected "
                    f"torch.float32 ({group.size},)"
                )
            count = len(value.seeds)
            cap = group.directions(config.k)
            low = min(2, cap) if config.adaptive else cap
            if not low <= count <= cap:
                raise UpdateError(
                    f"{what} carries {count} coefficients, this job expects "
                    + (f"{cap}" if low == cap else f"{low} to {cap}")
                )
            if value.seeds != tuple(range(count)):
                raise UpdateError(
                    f"{what} seeds must be this round's direction ids 0..{count - 1}"
                    f", got {list(value.seeds[:5])}..."
                )
            if not all(math.isfinite(c) for c in value.coefficients):
                raise UpdateError(f"{what} has a NaN or infinite coefficient")

    def aggregate(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> State:
        return self.aggregate_compact(config, global_state, updates, round_number)[0]

    def aggregate_compact(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> tuple[State, dict[str, WireTensor]]:
        """Steps 5-7: the mean scalars of the updates (each passed ``check_update``; the
        compact broadcast: every party rebuilds the step from the same seeds) and the state
        they lead to."""
        assert isinstance(config, FerretConfig)
        if not updates:
            raise UpdateError("cannot aggregate a round without updates")
        digest = state_digest(global_state)
        groups = group_parameters(global_state)
        total = float(sum(update.num_examples for update in updates))
        if total <= 0:
            raise UpdateError("no update carries a positive weight (all nodes reported 0 examples)")
        mean_payload: dict[str, WireTensor] = {ROUND_KEY: round_tag(digest)}
        for group in groups:
            if group.exact(config):
                dense = torch.zeros(group.size, dtype=torch.float64)
                for update in updates:
                    dense += (update.num_examples / total) * update.payload[group.key].to(
                        torch.float64)
                mean_payload[group.key] = dense.to(torch.float32)
                continue
            mean = [0.0] * max(len(u.payload[group.key].seeds) for u in updates)
            for update in updates:
                weight = update.num_examples / total
                for j, c in enumerate(update.payload[group.key].coefficients):
                    mean[j] += weight * c
            mean_payload[group.key] = SeedProjectedTensor(
                shape=(group.size,),
                dtype=torch.float32,
                seeds=tuple(range(len(mean))),
                coefficients=tuple(mean),
                generator=GENERATOR,
            )
        return self._step(config, global_state, groups, digest, mean_payload), mean_payload

    def apply_compact(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> State:
        """A node rebuilds the round's global state from the previous one and the mean scalars
        the coordinator broadcast (checked like an update: this round's tag, groups, counts)."""
        assert isinstance(config, FerretConfig)
        digest = state_digest(global_state)
        groups = group_parameters(global_state)
        self._check(groups, digest, payload, config)
        return self._step(config, global_state, groups, digest, payload)

    @staticmethod
    def _step(
        config: FerretConfig,
        global_state: State,
        groups: Sequence[Group],
        digest: bytes,
        mean_payload: Mapping[str, WireTensor],
    ) -> State:
        """w_r[g] = w_{r-1}[g] + server_lr * V_g^T abar_g, in float64, elementwise (the same bits
        at the coordinator and at every node)."""
        result: State = dict(global_state)
        for group in groups:
            if group.exact(config):  # FedAvg's step: the mean delta itself
                step = mean_payload[group.key].to(torch.float64)
            else:
                mean = mean_payload[group.key].coefficients
                if not any(mean):
                    continue
                base = group_seed(config.seed, digest, group.index)
                step = reconstruct(group, base, mean).mul_(float(config.server_lr))
            offset = 0
            for name, shape, numel in zip(group.names, group.shapes, group.numels, strict=True):
                old = global_state[name]
                piece = step[offset : offset + numel].reshape(shape)
                result[name] = old.to(torch.float64, copy=True).add_(piece).to(old.dtype)
                offset += numel
        return result
