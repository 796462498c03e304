"""The node owner's policy: what this node agrees to run, checked before any task starts.

The coordinator relays job specs written by whoever may submit; the data owner is someone
else, so consent is enforced here, where the data is. One admission function
(``AdmissionGate.admit``) is called from every entry point: the coordinator's tasks (TRAIN,
INIT, MERGE, MINION in ``node/session.py``), split-server sessions
(``node/split/transport.py``), peer model fetches (``node/peer.py``) and private inference
sessions (``node/private_inference.py``). A refusal raises ``Refused``; the entry point sends
its reason back (``TaskFailure.refused`` or a gRPC PERMISSION_DENIED), never a silent drop.

The policy lives in ``<data>/policy.toml`` (format and defaults in the README, "Security: who
controls what"); ``confide node serve`` flags override it for the common cases, and
``confide node policy show`` prints the result. The defaults are safe: packaged models only,
every method the project ships, caps that fit a laptop.

The privacy *budget* a node spends on DP jobs is ``privacy/budget.py``'s; this module only
says which datasets are private (``private_datasets``: non-DP methods are refused on them).
Which split-servers the owner trusts with the node's text (``trust_split_servers``, SFPrompt's
opt-in) is said here too; what that trust means is ``node/split/trust.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confide.node.methods import REGISTRY, get_method
from confide.node.split.trust import untrusted_split_server
from confide.protos.bases import PACKAGED_BASES, base_problem
from confide.v1 import coordinator_pb2 as pb

POLICY_FILE = "policy.toml"
#: what a node may take part in; the roles of a task: a federated TRAIN or INIT is "trainer",
#: both phases of a decentralized job (DIMAT) "peer-merging", a MINION task "minions"
ROLES = ("trainer", "split-server", "peer-merging", "private-inference", "minions")
#: the "dataset" Minions read: the documents in <data>/docs
DOCS_DATASET = "docs"
#: methods whose updates are differentially private: the only ones a private dataset takes
DP_METHODS = frozenset({"dp-lora"})
#: what registration reveals of the datasets: as they are, sizes rounded up to a power of
#: two, or nothing (no names, no sizes)
REVEAL = ("exact", "coarse", "hidden")
#: a job counts towards ``concurrent_jobs`` until the node finished its last round's task, or
#: no task of it came for this long (the node is not told when a job fails or is cancelled)
JOB_IDLE_S = 600.0


class Refused(Exception):
    """The node's policy refuses the request; the message says which rule and how to change
    it (for the submitter and the node's owner)."""


class PolicyError(ValueError):
    """The policy file or flags are invalid (a daemon refuses to start with it)."""


@dataclass(frozen=True)
class Caps:
    """Resource caps: a task over one is refused, never truncated silently."""

    #: optimizer steps a TRAIN task may take (epochs x batches, or the job's max_steps)
    local_steps_per_round: int = 1000
    #: a job asking for more rounds is refused at its first task
    rounds_per_job: int = 200
    #: distinct examples one TRAIN task may use
    examples_per_round: int = 100_000
    #: wall-clock seconds a task may run; a longer one is stopped and reported as refused
    seconds_per_task: float = 3600.0
    #: bytes a task may bring in (the global state, Minions instructions)
    payload_bytes: int = 1 << 30
    #: distinct jobs the node works for at once (from its first task of a job until the
    #: coordinator says the job ended, or JOB_IDLE_S without a task of it)
    concurrent_jobs: int = 4

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0):
                raise PolicyError(f"caps.{f.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class DatasetRule:
    """Per-dataset overrides: which methods and roles may use this dataset (None: the
    node-wide lists)."""

    methods: tuple[str, ...] | None = None
    roles: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskRequest:
    """What an entry point asks the policy: a role, and the job it is for (when there is one)."""

    role: str
    spec: pb.JobSpec | None = None
    job_id: str = ""
    #: the dataset the task trains on (None: the spec's, or none for roles without data)
    dataset: str | None = None
    #: examples in that dataset here (TRAIN tasks: the step and example caps need it)
    dataset_size: int | None = None
    #: bytes the task brings in
    payload_bytes: int = 0
    #: the parties the task works with (SFPrompt: its split-server, which reads the text)
    peers: tuple[pb.Peer, ...] = ()


@dataclass(frozen=True)
class NodePolicy:
    """What this node agrees to. ``allow_models`` are folders (a base path is allowed when it
    resolves, symlinks followed, to one of them or inside one)."""

    packaged_models: tuple[str, ...] = PACKAGED_BASES
    allow_models: tuple[str, ...] = ()
    methods: tuple[str, ...] = tuple(REGISTRY)
    roles: tuple[str, ...] = ROLES
    datasets: Mapping[str, DatasetRule] = field(default_factory=dict)
    private_datasets: tuple[str, ...] = ()
    caps: Caps = Caps()
    reveal: str = "exact"
    #: split-servers (their names or node ids) the owner trusts with this node's text: an
    #: SFPrompt task paired with any other one is refused (node/split/trust.py)
    trust_split_servers: tuple[str, ...] = ()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> NodePolicy:
        """From a parsed policy file; PolicyError names the first bad key or value."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy key(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key in ("packaged_models", "allow_models", "methods", "roles", "private_datasets",
                    "trust_split_servers"):
            if key in data:
                kwargs[key] = _strings(data[key], key)
        if "reveal" in data:
            kwargs["reveal"] = data["reveal"]
        if "caps" in data:
            caps = _table(data["caps"], "caps")
            names = {f.name for f in dataclasses.fields(Caps)}
            bad = sorted(set(caps) - names)
            if bad:
                raise PolicyError(f"unknown cap(s) {bad}; known: {sorted(names)}")
            kwargs["caps"] = Caps(**caps)
        if "datasets" in data:
            rules = {}
            for name, rule in _table(data["datasets"], "datasets").items():
                rule = _table(rule, f"datasets.{name}")
                bad = sorted(set(rule) - {"methods", "roles"})
                if bad:
                    raise PolicyError(f"datasets.{name}: unknown key(s) {bad}; known: "
                                      "methods, roles")
                rules[name] = DatasetRule(
                    methods=_strings(rule["methods"], f"datasets.{name}.methods")
                    if "methods" in rule else None,
                    roles=_strings(rule["roles"], f"datasets.{name}.roles")
                    if "roles" in rule else None)
            kwargs["datasets"] = rules
        policy = cls(**kwargs)
        policy.check()
        return policy

    @classmethod
    def load(cls, path: Path | str) -> NodePolicy:
        """The policy in ``path`` (TOML, or JSON when it ends in .json); the defaults when
        the file does not exist."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PolicyError(f"{path}: {exc}") from None
        try:
            return cls.from_mapping(data)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    def with_overrides(self, *, allow_models: Iterable[str] = (),
                       methods: Iterable[str] | None = None, roles: Iterable[str] | None = None,
                       private_datasets: Iterable[str] = (), reveal: str | None = None,
                       caps: Mapping[str, Any] | None = None,
                       trust_split_servers: Iterable[str] = ()) -> NodePolicy:
        """The policy with command-line flags applied: folders, private datasets and trusted
        split-servers are added, methods/roles/reveal replace, caps given are replaced one by
        one."""
        policy = dataclasses.replace(
            self,
            allow_models=_unique((*self.allow_models, *allow_models)),
            methods=tuple(methods) if methods is not None else self.methods,
            roles=tuple(roles) if roles is not None else self.roles,
            private_datasets=_unique((*self.private_datasets, *private_datasets)),
            reveal=reveal or self.reveal,
            trust_split_servers=_unique((*self.trust_split_servers, *trust_split_servers)),
            caps=dataclasses.replace(self.caps, **{k: v for k, v in (caps or {}).items()
                                                   if v is not None}),
        )
        policy.check()
        return policy

    def check(self) -> None:
        """PolicyError when a name is unknown or a value out of range."""
        for name in self.packaged_models:
            if name not in PACKAGED_BASES:
                raise PolicyError(f"packaged_models: {name!r} is not a packaged model "
                                  f"({', '.join(PACKAGED_BASES)})")
        for folder in self.allow_models:
            if not os.path.isabs(os.path.expanduser(folder)):
                raise PolicyError(f"allow_models: {folder!r} must be an absolute path")
        rules = [("", DatasetRule(self.methods, self.roles)), *self.datasets.items()]
        for where, rule in rules:
            prefix = f"datasets.{where}." if where else ""
            for method in rule.methods or ():
                if method not in REGISTRY:
                    raise PolicyError(f"{prefix}methods: unknown method {method!r}; known: "
                                      f"{', '.join(REGISTRY)}")
            for role in rule.roles or ():
                if role not in ROLES:
                    raise PolicyError(f"{prefix}roles: unknown role {role!r}; known: "
                                      f"{', '.join(ROLES)}")
        for name in self.trust_split_servers:
            if not name.strip() or name != name.strip():
                raise PolicyError(f"trust_split_servers: {name!r} must be a split-server's "
                                  "name or node id, without surrounding spaces")
        if self.reveal not in REVEAL:
            raise PolicyError(f"reveal must be one of {', '.join(REVEAL)}, got {self.reveal!r}")
        self.caps.check()

    def to_mapping(self) -> dict[str, Any]:
        """The effective policy as plain data (what ``confide node policy show`` prints)."""
        return {
            "packaged_models": list(self.packaged_models),
            "allow_models": list(self.allow_models),
            "methods": list(self.methods),
            "roles": list(self.roles),
            "private_datasets": list(self.private_datasets),
            "reveal": self.reveal,
            "trust_split_servers": list(self.trust_split_servers),
            "caps": dataclasses.asdict(self.caps),
            "datasets": {name: {k: list(v) for k, v in dataclasses.asdict(rule).items()
                                if v is not None}
                         for name, rule in self.datasets.items()},
        }

    # ------------------------------------------------------------------ admission

    def admit(self, request: TaskRequest) -> None:
        """Raise Refused unless this node agrees to ``request``: its role, then (for a job)
        its method on its dataset, its split-server, its base model and the caps."""
        spec = request.spec
        dataset = request.dataset
        if dataset is None:
            dataset = (spec.train.dataset or "train") if spec is not None else ""
        rule = self.datasets.get(dataset, DatasetRule()) if dataset else DatasetRule()
        roles = rule.roles if rule.roles is not None else self.roles
        on = f" on dataset {dataset!r}" if dataset else ""
        if request.role not in roles:
            raise Refused(f"this node does not take part as {request.role}{on} (its policy "
                          f"allows: {', '.join(roles) or 'nothing'})")
        if request.payload_bytes > self.caps.payload_bytes:
            raise Refused(f"the task brings {request.payload_bytes} bytes, over this node's "
                          f"cap of {self.caps.payload_bytes} (caps.payload_bytes)")
        if spec is None:
            return
        methods = rule.methods if rule.methods is not None else self.methods
        if spec.method not in methods:
            raise Refused(f"this node does not run method {spec.method!r}{on} (its policy "
                          f"allows: {', '.join(methods) or 'nothing'})")
        if dataset in self.private_datasets and not _differentially_private(spec.method):
            raise Refused(f"dataset {dataset!r} is private on this node: only differentially "
                          f"private methods ({', '.join(sorted(DP_METHODS))}) may use it, "
                          f"not {spec.method!r}")
        untrusted = untrusted_split_server(request.peers, self.trust_split_servers)
        if untrusted:
            raise Refused(untrusted)
        self.check_base(spec.model.base)
        if spec.rounds > self.caps.rounds_per_job:
            raise Refused(f"the job asks for {spec.rounds} rounds, over this node's cap of "
                          f"{self.caps.rounds_per_job} (caps.rounds_per_job)")
        if request.dataset_size is not None:
            self._check_training(spec.train, request.dataset_size)

    def _check_training(self, train: pb.TrainSpec, size: int) -> None:
        """The step and example caps of a TRAIN task, from the job's train spec and the size
        of the local dataset (what the trainer would do, computed before it starts)."""
        batch = max(int(train.batch_size), 1)
        steps = max(int(train.local_epochs), 1) * math.ceil(size / batch)
        if train.max_steps:
            steps = min(steps, int(train.max_steps))
        if steps > self.caps.local_steps_per_round:
            raise Refused(f"the task would take {steps} local steps, over this node's cap of "
                          f"{self.caps.local_steps_per_round} per round "
                          "(caps.local_steps_per_round); a job can set train.max_steps")
        examples = min(size, steps * batch)
        if examples > self.caps.examples_per_round:
            raise Refused(f"the task would use {examples} examples, over this node's cap of "
                          f"{self.caps.examples_per_round} per round "
                          "(caps.examples_per_round)")

    def check_base(self, base: str) -> None:
        """Refused unless ``base`` is an allowed packaged model, or a path that resolves
        (symlinks followed) to an allowed folder or inside one."""
        if base in PACKAGED_BASES:
            if base not in self.packaged_models:
                raise Refused(f"this node does not load the packaged model {base!r} (its "
                              f"policy allows: {', '.join(self.packaged_models) or 'none'})")
            return
        problem = base_problem(base)
        if problem:
            raise Refused(f"model.base {problem}")
        resolved = os.path.realpath(base)
        for folder in self.allow_models:
            allowed = os.path.realpath(os.path.expanduser(folder))
            if resolved == allowed or resolved.startswith(allowed.rstrip(os.sep) + os.sep):
                return
        via = f" (it resolves to {resolved!r})" if resolved != os.path.normpath(base) else ""
        raise Refused(f"model.base {base[:200]!r}{via} is not in a folder this node's owner "
                      "allowed (--allow-model DIR / allow_models)")

    # ------------------------------------------------------------------ registration

    def disclose(self, datasets: Mapping[str, int]) -> tuple[dict[str, int], str]:
        """What registration reveals of ``datasets`` (name -> size), and how it was coarsened."""
        if self.reveal == "hidden":
            return {}, "hidden"
        if self.reveal == "coarse":
            return {name: _power_of_two_at_least(size) for name, size in datasets.items()}, \
                "coarse"
        return dict(datasets), "exact"


def task_role(task: pb.Task) -> str:
    """The role a coordinator's task asks the node to play."""
    if task.kind == pb.MINION:
        return "minions"
    try:
        decentralized = get_method(task.spec.method).decentralized
    except ValueError:
        raise Refused(f"unknown method {task.spec.method[:80]!r}") from None
    return "peer-merging" if decentralized else "trainer"


class AdmissionGate:
    """The one admission function of the daemon: the policy's rules plus the state they need
    (which jobs the node works for now, for ``caps.concurrent_jobs``). Thread-safe."""

    def __init__(self, policy: NodePolicy, clock=time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._jobs: dict[str, float] = {}
        self._lock = threading.Lock()

    def admit(self, request: TaskRequest) -> None:
        """Raise Refused unless the policy agrees; an admitted job counts as running."""
        self.policy.admit(request)
        if not request.job_id:
            return
        with self._lock:
            now = self._clock()
            self._jobs = {j: t for j, t in self._jobs.items() if now - t < JOB_IDLE_S}
            cap = self.policy.caps.concurrent_jobs
            if request.job_id not in self._jobs and len(self._jobs) >= cap:
                raise Refused(f"this node already works for {len(self._jobs)} job(s), its cap "
                              f"(caps.concurrent_jobs = {cap}); retry when one ends")
            self._jobs[request.job_id] = now

    def finished(self, job_id: str) -> None:
        """The job ended (or the node gave up on it): it no longer counts."""
        with self._lock:
            self._jobs.pop(job_id, None)


def load_policy(data_dir: Path | str, path: Path | str | None = None) -> NodePolicy:
    """The policy file of a node (``<data>/policy.toml`` unless ``path`` names another)."""
    return NodePolicy.load(path if path else Path(data_dir) / POLICY_FILE)


def to_toml(data: Mapping[str, Any]) -> str:
    """The policy as TOML (plain keys first, then tables), readable back by ``tomllib``."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    while tables:
        name, table = tables.pop(0)
        plain = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        if plain or not table:
            lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in plain.items())]
        tables[:0] = [(f"{name}.{json.dumps(k) if not k.isidentifier() else k}", v)
                      for k, v in table.items() if isinstance(v, Mapping)]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _differentially_private(method: str) -> bool:
    if method in DP_METHODS:
        return True
    try:
        return bool(getattr(get_method(method), "differentially_private", False))
    except ValueError:
        return False


def _power_of_two_at_least(n: int) -> int:
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{key} must be a table, got {value!r}")
    return dict(value)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
