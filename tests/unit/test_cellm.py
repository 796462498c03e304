"""CELLM's pure parts: top-k selection, error-feedback bookkeeping, the sparse wire encoding,
exact agreement with FedAvg-LoRA at density 1, and the checks on what nodes send."""

from __future__ import annotations

import pytest
import torch

from confide.node.methods import ClientUpdate, UpdateError, get_method, known_methods
from confide.node.methods.cellm import RESIDUAL_PREFIX, CELLMConfig, keep_count
from confide.node.models import ModelConfig
from confide.node.training.lora import LoraTrainer
from confide.protos.codec import (
    CodecError,
    SeedProjectedTensor,
    SparseTensor,
    encode_named,
    tensor_map_from_bytes,
    tensor_map_to_bytes,
    tensor_to_proto,
    to_dense,
    wire_size,
)
from confide.v1 import common_pb2

CELLM = get_method("cellm")
FEDAVG = get_method("fedavg-lora")
SHAPES = {"lora_A": (8, 64), "lora_B": (64, 8), "head.weight": (3, 64), "head.bias": (3,)}


def _state(seed: int = 0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _moved(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _config(**params) -> CELLMConfig:
    config = CELLM.parse_config(params)
    assert isinstance(config, CELLMConfig)
    return config


def _residual(memory: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return memory[RESIDUAL_PREFIX + name]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_cellm_is_registered():
    assert "cellm" in known_methods()
    assert CELLM.name == "cellm" and CELLM.trainable == "lora"
    assert _config() == CELLMConfig(density=0.1, scope="global", error_feedback=True)


# ------------------------------------------------------------------------ node side


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.25])
def test_sent_plus_residual_is_the_delta_exactly(scope, density):
    config = _config(density=density, scope=scope)
    global_state = _state(0)
    local = _moved(global_state, 1)
    memory: dict[str, torch.Tensor] = {}
    payload = CELLM.client_update(config, global_state, local, memory)
    assert set(payload) == set(global_state)
    assert set(memory) == {RESIDUAL_PREFIX + name for name in global_state}
    for name in global_state:
        delta = local[name] - global_state[name]
        sent, residual = to_dense(payload[name]), _residual(memory, name)
        assert sent.dtype == residual.dtype == delta.dtype
        assert torch.equal(sent + residual, delta), name
        # disjoint: an entry is either sent or kept, never split
        assert not bool(((sent != 0) & (residual != 0)).any()), name


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_rounded_values_leave_their_rounding_in_the_residual(value_dtype):
    """Narrow values: what was sent (widened back) plus the residual is still the delta,
    bit for bit, and the uplink is smaller than with float32 values."""
    global_state = _state(0)
    local = _moved(global_state, 1)
    memory: dict[str, torch.Tensor] = {}
    payload = CELLM.client_update(_config(value_dtype=value_dtype), global_state, local, memory)
    wide = CELLM.client_update(_config(), global_state, local, {})
    assert wire_size(payload) < 0.8 * wire_size(wide)
    for name in global_state:
        delta = local[name] - global_state[name]
        assert payload[name].dtype == getattr(torch, value_dtype)
        sent = to_dense(payload[name]).to(delta.dtype)
        assert torch.equal(sent + _residual(memory, name), delta), name


def test_values_a_narrow_dtype_cannot_hold_go_as_they_are():
    global_state = {"w": torch.zeros(40)}
    local = {"w": torch.linspace(-1e6, 1e6, 40)}  # beyond float16's 65,504
    memory: dict[str, torch.Tensor] = {}
    payload = CELLM.client_update(_config(value_dtype="float16"), global_state, local, memory)
    assert payload["w"].dtype == torch.float32
    assert torch.equal(to_dense(payload["w"]) + _residual(memory, "w"), local["w"])


def test_residual_is_carried_into_the_next_round():
    config = _config(density=0.1)
    global_1 = _state(0)
    memory: dict[str, torch.Tensor] = {}
    CELLM.client_update(config, global_1, _moved(global_1, 1), memory)
    kept = {name: _residual(memory, name).clone() for name in global_1}
    assert all(bool(kept[name].any()) for name in ("lora_A", "lora_B", "head.weight"))

    global_2 = _moved(global_1, 2)  # the coordinator moved on
    local_2 = _moved(global_2, 3)
    payload = CELLM.client_update(config, global_2, local_2, memory)
    for name in global_1:
        delta = (local_2[name] - global_2[name]) + kept[name]
        assert torch.equal(to_dense(payload[name]) + _residual(memory, name), delta), name


def test_error_feedback_eventually_sends_everything_and_loses_nothing():
    """Train once, then send rounds with no new training: each entry goes exactly once, whole."""
    config = _config(density=0.1)
    global_state = _state(0)
    local = _moved(global_state, 1)
    delta = {k: local[k] - global_state[k] for k in global_state}
    memory: dict[str, torch.Tensor] = {}
    total = {k: torch.zeros_like(v) for k, v in delta.items()}
    sends = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in delta.items()}
    payload = CELLM.client_update(config, global_state, local, memory)
    for _ in range(12):
        for name, value in payload.items():
            total[name] += to_dense(value)
            sends[name] += (to_dense(value) != 0).long()
        payload = CELLM.client_update(config, global_state, global_state, memory)
    for name in delta:
        assert torch.equal(total[name], delta[name]), name
        assert int(sends[name].max()) == 1, name
        assert not bool(_residual(memory, name).any())


