"""Ferret's pure parts (grouping, shared-seed directions, projection, aggregation, update
checks) and the full-parameter trainer it needs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from confide.node.methods import ClientUpdate, UpdateError, get_method
from confide.node.methods.ferret import (
    CHUNK,
    GENERATOR,
    MAX_K,
    ROUND_KEY,
    FerretConfig,
    direction_chunk,
    group_directions,
    group_parameters,
    group_seed,
    project,
    reconstruct,
    reference_coefficients,
    round_tag,
    state_digest,
)
from confide.node.models import ModelConfig, adapter_for, job_model_config
from confide.node.training.lora import LoraTrainer
from confide.protos.codec import (
    SeedProjectedTensor,
    tensor_map_from_bytes,
    tensor_map_to_bytes,
    wire_size,
)
from confide.sdk.client import job_spec

ROOT = Path(__file__).resolve().parents[2]
FERRET = get_method("ferret")


def _state(seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=g) for name, n in sizes.items()}


def _moved(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _structural_payload(state: dict[str, torch.Tensor], k: int) -> dict:
    """What a node sends, with placeholder scalars: float32 scalars and ids are fixed-width on
    the wire, so this has the byte size of a real update without computing one (exact groups,
    the head: their dense float32 delta)."""
    payload = {ROUND_KEY: round_tag(bytes(32))}
    config = FerretConfig(k=k)
    for group in group_parameters(state):
        if group.exact(config):
            payload[group.key] = torch.full((group.size,), 0.5)
            continue
        n = group.directions(k)
        payload[group.key] = SeedProjectedTensor(
            (group.size,), torch.float32, tuple(range(n)), (0.5,) * n, GENERATOR
        )
    return payload


# ------------------------------------------------------------------------------ grouping


def test_grouping_follows_the_median_rule_and_depends_only_on_names_and_shapes():
    sizes = dict(a=2, b=3, c=4, d=50, e=60, f=1, g=1)  # median 3 -> groups fill up to 2
    groups = group_parameters(_state(0, **sizes))
    assert [g.names for g in groups] == [("a",), ("b",), ("c",), ("d",), ("e",), ("f", "g")]
    assert [g.key for g in groups] == [f"group:{i:04d}" for i in range(6)]
    # other values, other insertion order: the same groups
    shuffled = dict(reversed(list(_state(7, **sizes).items())))
    assert group_parameters(shuffled) == groups
    # small tensors pack together up to 0.9 x median, big ones stay alone
    packed = group_parameters(_state(0, a=4, b=4, c=4, d=10, e=10, f=10, g=100))
    assert [g.names for g in packed] == [("a", "b"), ("c",), ("d",), ("e",), ("f",), ("g",)]


def test_grouping_rejects_integer_tensors():
    with pytest.raises(UpdateError, match="floating"):
        group_parameters({"w": torch.zeros(3), "steps": torch.zeros(2, dtype=torch.int64)})


# ------------------------------------------------------------------------------ directions


def test_directions_are_truncated_normal_and_cpu_whatever_the_default_device():
    bound = 0.5
    x = direction_chunk(123, 1 << 20, bound)
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    assert float(x.abs().max()) <= bound
    phi = math.exp(-(bound**2) / 2) / math.sqrt(2 * math.pi)
    variance = 1 - 2 * bound * phi / math.erf(bound / math.sqrt(2))  # truncated N(0,1)
    assert abs(float(x.mean())) < 1e-3
    assert float(x.var()) == pytest.approx(variance, rel=1e-2)
    with torch.device("meta"):  # a default device elsewhere does not move the generation
        again = direction_chunk(123, 1 << 20, bound)
    assert again.device.type == "cpu" and torch.equal(again, x)
    assert not torch.equal(direction_chunk(124, 1 << 20, bound), x)


def test_seeds_derive_from_the_round_state_and_the_salt():
    state = _state(0, w=10)
    digest = state_digest(state)
    assert digest == state_digest(dict(reversed(list(state.items()))))
    assert digest != state_digest(_moved(state, 1))
    assert group_seed(0, digest, 0) == group_seed(0, digest, 0)
    assert (
        len(
            {
                group_seed(s, d, i)
                for s in (0, 1)
                for d in (digest, state_digest(_moved(state, 1)))
                for i in (0, 1)
            }
        )
        == 8
    )


@pytest.mark.integration  # starts a process
def test_reconstruction_from_seeds_is_bit_identical_in_another_process(tmp_path):
    # a group larger than one chunk, so chunk seeding is part of what must agree
    global_state = _state(3, big=CHUNK + 1000, bias=7, w=300)
    config = FerretConfig(k=6, seed=11)
    updates = [
        ClientUpdate(
            f"n{i}", FERRET.client_update(config, global_state, _moved(global_state, i), {}), 10 + i
        )
        for i in range(2)
    ]
    result = FERRET.aggregate(config, global_state, updates, 1)
    (tmp_path / "global.bin").write_bytes(tensor_map_to_bytes(global_state))
    for i, update in enumerate(updates):
        (tmp_path / f"update{i}.bin").write_bytes(tensor_map_to_bytes(update.payload))
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import torch
        torch.set_num_threads(2)  # other threading than the test process: no effect
        from confide.node.methods import ClientUpdate, get_method
        from confide.node.methods.ferret import FerretConfig
        from confide.protos.codec import tensor_map_from_bytes, tensor_map_to_bytes
        folder = Path(sys.argv[1])
        state = tensor_map_from_bytes((folder / "global.bin").read_bytes())
        updates = [ClientUpdate(f"n{i}", tensor_map_from_bytes(
            (folder / f"update{i}.bin").read_bytes()), 10 + i) for i in range(2)]
        result = get_method("ferret").aggregate(FerretConfig(k=6, seed=11), state, updates, 1)
        (folder / "result.bin").write_bytes(tensor_map_to_bytes(result))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], check=True, cwd=ROOT, env=env, timeout=120
    )
    assert (tmp_path / "result.bin").read_bytes() == tensor_map_to_bytes(result)
    other = tensor_map_from_bytes((tmp_path / "result.bin").read_bytes())
    assert any(not torch.equal(other[k], global_state[k]) for k in global_state)


# ------------------------------------------------------------------------------ estimator


def test_the_reference_estimator_is_unbiased_over_the_directions():
    """Averaged over many rounds' directions, sum_j a_j v_j is the update itself (the scale
    1 / (n s^2) uses the truncated normal's exact variance); clipping bounds each product."""
    global_state = _state(0, w=300)
    (group,) = group_parameters(global_state)
    delta = torch.randn(300, dtype=torch.float64)
    estimates = []
    for seed in range(400):
        base = group_seed(seed, state_digest(global_state), 0)
        a = reference_coefficients(group, base, 8, delta)
        estimates.append(reconstruct(group, base, a.tolist()))
    mean = torch.stack(estimates).mean(0)
    # relative error of the mean estimate: ~ sqrt(d / n / runs) = sqrt(300 / 8 / 400) ~ 0.3
    assert float((mean - delta).norm() / delta.norm()) < 0.45
    assert float(mean @ delta) > 0.8 * float(delta @ delta)
    clipped = reference_coefficients(group, group_seed(0, state_digest(global_state), 0), 8,
                                     delta * 100, clip=0.5)
    assert float(clipped.abs().max()) <= 0.5 / (8 * group.entry_variance) + 1e-12
    assert group.entry_variance == pytest.approx(1 / (3 * 300), rel=0.01)


