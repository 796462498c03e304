"""FedAvg-LoRA's pure parts: the node's delta and the example-weighted aggregation."""

from __future__ import annotations

import pytest
import torch

from confide.node.methods import ClientUpdate, UpdateError, get_method
from confide.protos.codec import SparseTensor


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.full((4,), value)}


def test_aggregate_is_the_example_weighted_mean_of_local_states():
    method = get_method("fedavg-lora")
    config = method.parse_config({})
    global_state = _state(0.0)
    locals_ = [(_state(1.0), 10), (_state(4.0), 30)]
    updates = [
        ClientUpdate(f"n{i}", method.client_update(config, global_state, local, {}), n)
        for i, (local, n) in enumerate(locals_)
    ]
    result = method.aggregate(config, global_state, updates, 1)
    expected = (1.0 * 10 + 4.0 * 30) / 40
    for name in global_state:
        assert torch.allclose(result[name], torch.full_like(global_state[name], expected))
        assert result[name].dtype == global_state[name].dtype


def test_client_update_is_the_delta_and_keeps_no_memory():
    method = get_method("fedavg-lora")
    memory: dict = {}
    delta = method.client_update(method.parse_config({}), _state(1.0), _state(3.5), memory)
    assert all(torch.equal(delta[k], torch.full_like(delta[k], 2.5)) for k in delta)
    assert memory == {}


def test_aggregate_accepts_sparse_updates():
    method = get_method("fedavg-lora")
    global_state = {"w": torch.zeros(5)}
    dense = torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0])
    sparse = SparseTensor(shape=(5,), indices=torch.tensor([1, 3]),
                          values=torch.tensor([2.0, -1.0]))
    result = method.aggregate(method.parse_config({}), global_state,
                              [ClientUpdate("n", {"w": sparse}, 1)], 1)
    assert torch.equal(result["w"], dense)


def test_check_update_rejects_mismatches():
    method = get_method("fedavg-lora")
    global_state = _state(0.0)

    def check(payload):
        method.check_update(method.parse_config({}), global_state, payload)

    with pytest.raises(UpdateError, match="missing"):
        check({"a": torch.zeros(2, 3)})
    with pytest.raises(UpdateError, match="shape"):
        check({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(UpdateError, match="NaN"):
        check({"a": torch.full((2, 3), float("nan")),
               "b": torch.zeros(4)})
    with pytest.raises(UpdateError, match="floating point"):
        check({"a": torch.zeros(2, 3, dtype=torch.int64),
               "b": torch.zeros(4)})
    check(_state(1.0))


def test_zero_examples_everywhere_is_an_error_not_a_division_by_zero():
    method = get_method("fedavg-lora")
    config = method.parse_config({})
    with pytest.raises(UpdateError, match="positive weight"):
        method.aggregate(config, _state(0.0), [ClientUpdate("n", _state(1.0), 0)], 1)


def test_unknown_methods_and_parameters_are_named():
    with pytest.raises(ValueError, match="known methods: fedavg-lora"):
        get_method("fedprox")
    with pytest.raises(ValueError, match="has no parameter"):
        get_method("fedavg-lora").parse_config({"k": 3})