def test_without_error_feedback_nothing_is_remembered():
    config = _config(density=0.1, error_feedback=False)
    global_state = _state(0)
    memory: dict[str, torch.Tensor] = {"unrelated": torch.ones(2)}
    first = CELLM.client_update(config, global_state, _moved(global_state, 1), memory)
    assert set(memory) == {"unrelated"}
    # a second round with the same training sends the same entries again: no residual added
    again = CELLM.client_update(config, global_state, _moved(global_state, 1), memory)
    assert all(_bits(to_dense(first[k])) == _bits(to_dense(again[k])) for k in first)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2])
def test_per_tensor_top_k_keeps_the_k_largest_magnitudes(density):
    global_state = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    local = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        n = torch.Size(shape).numel()
        signs = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
        magnitudes = (torch.randperm(n, generator=torch.Generator().manual_seed(i)) + 1.0)
        local[name] = (signs * magnitudes).reshape(shape)  # distinct magnitudes, mixed signs
    config = _config(density=density, scope="tensor")
    payload = CELLM.client_update(config, global_state, local, {})
    for name, value in payload.items():
        flat = local[name].reshape(-1)
        k = keep_count(density, flat.numel())
        expected = torch.sort(torch.topk(flat.abs(), k).indices).values
        if isinstance(value, torch.Tensor):  # everything goes, for no more bytes than top-k
            top = SparseTensor(shape=tuple(local[name].shape), indices=expected,
                               values=flat[expected])
            assert wire_size({name: value}) <= wire_size({name: top})
            continue
        assert isinstance(value, SparseTensor)
        assert value.indices.tolist() == expected.tolist(), name
        assert torch.equal(value.values, flat[expected])
        assert value.shape == tuple(local[name].shape)


