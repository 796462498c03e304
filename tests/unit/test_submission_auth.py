"""Who may submit (coordinator/auth.py) and what the coordinator accepts (coordinator/jobs.py):
the token file, loopback detection, the interceptor's check, full spec validation, and that
no generated spec crashes validation."""

from __future__ import annotations

import contextlib
import math
import stat

import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.coordinator.auth import (
    READ_METHODS,
    SUBMIT_METHODS,
    TokenAuth,
    is_loopback,
    load_or_create_token,
    read_token,
)
from confide.coordinator.jobs import normalize_spec
from confide.sdk.client import resolve_token
from confide.v1 import coordinator_pb2 as pb


def test_token_is_created_once_with_mode_0600(tmp_path):
    token = load_or_create_token(tmp_path / "coord")
    path = tmp_path / "coord" / "client_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and load_or_create_token(tmp_path / "coord") == token
    assert read_token(tmp_path / "coord") == token
    assert load_or_create_token(tmp_path / "other") != token


def test_token_resolution_order(tmp_path, monkeypatch):
    load_or_create_token(tmp_path)
    monkeypatch.delenv("CONFIDE_TOKEN", raising=False)
    assert resolve_token(None, tmp_path) == read_token(tmp_path)
    assert resolve_token(None, tmp_path / "none") == ""
    monkeypatch.setenv("CONFIDE_TOKEN", "from-env")
    assert resolve_token(None, tmp_path) == "from-env"
    assert resolve_token("given", tmp_path) == "given"


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:1", True), ("127.1.2.3:1", True),
    ("0.0.0.0:50051", False), ("[::]:1", False), ("10.0.0.5:1", False), ("myhost:1", False),
])
def test_loopback(listen, loopback):
    assert is_loopback(listen) is loopback


def test_the_interceptor_checks_the_bearer_token():
    auth = TokenAuth("secret")
    assert auth.authorized((("authorization", "Bearer secret"),))
    assert not auth.authorized((("authorization", "Bearer wrong"),))
    assert not auth.authorized((("authorization", "secret"),))
    assert not auth.authorized(())
    assert "/confide.v1.Coordinator/SubmitJob" in auth.protected
    assert auth.protected >= READ_METHODS
    assert TokenAuth("s", open_reads=True).protected == SUBMIT_METHODS
    # the nodes' own RPCs are authenticated by their keys, never by the operator's token
    for method in ("Register", "Session", "GetRing", "GetChallenge", "SubmitAnonymousUpdate"):
        assert f"/confide.v1.Coordinator/{method}" not in auth.protected


# ---------------------------------------------------------------- spec validation


def _spec(**fields) -> pb.JobSpec:
    spec = pb.JobSpec(method="fedavg-lora")
    for path, value in fields.items():
        target = spec
        *parents, leaf = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return spec


def test_defaults_are_filled_in_and_kept():
    spec = normalize_spec(pb.JobSpec())
    assert spec.rounds == 3 and spec.min_nodes == 1 and spec.model.base == "tiny-bert"
    assert spec.round_timeout_s == 600 and spec.train.batch_size == 16


@pytest.mark.parametrize("fields, field", [
    ({"rounds": 100_001}, "rounds"),
    ({"round_timeout_s": math.inf}, "round_timeout_s"),
    ({"round_timeout_s": math.nan}, "round_timeout_s"),
    ({"round_timeout_s": -1.0}, "round_timeout_s"),
    ({"wait_for_nodes_s": 1e12}, "wait_for_nodes_s"),
    ({"nodes_per_round": 10**6}, "nodes_per_round"),
    ({"model__base": "../../../../etc"}, "model.base"),
    ({"model__base": "/models/../etc"}, "model.base"),
    ({"model__base": "bert-base-uncased"}, "model.base"),
    ({"model__base": "/models/\x00x"}, "model.base"),
    ({"model__lora__alpha": math.inf}, "model.lora.alpha"),
    ({"model__lora__alpha": -2.0}, "model.lora.alpha"),
    ({"model__lora__target_modules": ["q"] * 65}, "model.lora.target_modules"),
    ({"model__max_length": 10**6}, "model.max_length"),
    ({"train__max_steps": 10**7}, "train.max_steps"),
    ({"train__learning_rate": math.nan}, "train.learning_rate"),
    ({"train__dataset": "../x"}, "train.dataset"),
    ({"method": "nope"}, "unknown method"),
])
def test_absurd_values_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        normalize_spec(_spec(**fields))


def test_an_absolute_model_path_passes_the_coordinator():
    """The coordinator cannot see the nodes' disks: each node's policy decides."""
    assert normalize_spec(_spec(model__base="/srv/models/bert")).model.base == "/srv/models/bert"


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=10) | st.integers(-2**60, 2**60),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)


@st.composite
def job_specs(draw) -> pb.JobSpec:
    spec = pb.JobSpec(
        name=draw(st.text(max_size=200)),
        method=draw(st.sampled_from(["fedavg-lora", "fedavg-full", "dp-lora", "cellm", "ferret",
                                     "sfprompt", "dimat", ""]) | st.text(max_size=20)),
        rounds=draw(st.integers(0, 2**32 - 1)),
        min_nodes=draw(st.integers(0, 2**32 - 1)),
        nodes_per_round=draw(st.integers(0, 2**32 - 1)),
        round_timeout_s=draw(st.floats(width=32)),
        wait_for_nodes_s=draw(st.floats(width=32)),
        seed=draw(st.integers(0, 2**64 - 1)),
        anonymous=draw(st.booleans()),
        budget=draw(st.floats()),
    )
    m = spec.model
    m.task = draw(st.sampled_from(["sequence-classification", "causal-lm", ""]) | st.text(
        max_size=10))
    m.base = draw(st.sampled_from(["tiny-bert", "/x", "/../x", "../x", ""]) | st.text(
        max_size=50))
    m.num_labels = draw(st.integers(0, 2**32 - 1))
    m.max_length = draw(st.integers(0, 2**32 - 1))
    m.lora.r = draw(st.integers(0, 2**32 - 1))
    m.lora.alpha = draw(st.floats(width=32))
    m.lora.dropout = draw(st.floats(width=32))
    m.lora.target_modules.extend(draw(st.lists(st.text(max_size=10), max_size=3)))
    t = spec.train
    t.local_epochs = draw(st.integers(0, 2**32 - 1))
    t.max_steps = draw(st.integers(0, 2**32 - 1))
    t.batch_size = draw(st.integers(0, 2**32 - 1))
    t.learning_rate = draw(st.floats(width=32))
    t.dataset = draw(st.text(max_size=70))
    params = draw(st.dictionaries(st.sampled_from(
        ["noise_multiplier", "clip_norm", "k", "mode", "rounds", "delta", "target_epsilon",
         "topology", "prune_gamma", "x"]) | st.text(max_size=8), _json, max_size=4))
    struct = struct_pb2.Struct()
    with contextlib.suppress(ValueError, TypeError):  # values a Struct cannot hold
        struct.update(params)
    spec.method_params.CopyFrom(struct)
    return spec


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=job_specs())
def test_validation_never_crashes(spec):
    try:
        normalized = normalize_spec(spec)
    except ValueError as exc:
        assert str(exc)
        return
    # what is accepted is complete and within range
    assert normalized.rounds >= 1 and normalized.min_nodes >= 1
    assert 0 < normalized.round_timeout_s <= 7 * 24 * 3600
    assert normalized.model.base
