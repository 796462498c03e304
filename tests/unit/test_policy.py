"""The node policy (node/policy.py): bases, methods, roles, private datasets, every cap, what
registration reveals, the policy file; and that no job spec makes admission crash."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import tomllib
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.node.policy import (
    JOB_IDLE_S,
    AdmissionGate,
    Caps,
    DatasetRule,
    NodePolicy,
    PolicyError,
    Refused,
    TaskRequest,
    load_policy,
    task_role,
    to_toml,
)
from confide.node.session import LinkState, _TaskRunner
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb


def spec(**kw) -> pb.JobSpec:
    return job_spec(kw.pop("method", "fedavg-lora"), **kw)


def trainer(s: pb.JobSpec, size: int | None = None, **kw) -> TaskRequest:
    return TaskRequest(role="trainer", spec=s, job_id=kw.pop("job_id", "j1"),
                       dataset_size=size, **kw)


# ---------------------------------------------------------------- bases


def test_defaults_take_packaged_models_and_refuse_any_path(tmp_path):
    policy = NodePolicy()
    for base in ("tiny-bert", "minilm", "smollm2", "tiny-llama"):
        policy.admit(trainer(spec(base=base)))
    (tmp_path / "model").mkdir()
    for base in (str(tmp_path / "model"), "../../../../etc", "/etc", "bert-base-uncased",
                 "org/model", "~/model"):
        with pytest.raises(Refused, match=r"model.base"):
            policy.admit(trainer(spec(base=base)))


def test_a_listed_folder_and_what_is_inside_it_are_allowed(tmp_path):
    allowed = tmp_path / "models"
    (allowed / "bert").mkdir(parents=True)
    policy = NodePolicy(allow_models=(str(allowed),))
    policy.check_base(str(allowed))
    policy.check_base(str(allowed / "bert"))
    with pytest.raises(Refused, match="not in a folder"):
        policy.check_base(str(tmp_path / "models-evil"))  # a sibling sharing the prefix
    with pytest.raises(Refused, match=r"'\.\.'"):
        policy.check_base(str(allowed / ".." / "models" / "bert"))


def test_a_symlink_escaping_the_allowed_folder_is_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    policy = NodePolicy(allow_models=(str(allowed),))
    with pytest.raises(Refused, match="resolves to"):
        policy.check_base(str(allowed / "escape"))
    # and the other way round: a link from elsewhere into the allowed folder resolves inside
    (outside / "into").symlink_to(allowed)
    policy.check_base(str(outside / "into"))


def test_packaged_models_can_be_narrowed():
    policy = NodePolicy(packaged_models=("tiny-bert",))
    policy.admit(trainer(spec(base="tiny-bert")))
    with pytest.raises(Refused, match="packaged model 'smollm2'"):
        policy.admit(trainer(spec(base="smollm2")))


# ---------------------------------------------------------------- methods, roles, datasets


def test_methods_and_roles_per_dataset():
    policy = NodePolicy(methods=("fedavg-lora", "dp-lora"), roles=("trainer",),
                        datasets={"med": DatasetRule(methods=("dp-lora",))})
    policy.admit(trainer(spec(method="fedavg-lora")))
    with pytest.raises(Refused, match="does not run method 'ferret'"):
        policy.admit(trainer(spec(method="ferret")))
    with pytest.raises(Refused, match="does not run method 'fedavg-lora' on dataset 'med'"):
        policy.admit(trainer(spec(method="fedavg-lora", dataset="med")))
    with pytest.raises(Refused, match="does not take part as minions"):
        policy.admit(TaskRequest(role="minions", dataset="docs"))
    with pytest.raises(Refused, match="split-server"):
        policy.admit(TaskRequest(role="split-server", spec=spec(method="sfprompt"), dataset=""))


def test_a_private_dataset_takes_only_dp_methods():
    policy = NodePolicy(private_datasets=("med",))
    policy.admit(trainer(spec(method="fedavg-lora", dataset="train")))
    with pytest.raises(Refused, match="private"):
        policy.admit(trainer(spec(method="fedavg-lora", dataset="med")))
    policy.admit(trainer(spec(method="dp-lora", dataset="med",
                              params={"noise_multiplier": 1.0})))


def test_task_roles():
    assert task_role(pb.Task(kind=pb.TRAIN, spec=spec())) == "trainer"
    assert task_role(pb.Task(kind=pb.MERGE, spec=spec(method="dimat"))) == "peer-merging"
    assert task_role(pb.Task(kind=pb.MINION)) == "minions"
    with pytest.raises(Refused, match="unknown method"):
        task_role(pb.Task(kind=pb.TRAIN, spec=spec(method="nope")))


# ---------------------------------------------------------------- caps


def test_rounds_cap():
    policy = NodePolicy(caps=Caps(rounds_per_job=5))
    policy.admit(trainer(spec(rounds=5)))
    with pytest.raises(Refused, match=r"6 rounds.*rounds_per_job"):
        policy.admit(trainer(spec(rounds=6)))


def test_local_steps_cap_counts_epochs_and_batches_or_max_steps():
    policy = NodePolicy(caps=Caps(local_steps_per_round=10))
    policy.admit(trainer(spec(batch_size=16, epochs=1), size=160))  # 10 steps
    with pytest.raises(Refused, match=r"11 local steps.*local_steps_per_round"):
        policy.admit(trainer(spec(batch_size=16, epochs=1), size=161))
    with pytest.raises(Refused, match="20 local steps"):
        policy.admit(trainer(spec(batch_size=16, epochs=2), size=160))
    policy.admit(trainer(spec(batch_size=16, epochs=5, max_steps=10), size=10_000))


def test_examples_cap():
    policy = NodePolicy(caps=Caps(examples_per_round=100))
    policy.admit(trainer(spec(batch_size=10, max_steps=10), size=10_000))  # 100 examples
    with pytest.raises(Refused, match=r"101 examples.*examples_per_round"):
        policy.admit(trainer(spec(batch_size=16), size=101))


def test_payload_cap():
    policy = NodePolicy(caps=Caps(payload_bytes=1000))
    policy.admit(TaskRequest(role="minions", dataset="docs", payload_bytes=1000))
    with pytest.raises(Refused, match=r"1001 bytes.*payload_bytes"):
        policy.admit(TaskRequest(role="minions", dataset="docs", payload_bytes=1001))


def test_concurrent_jobs_cap_frees_a_slot_when_a_job_goes_quiet():
    now = [0.0]
    gate = AdmissionGate(NodePolicy(caps=Caps(concurrent_jobs=2)), clock=lambda: now[0])
    gate.admit(trainer(spec(), job_id="a"))
    gate.admit(trainer(spec(), job_id="b"))
    gate.admit(trainer(spec(), job_id="a"))  # a job already running is not a new one
    with pytest.raises(Refused, match="concurrent_jobs = 2"):
        gate.admit(trainer(spec(), job_id="c"))
    gate.finished("b")
    gate.admit(trainer(spec(), job_id="c"))
    now[0] += JOB_IDLE_S + 1
    gate.admit(trainer(spec(), job_id="d"))
    gate.admit(trainer(spec(), job_id="e"))


#: the node key the task runner's secure-aggregation state needs (unused by these tasks)
_KEY = SimpleNamespace(node_id="0" * 32, sign=lambda message: b"")
#: what the task runner tells the link after a task (the privacy ledger report): nothing here
_NO_REPORT = lambda: None  # noqa: E731


class _SlowWorker:
    """Stands in for the TaskWorker: trains until cancelled (what a step loop does)."""

    def __init__(self) -> None:
        self.data = SimpleNamespace(datasets=lambda: {"train": 16})

    def train(self, task, payload, progress, cancelled: threading.Event):
        from confide.node.worker import TaskCancelled

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if cancelled.is_set():
                raise TaskCancelled("stopped")
            time.sleep(0.01)
        return b"", 16, {}


def test_a_task_over_the_seconds_cap_is_stopped_and_refused():
    async def run() -> list[pb.NodeMessage]:
        link = SimpleNamespace(key=_KEY, refresh_privacy=_NO_REPORT, worker=_SlowWorker(),
                               state=LinkState(), cost=0.0,
                               _busy=False,
                               gate=AdmissionGate(NodePolicy(caps=Caps(seconds_per_task=0.2))))
        outbox: asyncio.Queue = asyncio.Queue()
        runner = _TaskRunner(link, outbox)
        started = time.monotonic()
        runner.handle(pb.CoordinatorMessage(task=pb.Task(
            task_id="t1", job_id="j", kind=pb.TRAIN, spec=spec(), round=1)))
        await asyncio.wait_for(runner.job, 5)
        assert time.monotonic() - started < 3
        return [outbox.get_nowait() for _ in range(outbox.qsize())]

    messages = asyncio.run(run())
    failures = [m.failure for m in messages if m.WhichOneof("body") == "failure"]
    assert len(failures) == 1 and failures[0].refused
    assert "seconds_per_task" in failures[0].reason


def test_a_refused_task_is_answered_at_once_and_never_started():
    async def run() -> list[pb.NodeMessage]:
        link = SimpleNamespace(key=_KEY, refresh_privacy=_NO_REPORT, worker=_SlowWorker(),
                               state=LinkState(), cost=0.0,
                               _busy=False,
                               gate=AdmissionGate(NodePolicy(methods=("dp-lora",))))
        outbox: asyncio.Queue = asyncio.Queue()
        runner = _TaskRunner(link, outbox)
        runner.handle(pb.CoordinatorMessage(task=pb.Task(
            task_id="t1", job_id="j", kind=pb.TRAIN, spec=spec(), round=1)))
        assert runner.task is None and runner.job is None
        return [outbox.get_nowait() for _ in range(outbox.qsize())]

    (message,) = asyncio.run(run())
    assert message.failure.refused and message.failure.task_id == "t1"
    assert "fedavg-lora" in message.failure.reason


# ---------------------------------------------------------------- SFPrompt's split-server


_SPLIT_SERVER = pb.Peer(node_id="abc123", name="gpu-box", role="split-server",
                        address="10.0.0.2:7070")


def test_an_sfprompt_task_runs_only_with_a_trusted_split_server(tmp_path):
    """The split-server reads the device's text: the policy key (or the flag) opts in."""
    sfprompt = spec(method="sfprompt")
    request = trainer(sfprompt, peers=(_SPLIT_SERVER,))
    with pytest.raises(Refused) as refused:
        NodePolicy().admit(request)
    reason = str(refused.value)
    # which server, what it would read, and both ways to opt in
    assert "'gpu-box' (abc123)" in reason and "read the node's text" in reason
    assert 'trust_split_servers = ["gpu-box"]' in reason
    assert "--trust-split-server gpu-box" in reason
    NodePolicy(trust_split_servers=("gpu-box",)).admit(request)
    NodePolicy(trust_split_servers=("abc123",)).admit(request)  # or its node id
    with pytest.raises(Refused, match="gpu-box"):
        NodePolicy(trust_split_servers=("other",)).admit(request)
    NodePolicy().admit(trainer(sfprompt))  # INIT: no split-server, nothing read
    NodePolicy().admit(trainer(spec(), peers=()))  # other methods have none
    # from the policy file, and the flag adds to it
    (tmp_path / "policy.toml").write_text('trust_split_servers = ["gpu-box"]\n')
    policy = load_policy(tmp_path)
    assert policy.trust_split_servers == ("gpu-box",)
    policy.admit(request)
    assert NodePolicy.from_mapping(tomllib.loads(to_toml(policy.to_mapping()))) == policy
    both = policy.with_overrides(trust_split_servers=["abc123", "gpu-box"])
    assert both.trust_split_servers == ("gpu-box", "abc123")
    assert NodePolicy().with_overrides(trust_split_servers=["gpu-box"]).trust_split_servers \
        == ("gpu-box",)