def test_global_top_k_keeps_the_largest_magnitudes_of_the_whole_update():
    global_state = {"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(50)}
    local = {
        "a": torch.linspace(0.01, 1.0, 100),  # small
        "b": -torch.linspace(10.0, 20.0, 100),  # the largest, negative
        "c": torch.linspace(1.5, 5.0, 50),
    }
    payload = CELLM.client_update(_config(density=0.1, scope="global"), global_state, local, {})
    # K = 25 entries: all from b (its 25 largest magnitudes), none from a or c
    assert isinstance(payload["b"], SparseTensor)
    assert payload["b"].indices.tolist() == list(range(75, 100))
    for name in ("a", "c"):
        assert isinstance(payload[name], SparseTensor) and payload[name].indices.numel() == 0
    per_tensor = CELLM.client_update(_config(density=0.1, scope="tensor"), global_state, local, {})
    assert [per_tensor[n].indices.numel() for n in "abc"] == [10, 10, 5]


def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(0.1, 512) == 51
    assert keep_count(0.1, 30) == 3  # not ceil(3.0000000000000004) == 4
    assert keep_count(0.1, 2) == 1 and keep_count(1e-9, 10**6) == 1
    assert keep_count(1.0, 7) == 7 and keep_count(0.5, 0) == 0


def test_tensors_go_dense_where_sparse_would_cost_more():
    global_state = {"tiny": torch.zeros(2), "big": torch.zeros(300)}
    local = {"tiny": torch.tensor([1.0, -2.0]), "big": torch.arange(300.0)}
    memory: dict[str, torch.Tensor] = {}
    low = CELLM.client_update(_config(density=0.1, scope="tensor"), global_state, local, memory)
    assert isinstance(low["tiny"], torch.Tensor)  # 1 index + 1 value > 2 values
    assert isinstance(low["big"], SparseTensor) and low["big"].indices.numel() == 30
    assert not bool(_residual(memory, "tiny").any())  # all of it went
    # half of "big" goes sparse: its positions as a 38-byte bitmap beat 150 int32 indices
    half = CELLM.client_update(_config(density=0.5, scope="tensor"), global_state, local, {})
    assert isinstance(half["big"], SparseTensor) and half["big"].indices.numel() == 150
    assert encode_named("big", half["big"]).sparse.index_encoding == common_pb2.INDEX_BITMAP
    assert wire_size({"big": half["big"]}) < 0.6 * wire_size({"big": local["big"]})
    # 98% of it is no cheaper than all of it (a bitmap plus 294 values > 300 values)
    most = CELLM.client_update(_config(density=0.98, scope="tensor"), global_state, local, {})
    assert all(isinstance(v, torch.Tensor) for v in most.values())
    # globally, K = 151 entries all fall in "big", none in "tiny"; but "tiny" whole costs
    # fewer bytes than the framing of an empty sparse tensor, so it goes anyway
    half = CELLM.client_update(_config(density=0.5, scope="global"), global_state, local, {})
    assert isinstance(half["big"], SparseTensor) and half["big"].indices.numel() == 151
    assert torch.equal(half["tiny"], local["tiny"])


def test_diverged_training_is_an_error_and_leaves_memory_alone():
    global_state = _state(0)
    memory: dict[str, torch.Tensor] = {}
    CELLM.client_update(_config(), global_state, _moved(global_state, 1), memory)
    before = {k: v.clone() for k, v in memory.items()}
    bad = _moved(global_state, 2)
    bad["lora_B"][3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        CELLM.client_update(_config(), global_state, bad, memory)
    assert memory.keys() == before.keys()
    assert all(torch.equal(memory[k], before[k]) for k in before)


def test_a_residual_of_the_wrong_shape_is_discarded():
    global_state = _state(0)
    local = _moved(global_state, 1)
    memory = {RESIDUAL_PREFIX + "lora_A": torch.ones(3, 3)}
    payload = CELLM.client_update(_config(), global_state, local, memory)
    delta = local["lora_A"] - global_state["lora_A"]
    assert torch.equal(to_dense(payload["lora_A"]) + _residual(memory, "lora_A"), delta)


# ------------------------------------------------------------------------ wire


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sparse_payload_round_trips_through_the_codec(scope):
    config = _config(density=0.1, scope=scope)
    global_state = _state(0)
    payload = CELLM.client_update(config, global_state, _moved(global_state, 1), {})
    assert any(isinstance(v, SparseTensor) for v in payload.values())
    decoded = tensor_map_from_bytes(tensor_map_to_bytes(payload))
    assert list(decoded) == list(payload)
    for name, value in payload.items():
        assert type(decoded[name]) is type(value)
        if isinstance(value, SparseTensor):
            assert decoded[name] == value  # bit-exact shape, indices and values
        else:
            assert _bits(decoded[name]) == _bits(value)
    CELLM.check_update(config, global_state, decoded)
    before = CELLM.aggregate(config, global_state, [ClientUpdate("n", payload, 5)], 1)
    after = CELLM.aggregate(config, global_state, [ClientUpdate("n", decoded, 5)], 1)
    assert all(_bits(before[k]) == _bits(after[k]) for k in global_state)


def _tiny_bert_state() -> dict[str, torch.Tensor]:
    return LoraTrainer(ModelConfig(base="tiny-bert", num_labels=2, max_length=32)).trainable_state()


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_density_point_one_cuts_the_uplink_of_the_tiny_model(scope):
    """The adapter state of the integration tests' tiny BERT (4,226 entries in 10 tensors)."""
    global_state = _tiny_bert_state()
    local = _moved(global_state, 1, scale=1e-3)
    dense = wire_size(FEDAVG.client_update(FEDAVG.parse_config({}), global_state, local, {}))
    sizes = {}
    for density in (0.1, 1 / 30):
        payload = CELLM.client_update(_config(density=density, scope=scope), global_state,
                                      local, {})
        sizes[density] = wire_size(payload)
        if scope == "global":
            entries = keep_count(density, sum(v.numel() for v in global_state.values()))
        else:
            entries = sum(keep_count(density, v.numel()) for v in global_state.values())
        # at most the selected entries' data bytes with int32 positions (the codec sends
        # them narrower where it can; a tensor goes dense only where that is no more), plus
        # framing: names, dtype and shape fields
        assert sizes[density] < entries * (4 + 4) + 200 * len(global_state)
    print(f"tiny BERT uplink ({scope}): dense {dense} B, density 0.1 {sizes[0.1]} B "
          f"({dense / sizes[0.1]:.1f}x less), density 1/30 {sizes[1 / 30]} B "
          f"({dense / sizes[1 / 30]:.1f}x less)")
    assert sizes[0.1] < 0.4 * dense
    assert sizes[1 / 30] < 0.2 * dense


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_density_one_reproduces_fedavg_lora_bit_for_bit(scope):
    config = _config(density=1.0, scope=scope)
    fedavg_config = FEDAVG.parse_config({})
    cellm_global = fedavg_global = _state(0)
    memories: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    counts = [7, 30, 1]
    for round_number in (1, 2, 3):
        locals_ = [_moved(cellm_global, 10 * round_number + i, scale=0.1) for i in range(3)]
        cellm_updates, fedavg_updates = [], []
        for i, local in enumerate(locals_):
            payload = CELLM.client_update(config, cellm_global, local, memories[i])
            baseline = FEDAVG.client_update(fedavg_config, fedavg_global, local, {})
            assert all(_bits(payload[k]) == _bits(baseline[k]) for k in baseline)
            payload = tensor_map_from_bytes(tensor_map_to_bytes(payload))  # via the wire
            cellm_updates.append(ClientUpdate(f"n{i}", payload, counts[i]))
            fedavg_updates.append(ClientUpdate(f"n{i}", baseline, counts[i]))
        cellm_global = CELLM.aggregate(config, cellm_global, cellm_updates, round_number)
        fedavg_global = FEDAVG.aggregate(fedavg_config, fedavg_global, fedavg_updates,
                                         round_number)
        for name in fedavg_global:
            assert torch.equal(cellm_global[name], fedavg_global[name])
            assert _bits(cellm_global[name]) == _bits(fedavg_global[name])
        assert all(not bool(v.any()) for m in memories for v in m.values())


def test_aggregate_is_the_example_weighted_mean_of_the_densified_updates():
    global_state = {"w": torch.zeros(6)}
    a = SparseTensor(shape=(6,), indices=torch.tensor([0, 3]), values=torch.tensor([4.0, 8.0]))
    b = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, -2.0])
    result = CELLM.aggregate(
        _config(), global_state, [ClientUpdate("a", {"w": a}, 1), ClientUpdate("b", {"w": b}, 3)],
        1,
    )
    assert torch.equal(result["w"], torch.tensor([1.0, 1.5, 0.0, 2.0, 0.0, -1.5]))
    with pytest.raises(UpdateError, match="without updates"):
        CELLM.aggregate(_config(), global_state, [], 1)
    with pytest.raises(UpdateError, match="positive weight"):
        CELLM.aggregate(_config(), global_state, [ClientUpdate("a", {"w": a}, 0)], 1)


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0}, r"density must be a number in \(0, 1\].*got 0"),
        ({"density": 0.0}, r"density must be a number in \(0, 1\]"),
        ({"density": 1.5}, r"density must be a number in \(0, 1\].*got 1.5"),
        ({"density": -0.1}, r"density must be"),
        ({"density": float("nan")}, r"density must be"),
        ({"density": True}, r"density must be"),
        ({"density": "0.1"}, r"density must be"),
        ({"scope": "layer"}, r"scope must be one of global, tensor, got 'layer'"),
        ({"error_feedback": "yes"}, r"error_feedback must be true or false"),
        ({"value_dtype": "int8"}, r"value_dtype must be one of float32, float16, bfloat16"),
        ({"k": 10}, r"method 'cellm' has no parameter\(s\) k; its parameters are: density, "
                    r"downlink_density, error_feedback, scope, selection, value_dtype"),
        ({"downlink_density": 0}, r"downlink_density must be a number in \(0, 1\]"),
        ({"downlink_density": 1.5}, r"downlink_density must be a number in \(0, 1\]"),
        ({"downlink_density": 0.1, "selection": "shared-random"},
         r"downlink_density < 1 needs selection 'topk'"),
    ],
)
def test_bad_parameters_are_rejected_with_a_clear_message(params, message):
    with pytest.raises(ValueError, match=message):
        CELLM.parse_config(params)


