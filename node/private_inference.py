"""Private inference, the model owner's side: which models a node serves, and the sessions.

A node serves the AERO-family models (``node.aero``) found in ``<data dir>/private/`` as
``<name>.safetensors`` files written by :func:`node.aero.save_aero` (or :func:`publish_model` /
:func:`export_model`, which add the tokenizer the data owner should use and, for the max-free
softmax, the model's checked score bound). Only safetensors are read, never a pickle.

``OpenPrivateInference`` (``node.peer``) lands in :meth:`PrivateInference.open`: the request is
checked (a known model, ``1 <= seq_len <= max_len``, provider TFP or TTP, a sane timeout), a free
port is taken on the node's peer host, and the node's MPC party starts as a fresh process
(``python -m confide.node.private_party``: CrypTen keeps global state and must never run inside the
daemon's asyncio process). The reply tells the data owner where the parties meet and the
model's public configuration. The request carries no input and the reply no weights: both
travel only as secret shares between the two party processes, over torch.distributed (gloo).

Who is rank 0 (see also README, "Private inference"):

* The **data owner is rank 0**, the node's party rank 1, under both providers. Under CrypTen's
  default provider (TFP, trusted *first* party) rank 0 generates every Beaver triple, so it knows
  the masks; the values opened in each multiplication (``x - a``, ``W - b``) then reveal to it
  the other party's operands. Making the data owner rank 0 keeps the product's promise (the
  node learns nothing about the input: it only ever sees values masked by triples it does not
  know) at the model owner's expense: under TFP a semi-honest data owner that kept its masks
  could reconstruct the weights from the openings. A model owner that serves TFP sessions trusts
  its clients with its weights. TFP also does not count the offline (triple) cost at all: it is
  CrypTen's benchmarking mode.
* Under TTP a dealer (rank 2) generates the triples; neither computing party knows the masks.
  In this implementation the *data owner's client* starts the dealer as a separate local
  process (so the cost of the trusted-third-party mode is measured end to end); since that
  dealer runs on the data owner's machine, the model owner is no better protected than under
  TFP unless the dealer is moved to a third, non-colluding machine (``python -m
  node.private_party dealer``), which a real deployment must do. The TTP request channel (small
  pickled dicts in CrypTen) runs between rank 0 and the dealer only, never through the node.
* torch.distributed's rendezvous store normally lives in rank 0. Here the node's party hosts it
  (at the port the node chose, on its own host) and every rank connects to it as a client
  (``TORCHELASTIC_USE_AGENT_STORE``): the data owner needs no open port for the rendezvous.
  Gloo itself still connects the parties pairwise, so the data owner's machine must be
  reachable from the node's (set ``GLOO_SOCKET_IFNAME`` on machines with several interfaces).

Everything is semi-honest (honest-but-curious) security, as CrypTen provides: a party that
deviates from the protocol is not detected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from safetensors import safe_open

from confide.node.policy import AdmissionGate, NodePolicy, Refused, TaskRequest
from confide.v1 import node_pb2

log = logging.getLogger(__name__)

__all__ = [
    "DATA_OWNER_RANK",
    "DEFAULT_TIMEOUT_S",
    "MAX_SESSIONS",
    "MODEL_OWNER_RANK",
    "PrivateInference",
    "PrivateInferenceError",
    "PrivateModelRegistry",
    "ServableModel",
    "TokenizerSpec",
    "export_model",
    "publish_model",
]

METADATA_KEY = "confide.aero.config"  # node.aero's metadata key (read without importing torch)
TOKENIZER_KEY = "confide.aero.tokenizer"
BOUND_KEY = "confide.aero.softmax_bound"  # node.aero_bound.BOUND_KEY (a test checks they agree)
PROVIDERS = ("TFP", "TTP")
ARCH_KEYS = (
    "vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "layernorm",
    "activation", "ffn", "normalization", "tie_embeddings", "ln_eps",
)  # privacy.aero_2pc.ARCH_KEYS (a test checks they agree)

DATA_OWNER_RANK = 0
MODEL_OWNER_RANK = 1
TTP_DEALER_RANK = 2
MAX_SESSIONS = 2
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0
MAX_SESSION_S = 1800.0
KEEP_SESSION_FILES = 200
AUDIT_ENV = "CONFIDE_PRIVATE_AUDIT"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROOT = Path(__file__).resolve().parent.parent


class PrivateInferenceError(Exception):
    """A request the node refuses, with the gRPC status code the peer service answers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Tokenizers named in the public config


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer the data owner runs on its text, and how its ids map to the model's.

    ``name``: ``"minilm"`` (MiniLM's WordPiece, on disk offline) or a local tokenizer folder.
    ``ids``: optional, the tokenizer ids of the model's vocabulary in order (model id ``i`` is
    tokenizer id ``ids[i]``), for models trained on a compact vocabulary (a smaller one-hot
    input and embedding matrix cost fewer bytes under MPC); other tokenizer ids map to model id
    ``unk``. Without ``ids`` the model's vocabulary is the tokenizer's. Public, like the config.
    """

    name: str
    ids: tuple[int, ...] | None = None
    unk: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.ids is not None:
            out |= {"ids": list(self.ids), "unk": self.unk}
        return out

    @classmethod
    def from_dict(cls, data: Any, vocab_size: int | None = None) -> TokenizerSpec:
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) \
                or not data["name"]:
            raise ValueError("tokenizer must be an object with a non-empty 'name'")
        unknown = set(data) - {"name", "ids", "unk"}
        if unknown:
            raise ValueError(f"tokenizer has unknown field(s) {sorted(unknown)}")
        ids = data.get("ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError("tokenizer.ids must be a list of non-negative integers")
            if len(set(ids)) != len(ids):
                raise ValueError("tokenizer.ids must not repeat an id")
            if vocab_size is not None and len(ids) != vocab_size:
                raise ValueError(f"tokenizer.ids lists {len(ids)} ids, the model's vocabulary "
                                 f"has {vocab_size}")
            ids = tuple(ids)
        unk = data.get("unk", 0)
        if not isinstance(unk, int) or isinstance(unk, bool) or unk < 0 or (
                ids is not None and unk >= len(ids)):
            raise ValueError(f"tokenizer.unk must index the model's vocabulary, got {unk!r}")
        return cls(data["name"], ids, unk)


# --------------------------------------------------------------------------------------------
# The registry of servable models


@dataclass(frozen=True)
class ServableModel:
    name: str
    path: Path
    config: dict[str, Any]  # AeroConfig.to_dict() as stored
    tokenizer: TokenizerSpec | None = None
    softmax_bound: float | None = None  # node.aero_bound: the max-free softmax's public bound

    @property
    def max_len(self) -> int:
        return int(self.config["max_len"])

    def arch(self) -> dict[str, Any]:
        """What both parties run: the architecture, and the softmax bound when there is one
        (``privacy.aero_2pc`` then uses the max-free softmax)."""
        arch = {key: self.config[key] for key in ARCH_KEYS}
        if self.softmax_bound is not None:
            arch["softmax_bound"] = self.softmax_bound
        return arch

    def public_config(self) -> dict[str, Any]:
        """What the data owner learns: the architecture, the name and the tokenizer."""
        return self.arch() | {"name": self.name, "tokenizer": (
            self.tokenizer.to_dict() if self.tokenizer is not None else None)}


def _read_model(name: str, path: Path) -> ServableModel:
    """Read and check a model file's header (metadata, tensor names and shapes), no weights."""
    from confide.node.aero import AeroConfig, AeroModel  # torch: only once a model is looked at

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    if METADATA_KEY not in metadata:
        raise ValueError(f"no {METADATA_KEY} metadata (save it with node.aero.save_aero)")
    config = AeroConfig.from_dict(json.loads(metadata[METADATA_KEY]))
    import torch

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AeroModel(config).state_dict().items()}
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))[:3]
        extra = sorted(set(shapes) - set(expected))[:3]
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])[:3]
        raise ValueError(f"tensors do not match the config (missing {missing}, unexpected "
                         f"{extra}, wrong shape {wrong})")
    tokenizer = None
    if TOKENIZER_KEY in metadata:
        tokenizer = TokenizerSpec.from_dict(json.loads(metadata[TOKENIZER_KEY]),
                                            config.vocab_size)
    return ServableModel(name, path, config.to_dict(), tokenizer, softmax_bound_of(metadata))


