"""The secure two-party computation engine: CrypTen set up, one session per party,
communication accounting, timeouts.

Everything else in Confide talks to this module in torch tensors, plain dicts and our own small
types (:class:`MpcParty`, :class:`CommStats`, :class:`MpcError`), so the engine can be swapped
without touching a caller. Pure building block: no daemons, nothing from ``node``; the party
processes (a node daemon and a client, or two test processes) open a session each.

What is here (the engine; the model evaluated on it, AERO's decoder, is ``privacy.aero_2pc``):

* :func:`import_crypten` - imports ``crypten==0.4.1`` on the pinned torch through a small
  runtime shim (idempotent; nothing in site-packages is edited):

  - ``torch.onnx._internal.registration`` moved to
    ``torch.onnx._internal.torchscript_exporter.registration``; CrypTen's ONNX converter imports
    the old name at import time, so the old name is aliased in ``sys.modules``;
  - since torch 2.9 ``torch.onnx.export`` defaults to the dynamo exporter (which needs
    ``onnxscript`` and produces graphs CrypTen's converter does not read); CrypTen's exporter
    function is replaced by one that passes ``dynamo=False`` (the TorchScript exporter), which
    makes ``crypten.nn.from_pytorch`` work again for small models.

* :func:`mpc_session` - a context manager that joins one party to a CrypTen computation over
  ``torch.distributed`` / gloo (rendezvous ``tcp://host:port`` or ``file:///path``) with a
  timeout on every communication step, and tears it down. A party that disconnects or stops
  answering makes the other raise :class:`MpcPeerError` (within ``timeout_s``), never hang.
* :func:`encrypt`, :func:`decrypt`, :func:`comm_stats`, :func:`reset_comm_stats` inside a
  session (``decrypt`` decodes exactly: CrypTen's own decoder is off by 1.0 for some negative
  values, see :func:`fixed_point_decode`).
* :func:`run_ttp_server` - the dealer process for the trusted-third-party provider.

Security model (read before deploying). CrypTen is semi-honest (honest-but-curious) secure and
its Beaver triples come from a *provider*:

* ``"TFP"`` (trusted first party, CrypTen's default): party 0 generates every triple itself. It
  therefore knows the masks, and the masked values opened during a multiplication reveal the
  other party's inputs to it. It measures the online cost only (the offline phase is free), i.e.
  it is a *benchmarking* mode, not a privacy guarantee against party 0.
* ``"TTP"`` (trusted third party): a separate dealer process (:func:`run_ttp_server`, rank
  ``world_size``) generates the triples and sends party 0 its share of the products (its traffic
  is counted in party 0's statistics). Neither party alone learns the other's inputs, assuming the
  dealer does not collude with either. This is the mode to use for real data.

Input sharing is free of communication (pseudo-random zero sharing from pairwise seeds); bytes
come from the Beaver openings (every encrypted matmul opens ``x - a`` and ``W - b``: each weight
matrix travels, masked, once per forward) and from the comparisons of softmax's max, which grow
as heads x T^2 and dominate from T ~ 64 on (``privacy.op_ledger`` splits a forward's bytes by
operation; ``privacy.aero_2pc.MaxFreeSoftmax`` removes the comparisons for models that carry a
public score bound).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

PROVIDERS = ("TFP", "TTP")



# --------------------------------------------------------------------------------------------
# Errors and statistics


class MpcError(RuntimeError):
    """An MPC session could not be set up or used (bad arguments, engine missing, misuse)."""


class MpcPeerError(MpcError):
    """The other party disconnected, crashed or stopped answering within the timeout."""


@dataclass(frozen=True)
class CommStats:
    """What one party sent and received: communication rounds, bytes, seconds spent waiting.

    Per party, as CrypTen counts it: a two-party protocol's system total is the sum of both
    parties' figures halved (every message is counted by its sender and its receiver). ``seconds``
    is time inside communication calls (it includes waiting for the peer's computation).
    """

    rounds: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def __add__(self, other: CommStats) -> CommStats:
        return CommStats(self.rounds + other.rounds, self.bytes + other.bytes,
                         self.seconds + other.seconds)

    def __sub__(self, other: CommStats) -> CommStats:
        return CommStats(self.rounds - other.rounds, self.bytes - other.bytes,
                         self.seconds - other.seconds)

    def to_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "bytes": self.bytes, "seconds": self.seconds}


# --------------------------------------------------------------------------------------------
# Importing CrypTen on the pinned torch

_SHIM_LOCK = threading.Lock()
_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def _legacy_onnx_export(f, pytorch_model, dummy_input):
    """CrypTen's ``_export_pytorch_model`` with ``dynamo=False`` (the TorchScript exporter)."""
    from crypten.nn import onnx_converter

    kwargs = {
        "do_constant_folding": False,
        "export_params": True,
        "input_names": ["input"],
        "operator_export_type": torch.onnx.OperatorExportTypes.ONNX,
        "output_names": ["output"],
        "opset_version": onnx_converter._OPSET_VERSION,
    }
    if "dynamo" in _export_parameters():
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        # choosing the TorchScript exporter is the point; its deprecation notices are noise
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(pytorch_model, dummy_input, f, **kwargs)
    return f


def _export_parameters() -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(torch.onnx.export).parameters)