def test_an_untrusted_split_server_is_a_refusal_answered_at_once():
    """A refusal like the other policy refusals (``TaskFailure.refused``): the coordinator
    drops this node and records why; the task never starts."""
    async def run() -> list[pb.NodeMessage]:
        link = SimpleNamespace(key=_KEY, refresh_privacy=_NO_REPORT, worker=_SlowWorker(),
                               state=LinkState(), cost=0.0, _busy=False,
                               gate=AdmissionGate(NodePolicy()))
        outbox: asyncio.Queue = asyncio.Queue()
        runner = _TaskRunner(link, outbox)
        runner.handle(pb.CoordinatorMessage(task=pb.Task(
            task_id="t1", job_id="j", kind=pb.TRAIN, spec=spec(method="sfprompt"), round=1,
            has_global=True, peers=[_SPLIT_SERVER])))
        assert runner.task is None and runner.job is None
        return [outbox.get_nowait() for _ in range(outbox.qsize())]

    (message,) = asyncio.run(run())
    assert message.failure.refused and "--trust-split-server gpu-box" in message.failure.reason


# ---------------------------------------------------------------- registration


def test_what_registration_reveals():
    sizes = {"train": 100, "test": 1}
    assert NodePolicy().disclose(sizes) == (sizes, "exact")
    assert NodePolicy(reveal="coarse").disclose(sizes) == ({"train": 128, "test": 1}, "coarse")
    assert NodePolicy(reveal="hidden").disclose(sizes) == ({}, "hidden")