def test_the_task_head_is_one_exact_group_sent_dense():
    state = {"bert.layer.weight": torch.zeros(40, 40), "bert.layer.bias": torch.zeros(40),
             "classifier.weight": torch.zeros(3, 40), "classifier.bias": torch.zeros(3)}
    groups = group_parameters(state)
    head = groups[-1]
    assert head.head and head.names == ("classifier.bias", "classifier.weight")
    config = FERRET.parse_config({"k": 4})
    local = {k: v + 0.01 for k, v in state.items()}
    payload = FERRET.client_update(config, state, local, {})
    assert isinstance(payload[head.key], torch.Tensor) and payload[head.key].shape == (123,)
    FERRET.check_update(config, state, payload)
    result = FERRET.aggregate(config, state, [ClientUpdate("n", payload, 5)], 1)
    torch.testing.assert_close(result["classifier.weight"], local["classifier.weight"])


@pytest.mark.parametrize("params", [{"k": 64},
                                    {"k": 4, "exact_max": 64}])
def test_update_is_recovered_exactly_when_k_covers_every_group(params):
    """The projection on as many directions as a group has, or exact groups, is FedAvg."""
    global_state = _state(0, a=5, b=12, c=40, d=2, e=64)
    config = FERRET.parse_config(params)
    locals_ = [(_moved(global_state, i), n) for i, n in ((1, 10), (2, 30))]
    updates = [
        ClientUpdate(f"n{i}", FERRET.client_update(config, global_state, local, {}), n)
        for i, (local, n) in enumerate(locals_)
    ]
    result = FERRET.aggregate(config, global_state, updates, 1)
    for name, value in global_state.items():  # exactly FedAvg on the full parameters
        expected = value + sum(n * (local[name] - value) for local, n in locals_) / 40
        torch.testing.assert_close(result[name], expected, rtol=0, atol=1e-6)