def test_parameters_as_they_arrive_from_a_job_spec():
    # protobuf Struct numbers are floats; booleans stay booleans
    assert _config(density=1.0, scope="global", error_feedback=False) == CELLMConfig(
        1.0, "global", False
    )
    assert _config(density=1).density == 1


# ------------------------------------------------------------------------ hostile updates


def _sparse(indices: list[int], values: list[float], n: int = 512) -> SparseTensor:
    return SparseTensor(shape=(8, n // 8), indices=torch.tensor(indices),
                        values=torch.tensor(values))


def _honest() -> tuple[dict[str, torch.Tensor], dict]:
    global_state = _state(0)
    config = _config(scope="tensor")  # every tensor sparse
    return global_state, CELLM.client_update(config, global_state, _moved(global_state, 1), {})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_sparse([0, 512], [1.0, 2.0]), r"sparse index 512 outside \[0, 512\)"),
        (_sparse([-1, 3], [1.0, 2.0]), r"sparse index -1 outside"),
        (_sparse([5, 9, 5], [1.0, 2.0, 3.0]), r"repeats"),
        (_sparse([1, 2], [1.0, float("nan")]), r"NaN or infinity"),
        (_sparse([1, 2], [1.0, float("inf")]), r"NaN or infinity"),
        (SparseTensor(shape=(8, 64), indices=torch.tensor([1]), values=torch.tensor([3])),
         r"floating point"),
        (SparseTensor(shape=(4, 128), indices=torch.tensor([1]), values=torch.tensor([1.0])),
         r"shape \(4, 128\), expected \(8, 64\)"),
        (SeedProjectedTensor((8, 64), torch.float32, (0,), (1.0,), "g"),
         r"dense or sparse tensors, got SeedProjected"),
        (torch.full((8, 64), float("nan")), r"NaN or infinity"),
    ],
)
def test_hostile_updates_are_rejected(bad, message):
    global_state, payload = _honest()
    CELLM.check_update(_config(), global_state, payload)
    hostile = {**payload, "lora_A": bad}
    with pytest.raises(UpdateError, match=message):
        CELLM.check_update(_config(), global_state, hostile)