_legacy_onnx_export.confide_shim = True


def import_crypten():
    """Import CrypTen, applying the compatibility shim once; returns the ``crypten`` module.

    Safe to call any number of times and from several threads. Raises :class:`MpcError` with
    the install command when CrypTen or its dependencies are missing.
    """
    with _SHIM_LOCK:
        if _OLD_REGISTRATION not in sys.modules:
            try:
                import importlib

                sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
            except ImportError:
                pass  # an older torch that still has the old module: nothing to alias
        try:
            import crypten
            from crypten.nn import onnx_converter
        except ImportError as exc:
            raise MpcError(
                f"CrypTen is not importable ({exc}); install the pins in requirements/crypten.txt"
                " (pip install --no-deps crypten==0.4.1, then the listed dependencies)"
            ) from exc
        if not getattr(onnx_converter._export_pytorch_model, "confide_shim", False):
            onnx_converter._export_pytorch_model = _legacy_onnx_export
        return crypten


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True)
class MpcParty:
    """This process's seat in an MPC computation (what :func:`mpc_session` yields)."""

    rank: int
    world_size: int
    rendezvous: str
    timeout_s: float
    provider: str

    def stats(self) -> CommStats:
        return comm_stats()

    def reset_stats(self) -> None:
        reset_comm_stats()

    def encrypt(self, tensor: torch.Tensor | None, src: int,
                shape: Sequence[int] | None = None):
        return encrypt(tensor, src, shape)


_ACTIVE: MpcParty | None = None
_PEER_MARKERS = (
    "connection closed", "connection reset", "timed out", "timeout", "broken pipe",
    "gloo", "socket", "peer", "connect", "store", "barrier",
)


def looks_like_peer_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    if isinstance(exc, RuntimeError | ConnectionError | TimeoutError):
        text = str(exc).lower()
        return any(marker in text for marker in _PEER_MARKERS)
    return False


def peer_error(party: MpcParty, exc: BaseException, during: str) -> MpcPeerError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MpcPeerError(
        f"MPC party {party.rank}/{party.world_size} ({party.rendezvous}): {during} failed: the "
        f"other party disconnected or did not answer within {party.timeout_s:g}s "
        f"[{type(exc).__name__}: {first_line}]"
    )


def _validate_rendezvous(rendezvous: str) -> str:
    if not isinstance(rendezvous, str) or not rendezvous.startswith(("tcp://", "file://")):
        raise MpcError(
            f"rendezvous must be 'tcp://HOST:PORT' (rank 0 listens there) or 'file:///PATH' "
            f"(a shared file), got {rendezvous!r}"
        )
    return rendezvous