# ---------------------------------------------------------------- the file and the flags


def test_policy_file_round_trip_and_flags(tmp_path):
    (tmp_path / "policy.toml").write_text("""
methods = ["fedavg-lora", "dp-lora"]
private_datasets = ["med"]
reveal = "coarse"
allow_models = ["/srv/models"]

[caps]
rounds_per_job = 10

[datasets.med]
roles = ["trainer"]
""")
    policy = load_policy(tmp_path)
    assert policy.methods == ("fedavg-lora", "dp-lora")
    assert policy.caps.rounds_per_job == 10
    assert policy.caps.concurrent_jobs == Caps().concurrent_jobs
    assert policy.datasets["med"] == DatasetRule(roles=("trainer",))
    again = NodePolicy.from_mapping(tomllib.loads(to_toml(policy.to_mapping())))
    assert again == policy
    flagged = policy.with_overrides(allow_models=["/data/m"], methods=["dp-lora"],
                                    caps={"rounds_per_job": 3, "payload_bytes": None})
    assert flagged.allow_models == ("/srv/models", "/data/m")
    assert flagged.methods == ("dp-lora",) and flagged.caps.rounds_per_job == 3
    assert load_policy(tmp_path / "nowhere") == NodePolicy()  # no file: the safe defaults


@pytest.mark.parametrize("text, match", [
    ("method = []", "unknown policy key"),
    ("methods = ['nope']", "unknown method"),
    ("roles = ['admin']", "unknown role"),
    ("reveal = 'some'", "reveal"),
    ("allow_models = ['relative/dir']", "absolute"),
    ("[caps]\nrounds_per_job = 0", "caps.rounds_per_job"),
    ("[caps]\nseconds_per_task = nan", "caps.seconds_per_task"),
    ("[caps]\nfoo = 1", "unknown cap"),
    ("methods = 'fedavg-lora'", "list of strings"),
    ("this is not toml", "policy.toml"),
    ("trust_split_servers = 'gpu-box'", "list of strings"),
    ("trust_split_servers = ['']", "trust_split_servers"),
    ("trust_split_servers = [' gpu-box']", "surrounding spaces"),
    ("trust_split_server = ['gpu-box']", "unknown policy key"),
])
def test_bad_policy_files_name_the_problem(tmp_path, text, match):
    (tmp_path / "policy.toml").write_text(text)
    with pytest.raises(PolicyError, match=match):
        load_policy(tmp_path)