def test_fewer_directions_give_the_projection_on_their_orthonormalised_span():
    global_state = _state(0, w=500)
    (group,) = group_parameters(global_state)
    delta = torch.randn(500, dtype=torch.float64)
    base = group_seed(5, state_digest(global_state), 0)
    coefficients = project(group, base, 20, delta)
    step = reconstruct(group, base, coefficients.tolist())
    q, _ = torch.linalg.qr(group_directions(group, base, 20).to(torch.float64).T)
    torch.testing.assert_close(step, q @ (q.T @ delta), rtol=0, atol=1e-10)
    # a projection: never longer than the update, and along it
    assert step.norm() < delta.norm() and float(step @ delta) > 0


def test_adaptive_counts_follow_the_group_update_norms():
    global_state = _state(0, a=100, b=100, c=100)
    local = dict(global_state)
    local["a"] = local["a"] + 1.0
    local["b"] = local["b"] + 0.55  # floor(16 * 0.55) = 8
    local["c"] = local["c"] + 1e-4
    config = FERRET.parse_config({"k": 16, "adaptive": True})
    payload = FERRET.client_update(config, global_state, local, {})
    counts = [len(payload[f"group:000{i}"].seeds) for i in range(3)]
    assert counts == [16, 8, 2]
    FERRET.check_update(config, global_state, payload)
    result = FERRET.aggregate(config, global_state, [ClientUpdate("n", payload, 1)], 1)
    assert not torch.equal(result["c"], global_state["c"])


# ------------------------------------------------------------------------------ the wire


def test_uplink_is_k_scalars_and_seed_ids_per_group():
    global_state = _state(0, a=5, b=300, c=2000)
    config = FERRET.parse_config({"k": 24})
    payload = FERRET.client_update(config, global_state, _moved(global_state, 1), {})
    assert set(payload) == {ROUND_KEY, "group:0000", "group:0001", "group:0002"}
    assert payload[ROUND_KEY].dtype == torch.uint8 and payload[ROUND_KEY].numel() == 8
    for key, count in (("group:0000", 5), ("group:0001", 24), ("group:0002", 24)):
        value = payload[key]
        assert value.seeds == tuple(range(count)) and len(value.coefficients) == count
    scalars = 5 + 24 + 24
    # 4 bytes a scalar, 1 byte a direction id, and a few dozen bytes of framing per group
    assert 5 * scalars < wire_size(payload) <= 5 * scalars + 3 * 40 + 40
    assert wire_size(payload) == wire_size(_structural_payload(global_state, 24))
    decoded = tensor_map_from_bytes(tensor_map_to_bytes(payload))
    FERRET.check_update(config, global_state, decoded)