def test_names_must_match_the_global_state():
    global_state, payload = _honest()
    with pytest.raises(UpdateError, match="missing"):
        CELLM.check_update(_config(), global_state,
                           {k: v for k, v in payload.items() if k != "lora_B"})
    with pytest.raises(UpdateError, match="unexpected"):
        CELLM.check_update(_config(), global_state, {**payload, "extra": torch.zeros(1)})


def _wire_with_indices(indices: torch.Tensor) -> bytes:
    _, payload = _honest()
    data = tensor_map_to_bytes(payload)
    msg = common_pb2.TensorMap.FromString(data)
    for named in msg.tensors:
        if named.name == "lora_A":
            named.sparse.indices.CopyFrom(tensor_to_proto(indices))
            named.sparse.index_encoding = common_pb2.INDEX_POSITIONS
            named.sparse.values.CopyFrom(tensor_to_proto(torch.ones(indices.numel())))
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.tensor([3, 512]), r"index 512 outside \[0, 512\)"),
        (torch.tensor([-4, 1]), r"index -4 outside"),
        (torch.tensor([7, 7]), r"repeats an index"),
        (torch.tensor([1.0, 2.0]), r"indices must be INT32 or INT64"),
    ],
)
def test_the_codec_rejects_bad_sparse_indices_before_the_method_sees_them(indices, message):
    data = _wire_with_indices(indices)
    with pytest.raises(CodecError, match=message):
        tensor_map_from_bytes(data)


def test_shared_random_positions_are_the_same_everywhere_and_fresh_each_round():
    """selection "shared-random": the positions are a function of the global state alone (the
    same at every node, whatever its data), change with the state, and the node sends exactly
    those, keeping the rest in its residual."""
    from confide.node.methods.cellm import CELLM, CELLMConfig, shared_positions

    config = CELLMConfig(density=0.1, selection="shared-random")
    state = {"a": torch.zeros(50, 4), "b": torch.zeros(30)}
    first = shared_positions(config, state)
    assert {k: v.tolist() for k, v in first.items()} == {
        k: v.tolist() for k, v in shared_positions(config, dict(state)).items()}
    assert sum(v.numel() for v in first.values()) == 23  # round(0.1 * 230)
    moved = {"a": state["a"] + 1, "b": state["b"]}
    assert any(not torch.equal(first[k], v) for k, v in shared_positions(config,
                                                                         moved).items())
    memory: dict[str, torch.Tensor] = {}
    local = {k: v + torch.randn(v.shape) for k, v in state.items()}
    payload = CELLM().client_update(config, state, local, memory)
    for name, positions in first.items():
        assert payload[name].indices.tolist() == positions.tolist()
        sent = to_dense(payload[name]).reshape(-1)
        delta = (local[name] - state[name]).reshape(-1)
        assert torch.allclose(sent + memory["residual/" + name].reshape(-1), delta)