# ---------------------------------------------------------------- fuzz


def _specs():
    text = st.text(max_size=40)
    return st.builds(
        lambda method, base, dataset, rounds, epochs, max_steps, batch, timeout: job_spec(
            method, base=base, dataset=dataset, rounds=rounds, epochs=epochs,
            max_steps=max_steps, batch_size=batch, round_timeout_s=timeout),
        st.sampled_from(["fedavg-lora", "dp-lora", "dimat", "sfprompt", "", "x"]) | text,
        st.sampled_from(["tiny-bert", "/", "/a/../b", "..", "~", "/tmp"]) | text,
        st.sampled_from(["train", "med", ""]) | text,
        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1), st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=_specs(), size=st.one_of(st.none(), st.integers(0, 2**40)),
       payload=st.integers(0, 2**40), role=st.sampled_from(
           ["trainer", "split-server", "peer-merging", "minions", "private-inference", "?"]))
def test_admission_never_crashes(tmp_path_factory, s, size, payload, role):
    policy = NodePolicy(allow_models=(os.path.realpath("/tmp"),), private_datasets=("med",),
                        caps=Caps(rounds_per_job=50))
    try:
        AdmissionGate(policy).admit(TaskRequest(role=role, spec=s, job_id="j",
                                                dataset_size=size, payload_bytes=payload))
    except Refused as exc:
        assert str(exc)


class _FastWorker(_SlowWorker):
    def train(self, task, payload, progress, cancelled):
        return b"", 16, {}


def test_a_job_stops_counting_after_its_last_round():
    async def run(rounds: int) -> AdmissionGate:
        gate = AdmissionGate(NodePolicy(caps=Caps(concurrent_jobs=1)))
        link = SimpleNamespace(key=_KEY, refresh_privacy=_NO_REPORT, worker=_FastWorker(),
                               state=LinkState(), cost=0.0,
                               _busy=False, gate=gate)
        runner = _TaskRunner(link, asyncio.Queue())
        runner.handle(pb.CoordinatorMessage(task=pb.Task(
            task_id="t1", job_id="j", kind=pb.TRAIN, spec=spec(rounds=rounds), round=1)))
        await asyncio.wait_for(runner.job, 5)
        return gate

    with pytest.raises(Refused, match="concurrent_jobs"):  # round 1 of 2: still running
        asyncio.run(run(2)).admit(trainer(spec(), job_id="other"))
    asyncio.run(run(1)).admit(trainer(spec(), job_id="other"))  # its last round: done