def test_uplink_for_minilm_is_under_18_kilobytes(capsys):
    from confide.node.models import build_base_model

    model = build_base_model(ModelConfig(base="minilm", num_labels=5))
    state = {name: p.detach() for name, p in model.named_parameters()}
    parameters = sum(t.numel() for t in state.values())
    assert parameters == pytest.approx(22.7e6, rel=0.01)
    k = FerretConfig().k
    uplink = wire_size(_structural_payload(state, k))
    downlink = wire_size(state)
    with capsys.disabled():
        print(
            f"\nFerret on MiniLM ({parameters:,} parameters, "
            f"{len(group_parameters(state))} groups, k={k}): uplink {uplink:,} bytes per "
            f"node per round; the full-state downlink is {downlink:,} bytes"
        )
    # the FedKSeed point is <= 18 KB per node per round; the exact head (1,925 float32 for 5
    # labels) adds 7.7 KB to the scalars
    assert uplink <= 18_000 + 4 * 1925 + 64
    assert uplink * 3000 < downlink


# ------------------------------------------------------------------------------ checks


def test_check_update_rejects_what_the_coordinator_did_not_prescribe():
    global_state = _state(0, a=5, b=300, c=2000)
    config = FERRET.parse_config({"k": 8})
    good = FERRET.client_update(config, global_state, _moved(global_state, 1), {})
    FERRET.check_update(config, global_state, good)

    def changed(key, **fields):
        value = good[key]
        data = dict(
            shape=value.shape,
            dtype=value.dtype,
            seeds=value.seeds,
            coefficients=value.coefficients,
            generator=value.generator,
        )
        data.update(fields)
        return {**good, key: SeedProjectedTensor(**data)}

    cases = [
        (changed("group:0001", seeds=tuple(range(1, 9))), "direction ids 0..7"),
        (changed("group:0001", seeds=(7, 6, 5, 4, 3, 2, 1, 0)), "direction ids"),
        (
            changed("group:0001", seeds=tuple(range(4)), coefficients=(0.1,) * 4),
            "4 coefficients, this job expects 8",
        ),
        (changed("group:0001", seeds=tuple(range(9)), coefficients=(0.1,) * 9), "9 coefficients"),
        (
            changed("group:0000", seeds=tuple(range(6)), coefficients=(0.1,) * 6),
            "6 coefficients",
        ),  # more directions than the group has elements
        (changed("group:0002", coefficients=(float("nan"),) * 8), "NaN"),
        (changed("group:0002", generator="other"), "generator"),
        (changed("group:0002", shape=(1999,)), "expected torch.float32"),
        ({k: v for k, v in good.items() if k != "group:0002"}, "missing"),
        ({**good, "b": torch.zeros(300)}, "unexpected"),
        ({**good, "group:0002": torch.zeros(2000)}, "seed-projected"),
        ({**good, ROUND_KEY: torch.zeros(8, dtype=torch.uint8)}, "stale"),
    ]
    for payload, message in cases:
        with pytest.raises(UpdateError, match=message):
            FERRET.check_update(config, global_state, payload)
    # an update from another round's state: its tag (and so its directions) are not this one's
    stale = FERRET.client_update(config, _moved(global_state, 5), global_state, {})
    with pytest.raises(UpdateError, match="stale"):
        FERRET.check_update(config, global_state, stale)
    with pytest.raises(UpdateError, match="coefficients"):
        over = tuple(range(MAX_K + 1))
        FERRET.check_update(
            config, global_state,
            changed("group:0002", seeds=over, coefficients=(0.0,) * len(over)),
        )


def test_check_update_rejects_what_the_config_forbids_and_aggregate_needs_a_weight():
    """The config-aware check is ``check_update``'s (the coordinator drops such an update
    before it counts); ``aggregate`` trusts its input."""
    global_state = _state(0, a=300)
    config = FERRET.parse_config({"k": 8})
    good = FERRET.client_update(config, global_state, _moved(global_state, 1), {})
    wide = FERRET.client_update(
        FERRET.parse_config({"k": 16}), global_state, _moved(global_state, 2), {}
    )
    with pytest.raises(UpdateError, match="16 coefficients, this job expects 8"):
        FERRET.check_update(config, global_state, wide)
    with pytest.raises(UpdateError, match="without updates"):
        FERRET.aggregate(config, global_state, [], 1)
    with pytest.raises(UpdateError, match="positive weight"):
        FERRET.aggregate(config, global_state, [ClientUpdate("a", good, 0)], 1)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": MAX_K + 1}, "k must be"),
        ({"server_lr": 0.0}, "server_lr"),
        ({"seed": -1}, "seed"),
        ({"adaptive": 1}, "adaptive"),
        ({"momentum": 0.9}, "no parameter"),
    ],
)
def test_config_is_validated(params, message):
    with pytest.raises(ValueError, match=message):
        FERRET.parse_config(params)