# ------------------------------------------------------------------------ sparse downlink


def test_a_dense_downlink_keeps_no_node_state():
    config = _config(density=0.1)
    assert not CELLM.keeps_node_states(config)
    assert CELLM.node_downlink(config, _state(0), _state(1)) is None


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_the_sparse_downlink_sends_the_largest_changes_and_later_the_rest(scope):
    """Steps 8-10: w_r's values at the largest |w_r - h_i|, copied into h_i; what is left out
    is sent in later rounds (the node holds w_r exactly once the changes are all sent)."""
    config = _config(density=0.1, downlink_density=0.1, scope=scope)
    assert CELLM.keeps_node_states(config)
    held = _tiny_bert_state()
    target = _moved(held, 3, scale=1e-2)
    dense = wire_size(target)
    payload, state = CELLM.node_downlink(config, target, held)
    entries = sum(v.numel() for v in held.values())
    sparse = sum(v.indices.numel() for v in payload.values() if isinstance(v, SparseTensor))
    whole = sum(v.numel() for v in payload.values() if not isinstance(v, SparseTensor))
    if scope == "global":  # k entries, but a tiny tensor goes whole where that is cheaper
        assert sparse <= keep_count(0.1, entries) <= sparse + whole
        assert whole < 0.01 * entries
    # each sent entry is w_r's value, bit for bit; the others are the held ones
    for name in held:
        changed = state[name] != held[name]
        assert torch.equal(state[name][changed], target[name][changed])
        kept_change = (target[name] - held[name]).abs()[changed]
        left = (target[name] - held[name]).abs()[~changed]
        if scope == "tensor" and kept_change.numel() and left.numel():
            assert kept_change.min() >= left.max()
    # the node rebuilds the same bits from what went down
    assert all(_bits(a) == _bits(b)
               for a, b in zip(CELLM.apply_compact(config, held, payload).values(),
                               state.values(), strict=True))
    size = wire_size(payload)
    print(f"tiny BERT downlink ({scope}): dense {dense} B, density 0.1 {size} B")
    assert size < 0.2 * dense
    # the left-out changes follow: after ten such rounds the node holds w_r exactly
    for _ in range(10):
        _, state = CELLM.node_downlink(config, target, state)
    assert all(torch.equal(state[name], target[name]) for name in target)
    # nothing changed, nothing sparse goes down
    payload, _ = CELLM.node_downlink(config, target, state)
    assert all(isinstance(v, SparseTensor) and v.indices.numel() == 0
               for v in payload.values())


def test_the_node_measures_its_update_from_what_it_holds():
    """FLASC's rule: the node's delta is taken from the state it trained from, and the
    coordinator adds the mean of those deltas to its dense state."""
    config = _config(density=1.0, downlink_density=0.1)
    dense_global = _state(0)
    held = _moved(dense_global, 5, scale=0.1)
    _, node_state = CELLM.node_downlink(config, dense_global, held)
    local = _moved(node_state, 6, scale=0.01)
    update = CELLM.client_update(config, node_state, local, {})
    after = CELLM.aggregate(config, dense_global, [ClientUpdate("n", update, 3)], 1)
    for name in dense_global:
        assert torch.allclose(after[name], dense_global[name] + local[name] - node_state[name],
                              atol=1e-6)


@pytest.mark.parametrize(("payload", "message"), [
    ({"lora_A": torch.zeros(8, 64)}, "does not name the held state's tensors"),
    ({**{k: torch.zeros(v) for k, v in SHAPES.items()}, "lora_A": torch.zeros(64, 8)},
     "has shape"),
    ({**{k: torch.zeros(v) for k, v in SHAPES.items()},
      "head.bias": SparseTensor(shape=(3,), indices=torch.tensor([5]),
                                values=torch.tensor([1.0]))}, "out of range"),
])
def test_a_bad_downlink_is_refused(payload, message):
    with pytest.raises(UpdateError, match=message):
        CELLM.apply_compact(_config(downlink_density=0.1), _state(0), payload)