def softmax_bound_of(metadata: Mapping[str, str]) -> float | None:
    """The model file's softmax bound (``node.aero_bound``), None when it carries none."""
    if BOUND_KEY not in metadata:
        return None
    from confide.node.aero_bound import ScoreBound

    return ScoreBound.from_json(metadata[BOUND_KEY]).bound


class PrivateModelRegistry:
    """The models in one folder (``<data dir>/private``), read lazily and cached by file stamp."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, tuple[tuple[int, int], ServableModel]] = {}
        self._bad: dict[str, tuple[tuple[int, int], str]] = {}  # logged once per file version
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
            raise PrivateInferenceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model name {name!r} is not valid: 1-64 characters, letters, digits, '.', '_', "
                "'-', starting with a letter or digit")
        return self.folder / f"{name}.safetensors"

    def get(self, name: str) -> ServableModel:
        path = self.path(name)
        try:
            stat = path.stat()
        except OSError:
            names = ", ".join(m.name for m in self.list()) or "none"
            raise PrivateInferenceError(
                grpc.StatusCode.NOT_FOUND,
                f"this node serves no private model {name!r} (it serves: {names})") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        with self._lock:
            bad = self._bad.get(name)
        if bad is None or bad[0] != stamp:
            try:
                model = _read_model(name, path)
            except Exception as exc:  # a corrupt or foreign file: refuse it, keep serving
                log.warning("private model %s is not servable: %s", path, exc)
                bad = (stamp, str(exc))
                with self._lock:
                    self._bad[name] = bad
            else:
                with self._lock:
                    self._cache[name] = (stamp, model)
                    self._bad.pop(name, None)
                return model
        raise PrivateInferenceError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"private model {name!r} on this node is not servable: "
                                    f"{bad[1]}")

    def list(self) -> list[ServableModel]:
        if not self.folder.is_dir():
            return []
        models = []
        for path in sorted(self.folder.glob("*.safetensors")):
            name = path.name[: -len(".safetensors")]
            with contextlib.suppress(PrivateInferenceError):
                models.append(self.get(name))
        return models


def publish_model(model: Any, data_dir: Path | str, name: str,
                  tokenizer: TokenizerSpec | None = None, *, softmax_bound: Any = None,
                  calibration: Any = None) -> Path:
    """Save an :class:`node.aero.AeroModel` where a node serves it: ``<data_dir>/private/``
    (:func:`export_model` into the node's registry folder, under a checked name)."""
    path = PrivateModelRegistry(Path(data_dir) / "private").path(name)
    return export_model(model, path, tokenizer, softmax_bound=softmax_bound,
                        calibration=calibration)


def export_model(model: Any, path: Path | str, tokenizer: TokenizerSpec | None = None, *,
                 softmax_bound: Any = None, calibration: Any = None) -> Path:
    """Write an :class:`node.aero.AeroModel` as a servable file (copy it into a node's
    ``private/`` folder to serve it).

    Same file format as :func:`node.aero.save_aero` (``load_aero`` reads it), plus the public
    tokenizer spec in the metadata so a data owner can send text. With ``softmax_bound`` (a
    ``node.aero_bound.ScoreBound``) the model is exported for the max-free softmax: the bound
    is checked on ``calibration`` (token sequences, required; ``ScoreBoundError`` when the
    model's scores exceed it) and stored with the weights.
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = model.config.to_dict()
    metadata = {METADATA_KEY: json.dumps(config), "format": "pt"}
    if tokenizer is not None:
        TokenizerSpec.from_dict(tokenizer.to_dict(), config["vocab_size"])  # validate
        metadata[TOKENIZER_KEY] = json.dumps(tokenizer.to_dict())
    if softmax_bound is not None:
        from confide.node.aero_bound import check_score_bound

        if not calibration:
            raise ValueError("exporting a softmax bound needs calibration text to check it on")
        check_score_bound(model, softmax_bound, calibration)
        metadata[BOUND_KEY] = softmax_bound.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Sessions


def _split_host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host


def _free_port(host: str) -> int:
    bind = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bind, 0))
        return sock.getsockname()[1]


@dataclass
class _Session:
    session_id: str
    model: str
    provider: str
    seq_len: int
    process: subprocess.Popen
    port: int
    status_path: Path
    log_path: Path
    started: float = field(default_factory=time.monotonic)


def read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class PrivateInference:
    """The node's private-inference service: its registry and its party processes."""

    def __init__(self, folder: Path | str, *, bind_host: str = "127.0.0.1",
                 advertise_host: str = "", max_sessions: int = MAX_SESSIONS,
                 default_timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_session_s: float = MAX_SESSION_S, audit: bool | None = None,
                 gate: AdmissionGate | None = None) -> None:
        self.registry = PrivateModelRegistry(folder)
        #: the node owner's policy (role "private-inference")
        self.gate = gate or AdmissionGate(NodePolicy())
        self.sessions_dir = Path(folder) / "sessions"
        self.bind_host = bind_host or "0.0.0.0"
        self.advertise_host = advertise_host or self.bind_host
        self.max_sessions = max_sessions
        self.default_timeout_s = default_timeout_s
        self.max_session_s = max_session_s
        #: record what the node's party receives (its shares and every opened value) to
        #: sessions/<id>.audit.safetensors, for audits and tests (env CONFIDE_PRIVATE_AUDIT=1)
        self.audit = os.environ.get(AUDIT_ENV, "") not in ("", "0") if audit is None else audit
        self._active: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ---- RPCs

    def list_models(self) -> node_pb2.ListPrivateModelsResponse:
        return node_pb2.ListPrivateModelsResponse(models=[
            node_pb2.PrivateModel(name=m.name, config_json=json.dumps(m.public_config()))
            for m in self.registry.list()])

    def open(self, request: node_pb2.PrivateInferenceRequest) -> node_pb2.PrivateInferenceSession:
        try:
            self.gate.admit(TaskRequest(role="private-inference"))
        except Refused as exc:
            raise PrivateInferenceError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        provider = request.provider or "TFP"
        if provider not in PROVIDERS:
            raise PrivateInferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"provider {request.provider!r} is not one of "
                                        f"{', '.join(PROVIDERS)}")
        timeout_s = float(request.timeout_s) or self.default_timeout_s
        if not 1.0 <= timeout_s <= MAX_TIMEOUT_S:  # also rejects NaN
            raise PrivateInferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"timeout_s must be 0 (the node's default, "
                                        f"{self.default_timeout_s:g}s) or within [1, "
                                        f"{MAX_TIMEOUT_S:g}], got {request.timeout_s:g}")
        if not request.model:
            raise PrivateInferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                                        "model is required (ListPrivateModels lists them)")
        model = self.registry.get(request.model)
        if not 1 <= request.seq_len <= model.max_len:
            raise PrivateInferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"seq_len must be in [1, {model.max_len}] for model "
                                        f"{model.name!r}, got {request.seq_len}")
        with self._lock:
            if self._closed:
                raise PrivateInferenceError(grpc.StatusCode.UNAVAILABLE,
                                            "this node is shutting down")
            self._reap_locked()
            if len(self._active) >= self.max_sessions:
                raise PrivateInferenceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this node already runs {len(self._active)} private inference session(s),"
                    f" its limit; retry when one finishes")
            session = self._start(model, request.seq_len, provider, timeout_s)
            self._active[session.session_id] = session
        threading.Thread(target=self._watch, args=(session, timeout_s), daemon=True,
                         name=f"private-{session.session_id}").start()
        host = self.advertise_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return node_pb2.PrivateInferenceSession(
            session_id=session.session_id, rendezvous=f"tcp://{host}:{session.port}",
            world_size=3 if provider == "TTP" else 2, data_owner_rank=DATA_OWNER_RANK,
            model_owner_rank=MODEL_OWNER_RANK, config_json=json.dumps(model.public_config()),
            seq_len=request.seq_len, provider=provider, timeout_s=timeout_s)

    # ---- party processes

    def _start(self, model: ServableModel, seq_len: int, provider: str,
               timeout_s: float) -> _Session:
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self._prune_files()
        session_id = secrets.token_hex(8)
        status_path = self.sessions_dir / f"{session_id}.json"
        log_path = self.sessions_dir / f"{session_id}.log"
        port = _free_port(self.bind_host)
        args = [sys.executable, "-m", "confide.node.private_party", "model-owner",
                "--session-id", session_id, "--model-file", str(model.path),
                "--arch-json", json.dumps(model.arch()), "--seq-len", str(seq_len),
                "--provider", provider, "--timeout", repr(timeout_s),
                "--bind", self.bind_host.strip("[]"), "--port", str(port),
                "--rank", str(MODEL_OWNER_RANK), "--data-owner-rank", str(DATA_OWNER_RANK),
                "--status", str(status_path)]
        if self.audit:
            args += ["--audit", str(self.sessions_dir / f"{session_id}.audit.safetensors")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log_file:
            try:
                process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                           start_new_session=True)
            except OSError as exc:
                raise PrivateInferenceError(grpc.StatusCode.INTERNAL,
                                            f"cannot start the node's MPC party: {exc}") from exc
        log.info("private inference session %s: model %s, seq_len %d, provider %s, party pid "
                 "%d on port %d", session_id, model.name, seq_len, provider, process.pid, port)
        return _Session(session_id, model.name, provider, seq_len, process, port, status_path,
                        log_path)

    def _watch(self, session: _Session, timeout_s: float) -> None:
        """Wait for the party (reaping it), enforce a session deadline, log the outcome."""
        try:
            code = session.process.wait(timeout=self.max_session_s)
        except subprocess.TimeoutExpired:
            log.warning("private inference session %s ran past %gs: stopping its party",
                        session.session_id, self.max_session_s)
            session.process.kill()
            code = session.process.wait()
        with self._lock:
            self._active.pop(session.session_id, None)
        status = read_status(session.status_path)
        elapsed = time.monotonic() - session.started
        if code == 0 and status.get("state") == "done":
            stats = status.get("stats", {})
            log.info("private inference session %s (model %s, T=%d, %s) done in %.1fs: "
                     "forward %.2fs, %s rounds, %.1f MB (node's party)", session.session_id,
                     session.model, session.seq_len, session.provider, elapsed,
                     status.get("forward_s", float("nan")), stats.get("rounds", "?"),
                     stats.get("bytes", 0) / 1e6)
        else:
            reason = status.get("error")
            if not reason and code < 0:
                try:
                    reason = f"its party was killed by {signal.Signals(-code).name}"
                except ValueError:
                    reason = f"its party was killed by signal {-code}"
            reason = reason or _tail(session.log_path) or f"exit code {code}"
            log.warning("private inference session %s (model %s) failed after %.1fs: %s "
                        "(log: %s)", session.session_id, session.model, elapsed, reason,
                        session.log_path)

    def _reap_locked(self) -> None:
        for session_id, session in list(self._active.items()):
            if session.process.poll() is not None:
                self._active.pop(session_id, None)

    def _prune_files(self) -> None:
        files = sorted(self.sessions_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        active = set(self._active)
        for path in files[: max(0, len(files) - KEEP_SESSION_FILES)]:
            if path.name.split(".")[0] not in active:
                path.unlink(missing_ok=True)

    def active_sessions(self) -> list[str]:
        with self._lock:
            self._reap_locked()
            return list(self._active)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every running party (the daemon is shutting down)."""
        with self._lock:
            self._closed = True
            sessions = list(self._active.values())
        for session in sessions:
            if session.process.poll() is None:
                session.process.terminate()
        deadline = time.monotonic() + timeout
        for session in sessions:
            try:
                session.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                session.process.kill()
                session.process.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