# ------------------------------------------------------------------------------ full-parameter


FULL = ModelConfig(base="tiny-bert", num_labels=2, max_length=32, adapter="none")


def test_full_parameter_trainer_trains_every_parameter():
    from confide.node.data import synthetic_classification

    trainer = LoraTrainer(FULL)
    names = sorted(n for n, p in trainer.model.named_parameters())
    state = trainer.trainable_state()
    assert list(state) == names
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    trainer.train(synthetic_classification(32, 2, seed=0), batch_size=16, learning_rate=1e-3)
    after = trainer.trainable_state()
    assert not torch.equal(
        after["bert.encoder.layer.0.attention.self.query.weight"],
        state["bert.encoder.layer.0.attention.self.query.weight"],
    )
    trainer.load_trainable_state(state)
    assert all(torch.equal(trainer.trainable_state()[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="missing"):
        trainer.load_trainable_state({k: v for k, v in state.items() if "pooler" not in k})
    with pytest.raises(ValueError, match="wrong shapes"):
        trainer.load_trainable_state({**state, "classifier.bias": torch.zeros(3)})
    # the same seed builds the same weights
    assert all(torch.equal(LoraTrainer(FULL).trainable_state()[n], state[n]) for n in state)


def test_adapter_is_validated_and_follows_the_method():
    with pytest.raises(ValueError, match="unknown adapter"):
        ModelConfig(adapter="qlora").validate()
    assert adapter_for("full") == "none" and adapter_for("lora") == "lora"
    with pytest.raises(ValueError, match="trainable"):
        adapter_for("half")
    assert job_model_config(job_spec("ferret")).adapter == "none"
    assert job_model_config(job_spec("fedavg-lora")).adapter == "lora"
    assert ModelConfig.from_dict({"adapter": "none"}).adapter == "none"


# ------------------------------------------------------------------ compact broadcast


def test_compact_broadcast_rebuilds_the_aggregate_bit_for_bit_after_the_wire():
    global_state = _state(0, a=300, b=7, c=2000)
    config = FERRET.parse_config({"k": 8, "adaptive": True, "server_lr": 0.7})
    updates = [
        ClientUpdate(name, FERRET.client_update(config, global_state, _moved(global_state, i),
                                                {}), 10 + i)
        for i, name in enumerate("xyz")
    ]
    aggregated, compact = FERRET.aggregate_compact(config, global_state, updates, 1)
    assert compact is not None
    # the same step as ``aggregate``, and a broadcast of K scalars per group
    plain = FERRET.aggregate(config, global_state, updates, 1)
    assert all(torch.equal(plain[k], aggregated[k]) for k in plain)
    wire = tensor_map_to_bytes(compact)
    assert len(wire) < 2048 < wire_size(global_state)
    rebuilt = FERRET.apply_compact(config, global_state, tensor_map_from_bytes(wire))
    assert all(torch.equal(rebuilt[k], aggregated[k]) for k in aggregated)
    assert not torch.equal(rebuilt["c"], global_state["c"])


def test_compact_broadcast_refuses_another_base_state():
    global_state = _state(0, a=300)
    config = FERRET.parse_config({"k": 8})
    update = FERRET.client_update(config, global_state, _moved(global_state, 1), {})
    _, compact = FERRET.aggregate_compact(config, global_state, [ClientUpdate("a", update, 5)], 1)
    with pytest.raises(UpdateError, match="another state"):
        FERRET.apply_compact(config, _moved(global_state, 2), compact)
    with pytest.raises(UpdateError, match="no compact broadcast"):
        get_method("fedavg-lora").apply_compact(config, global_state, compact)