@contextlib.contextmanager
def _timeouts(timeout: datetime.timedelta) -> Iterator[None]:
    """Make CrypTen's ``init_process_group`` / ``new_group`` calls use our timeout."""
    dist = torch.distributed
    originals = (dist.init_process_group, dist.new_group)

    def init_process_group(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return originals[0](*args, **kwargs)

    def new_group(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return originals[1](*args, **kwargs)

    dist.init_process_group, dist.new_group = init_process_group, new_group
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = originals


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _init_engine(rank: int, world_size: int, rendezvous: str, timeout_s: float,
                 provider: str) -> None:
    crypten = import_crypten()
    crypten.cfg.mpc.provider = provider
    crypten.cfg.communicator.verbose = True  # otherwise every statistic stays 0
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "RENDEZVOUS": rendezvous,
           "DISTRIBUTED_BACKEND": "gloo"}
    with _environ(env), _timeouts(datetime.timedelta(seconds=timeout_s)):
        crypten.init()


def _shutdown_engine(provider: str, clean: bool) -> None:
    crypten = import_crypten()
    from crypten.communicator import DistributedCommunicator

    if provider == "TTP":
        with contextlib.suppress(Exception):
            crypten.mpc.provider.ttp_provider.TTPClient.uninit()
    if clean:
        try:
            crypten.uninit()  # also tells the TTP dealer to stop
            return
        except Exception:  # fall through to the local teardown below
            pass
    # after a peer failure, collective shutdown steps (telling the dealer to stop) may block on
    # the dead peer; destroy only the local process groups so a new session can start
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    DistributedCommunicator.instance = None


@contextlib.contextmanager
def mpc_session(rank: int, world_size: int = 2, rendezvous: str = "tcp://127.0.0.1:29500",
                timeout_s: float = 60.0, provider: str = "TFP") -> Iterator[MpcParty]:
    """Join this process to an MPC computation as party ``rank`` of ``world_size``.

    ``rendezvous`` is ``tcp://HOST:PORT`` (party 0 listens there) or ``file:///PATH``. Every
    communication step, including the rendezvous itself, gives up after ``timeout_s`` seconds
    and raises :class:`MpcPeerError`; so does a peer that disconnects. ``provider`` is ``"TFP"``
    (benchmarking: party 0 deals the Beaver triples) or ``"TTP"`` (a dealer process runs
    :func:`run_ttp_server` with the same rendezvous; see the module docstring). One session per
    process at a time. Communication statistics start at zero.

    Run each party in its own fresh process (a daemon, a client, or ``multiprocessing`` with the
    "spawn" start method): CrypTen's ``run_multiprocess`` forks, and a child forked after the
    parent ran multithreaded torch work can hang.
    """
    global _ACTIVE
    if provider not in PROVIDERS:
        raise MpcError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if not (isinstance(world_size, int) and world_size >= 2):
        raise MpcError(f"world_size must be an integer >= 2, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise MpcError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise MpcError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    _validate_rendezvous(rendezvous)
    if _ACTIVE is not None:
        raise MpcError(f"this process is already MPC party {_ACTIVE.rank} in a session; "
                       "close it before opening another")
    party = MpcParty(rank, world_size, rendezvous, float(timeout_s), provider)
    try:
        _init_engine(rank, world_size, rendezvous, timeout_s, provider)
    except Exception as exc:
        _shutdown_engine(provider, clean=False)
        if looks_like_peer_failure(exc):
            raise peer_error(party, exc, "joining the session") from exc
        raise
    _ACTIVE = party
    clean = False
    try:
        reset_comm_stats()
        yield party
        clean = True
    except Exception as exc:
        if looks_like_peer_failure(exc) and not isinstance(exc, MpcError):
            raise peer_error(party, exc, "the protocol") from exc
        raise
    finally:
        _ACTIVE = None
        _shutdown_engine(provider, clean)


def require_session() -> MpcParty:
    if _ACTIVE is None:
        raise MpcError("no MPC session is open in this process: use `with mpc_session(...)`")
    return _ACTIVE


def comm_stats() -> CommStats:
    """This party's communication since the session started or the last reset."""
    require_session()
    import crypten.communicator as comm

    stats = comm.get().get_communication_stats()
    return CommStats(int(stats["rounds"]), int(stats["bytes"]), float(stats["time"]))


def reset_comm_stats() -> None:
    require_session()
    import_crypten().reset_communication_stats()


def encrypt(tensor: torch.Tensor | None, src: int, shape: Sequence[int] | None = None):
    """Secret-share ``tensor`` owned by party ``src``; returns the engine's encrypted tensor.

    The owner passes its tensor; every other party passes ``None`` and the agreed ``shape``
    (shapes are public, values are not). All parties must call this in the same order with the
    same shapes: the sharing draws from pseudo-random generators the parties hold in lockstep.
    """
    party = require_session()
    crypten = import_crypten()
    if party.rank == src:
        if tensor is None:
            raise MpcError(f"party {src} owns this input and must pass its tensor")
        tensor = tensor.detach().to(torch.float32).cpu()
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise MpcError(f"party {src}'s tensor has shape {tuple(tensor.shape)}, but the "
                           f"agreed shape is {tuple(shape)}")
    else:
        if shape is None:
            raise MpcError("a party that does not own the input must pass its agreed shape")
        tensor = torch.zeros(tuple(shape))  # placeholder: only the owner's value is shared
    return crypten.cryptensor(tensor, src=src)


def fixed_point_decode(raw: torch.Tensor, scale: int) -> torch.Tensor:
    """Exact fixed-point decoding: ``raw / scale`` as float32, for any int64 ``raw``.

    CrypTen 0.4.1's ``FixedPointEncoder.decode`` divides negative values by ``scale - 1`` and is
    off by exactly 1.0 whenever a negative value v has |v| >= 1 and a fractional part above
    1 - floor(|v|) / scale (e.g. raw -7143399 at scale 2^16 decodes to -109.9996 instead of
    -108.9996): about |v| / 65536 of such values, i.e. a wrong logit in a few percent of
    T=128 forwards. ``get_plain_text`` uses it, so :func:`decrypt` decodes here instead.
    """
    raw = raw.long()
    whole = torch.div(raw, scale, rounding_mode="floor")
    return (whole.double() + (raw - whole * scale).double() / scale).float()


def decrypt(tensor, dst: int | None = None) -> torch.Tensor | None:
    """Reveal an encrypted tensor to party ``dst`` (``None``: to every party), decoded exactly.

    Returns the plaintext on the receiving party (parties) and ``None`` on the others.
    """
    require_session()
    raw = tensor.reveal(dst=dst)
    if raw is None:
        return None
    return fixed_point_decode(raw, int(tensor.encoder.scale))


# --------------------------------------------------------------------------------------------
# The trusted third party (dealer) for provider="TTP"


def run_ttp_server(world_size: int = 2, rendezvous: str = "tcp://127.0.0.1:29500",
                   timeout_s: float = 60.0) -> None:
    """Run the Beaver-triple dealer for ``provider="TTP"`` until the parties finish.

    It joins the rendezvous as rank ``world_size`` (one past the computing parties), answers
    party 0's triple requests and returns when party 0 closes its session. CrypTen's own server
    loop is used; it stops on a communication error (e.g. a party that vanished or a gap longer
    than ``timeout_s`` between requests) instead of hanging.

    Note: CrypTen's request channel between party 0 and the dealer sends small pickled dicts
    (function name and tensor sizes), read back with CrypTen's restricted unpickler; the
    two-party TFP path of ``privacy.aero_2pc.private_forward`` exchanges tensors only (shapes
    are agreed in advance, so no object is ever sent).
    """
    _validate_rendezvous(rendezvous)
    crypten = import_crypten()
    crypten.cfg.mpc.provider = "TTP"
    env = {"RANK": str(world_size), "WORLD_SIZE": str(world_size), "RENDEZVOUS": rendezvous,
           "DISTRIBUTED_BACKEND": "gloo"}
    with _environ(env), _timeouts(datetime.timedelta(seconds=timeout_s)):
        crypten.init()
    try:
        crypten.mpc.provider.TTPServer()
    finally:
        from crypten.communicator import DistributedCommunicator

        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        DistributedCommunicator.instance = None
