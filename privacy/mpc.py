"""Secure two-party private inference: the one module that knows CrypTen is underneath.

Everything else in Confide talks to this module in torch tensors, plain dicts and our own small
types (:class:`MpcParty`, :class:`CommStats`, :class:`MpcError`), so the engine can be swapped
without touching a caller. Pure building block: no daemons, nothing from ``node``; the party
processes (a node daemon and a client, or two test processes) open a session each.

What is here:

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
* :func:`private_forward` - the AERO decoder (``node.aero``) evaluated under 2PC: the model owner
  passes its plaintext ``state_dict``, the data owner its token ids; the logits are revealed to
  the data owner only. :func:`fold_weights` and :func:`reference_forward` are the same math in
  plaintext (the test that keeps ``node.aero`` and this module in sync compares the three).
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
as heads x T^2 and dominate from T ~ 64 on.

Accuracy (see :class:`Approximation`): fixed point with 16 fractional bits; exp, reciprocal,
inverse square root and sigmoid are iterative approximations with stated input domains (softmax
logits spreading less than ~230, GELU inputs within ~+-135, LayerNorm inputs with a standard
deviation of ~0.1 to ~30: 5e-3 at 0.1, 1e-4 at 1, 2e-2 at 30, overflow above ~50; measured).
A tiny model's logits come out within ~3e-3 of plaintext (the tests assert 1e-2).
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
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ARCH_KEYS",
    "PROVIDERS",
    "Approximation",
    "CommStats",
    "MpcError",
    "MpcParty",
    "MpcPeerError",
    "comm_stats",
    "decrypt",
    "encrypt",
    "fixed_point_decode",
    "fold_weights",
    "import_crypten",
    "mpc_session",
    "private_forward",
    "reference_forward",
    "reset_comm_stats",
    "run_ttp_server",
    "weight_spec",
]

PROVIDERS = ("TFP", "TTP")

ARCH_KEYS = (
    "vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "layernorm",
    "activation", "ffn", "normalization", "tie_embeddings", "ln_eps",
)
"""The public architecture fields both parties must agree on (``AeroConfig.to_dict()`` has
them; other keys of the dict, such as the training-only entropy settings, are ignored)."""

GELU_SIGMOID_COEF = 1.702
"""GELU(x) is computed as x * sigmoid(1.702 x) (Hendrycks & Gimpel's sigmoid approximation),
in ``node.aero`` and here alike: CrypTen has sigmoid but no GELU, and its erf is a Taylor series
that diverges for |x| > ~2."""

MASKED_LOGIT = -1024.0
"""Causal masking under MPC: future positions are set to a constant (scores times the public
0/1 mask, plus the constant where the mask is 0), so the encrypted max is taken over the visible
positions, and after the exponential they are multiplied by the mask again. The private forward
uses -2^n (n = ``Approximation.exp_iters``): after subtracting the row max m, a masked entry sits
at x = -2^n - m, where our exp's base (1 + z + z^2/2, z = x/2^n) is ~0.5, so it comes out ~0
instead of overflowing. (An additive -inf or -1e9 would overflow the fixed-point ring, and huge
garbage values make CrypTen's two-party truncation fail more often.) The plaintext mirror uses
this constant; it is exact either way."""


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


def _looks_like_peer_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    if isinstance(exc, RuntimeError | ConnectionError | TimeoutError):
        text = str(exc).lower()
        return any(marker in text for marker in _PEER_MARKERS)
    return False


def _peer_error(party: MpcParty, exc: BaseException, during: str) -> MpcPeerError:
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
        if _looks_like_peer_failure(exc):
            raise _peer_error(party, exc, "joining the session") from exc
        raise
    _ACTIVE = party
    clean = False
    try:
        reset_comm_stats()
        yield party
        clean = True
    except Exception as exc:
        if _looks_like_peer_failure(exc) and not isinstance(exc, MpcError):
            raise _peer_error(party, exc, "the protocol") from exc
        raise
    finally:
        _ACTIVE = None
        _shutdown_engine(provider, clean)


def _require_session() -> MpcParty:
    if _ACTIVE is None:
        raise MpcError("no MPC session is open in this process: use `with mpc_session(...)`")
    return _ACTIVE


def comm_stats() -> CommStats:
    """This party's communication since the session started or the last reset."""
    _require_session()
    import crypten.communicator as comm

    stats = comm.get().get_communication_stats()
    return CommStats(int(stats["rounds"]), int(stats["bytes"]), float(stats["time"]))


def reset_comm_stats() -> None:
    _require_session()
    import_crypten().reset_communication_stats()


def encrypt(tensor: torch.Tensor | None, src: int, shape: Sequence[int] | None = None):
    """Secret-share ``tensor`` owned by party ``src``; returns the engine's encrypted tensor.

    The owner passes its tensor; every other party passes ``None`` and the agreed ``shape``
    (shapes are public, values are not). All parties must call this in the same order with the
    same shapes: the sharing draws from pseudo-random generators the parties hold in lockstep.
    """
    party = _require_session()
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
    _require_session()
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
    two-party TFP path of :func:`private_forward` exchanges tensors only (shapes are agreed in
    advance, so no object is ever sent).
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


# --------------------------------------------------------------------------------------------
# The AERO decoder: public architecture, folded weights, one forward for both engines


def _arch(config: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key in ARCH_KEYS if key not in config]
    if missing:
        raise MpcError(f"model config lacks {missing}; pass AeroConfig.to_dict()")
    arch = {key: config[key] for key in ARCH_KEYS}
    if arch["d_model"] % arch["n_heads"]:
        raise MpcError(f"d_model {arch['d_model']} is not divisible by n_heads {arch['n_heads']}")
    if arch["activation"] not in ("gelu", "relu", "none"):
        raise MpcError(f"unknown activation {arch['activation']!r}")
    if arch["normalization"] not in ("none", "weight", "scaled"):
        raise MpcError(f"unknown normalization {arch['normalization']!r}")
    return arch


def weight_spec(config: Mapping[str, Any], seq_len: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the folded weights, in the order both parties share them.

    Computable from the public config alone, so the data owner knows what to expect. Linear
    weights are stored ``(in, out)`` (``x @ W``). LayerNorm affine parameters, the attention
    scaling, learnable scalars and weight normalization are folded into the linear layers
    (:func:`fold_weights`), and a linear FFN (``activation="none"``) is merged into one matrix.
    """
    a = _arch(config)
    if not 1 <= seq_len <= a["max_len"]:
        raise MpcError(f"seq_len must be in [1, {a['max_len']}] (max_len), got {seq_len}")
    d, v, ff = a["d_model"], a["vocab_size"], a["d_ff"]
    spec: list[tuple[str, tuple[int, ...]]] = [("tok_emb", (v, d)), ("pos_emb", (seq_len, d))]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        spec += [(p + "qkv.weight", (d, 3 * d)), (p + "qkv.bias", (3 * d,)),
                 (p + "out.weight", (d, d)), (p + "out.bias", (d,))]
        if a["ffn"]:
            if a["activation"] == "none":
                spec += [(p + "ffn.weight", (d, d)), (p + "ffn.bias", (d,))]
            else:
                spec += [(p + "fc1.weight", (d, ff)), (p + "fc1.bias", (ff,)),
                         (p + "fc2.weight", (ff, d)), (p + "fc2.bias", (d,))]
    if a["layernorm"] or not a["tie_embeddings"]:
        spec += [("head.weight", (d, v))]
        if a["layernorm"]:
            spec += [("head.bias", (v,))]
    return spec


def _linear(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as (in, out), bias) of a linear layer, resolving weight normalization."""
    if prefix + "weight_v" in sd:
        v, g = sd[prefix + "weight_v"].double(), sd[prefix + "weight_g"].double()
        weight = g.reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    else:
        weight = sd[prefix + "weight"].double()
    out = weight.shape[0]
    bias = sd[prefix + "bias"].double() if prefix + "bias" in sd else torch.zeros(out).double()
    return weight.t().contiguous(), bias


def _fold_affine(gamma, beta, weight, bias):
    """LayerNorm affine (gamma, beta) followed by x @ W + b, as one linear layer on LN(x)."""
    return gamma.reshape(-1, 1) * weight, beta @ weight + bias


def fold_weights(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 seq_len: int) -> dict[str, torch.Tensor]:
    """The model owner's plaintext preprocessing: ``node.aero`` weights -> :func:`weight_spec`.

    Runs locally on the owner's side before sharing (no communication, nothing revealed): the
    encrypted forward then needs no encrypted multiplications by scalars or LayerNorm gains.
    """
    a = _arch(config)
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    d, h = a["d_model"], a["n_heads"]
    dh = d // h
    scaled = a["normalization"] == "scaled"
    out: dict[str, torch.Tensor] = {
        "tok_emb": sd["tok_emb.weight"].double(),
        "pos_emb": sd["pos_emb.weight"][:seq_len].double(),
    }
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        ws, bs = zip(*(_linear(sd, f"{p}attn.{n}.") for n in ("q", "k", "v")), strict=True)
        wq, bq = ws[0].clone(), bs[0].clone()
        # per-head score scale 1/sqrt(dh) (x a learnable per-head logit scale) into W_q, b_q
        head_scale = torch.full((h,), 1.0 / math.sqrt(dh), dtype=torch.float64)
        if scaled:
            head_scale = head_scale * sd[p + "attn.logit_scale"].double()
        col = head_scale.repeat_interleave(dh)
        wq, bq = wq * col, bq * col
        w_qkv = torch.cat([wq, ws[1], ws[2]], dim=1)
        b_qkv = torch.cat([bq, bs[1], bs[2]])
        if a["layernorm"]:
            w_qkv, b_qkv = _fold_affine(sd[p + "ln1.weight"].double(),
                                        sd[p + "ln1.bias"].double(), w_qkv, b_qkv)
        wo, bo = _linear(sd, p + "attn.o.")
        if scaled:
            alpha = sd[p + "attn_scale"].double()
            wo, bo = wo * alpha, bo * alpha
        out |= {p + "qkv.weight": w_qkv, p + "qkv.bias": b_qkv,
                p + "out.weight": wo, p + "out.bias": bo}
        if a["ffn"]:
            w1, b1 = _linear(sd, p + "ffn.fc1.")
            w2, b2 = _linear(sd, p + "ffn.fc2.")
            if a["layernorm"]:
                w1, b1 = _fold_affine(sd[p + "ln2.weight"].double(),
                                      sd[p + "ln2.bias"].double(), w1, b1)
            if scaled:
                beta = sd[p + "ffn_scale"].double()
                w2, b2 = w2 * beta, b2 * beta
            if a["activation"] == "none":
                out |= {p + "ffn.weight": w1 @ w2, p + "ffn.bias": b1 @ w2 + b2}
            else:
                out |= {p + "fc1.weight": w1, p + "fc1.bias": b1,
                        p + "fc2.weight": w2, p + "fc2.bias": b2}
    head = (sd["tok_emb.weight"] if a["tie_embeddings"] else sd["lm_head.weight"]).double().t()
    if a["layernorm"]:
        w, b = _fold_affine(sd["ln_f.weight"].double(), sd["ln_f.bias"].double(), head,
                            torch.zeros(head.shape[1], dtype=torch.float64))
        out |= {"head.weight": w, "head.bias": b}
    elif not a["tie_embeddings"]:
        out["head.weight"] = head.contiguous()
    spec = weight_spec(config, seq_len)
    if [name for name, _ in spec] != list(out):
        raise MpcError("internal error: folded weights do not follow weight_spec")
    for name, shape in spec:
        if tuple(out[name].shape) != shape:
            raise MpcError(f"weight {name} has shape {tuple(out[name].shape)}, the config "
                           f"implies {shape}: the state dict does not match the config")
    return {k: t.float() for k, t in out.items()}


@dataclass(frozen=True)
class Approximation:
    """Accuracy knobs of the private forward; public, and both parties must use the same.

    ``precision_bits``: fixed-point fractional bits (CrypTen's default, 16). More bits cost no
    bytes (the ring is 64-bit either way) but make CrypTen's two-party truncation fail more often:
    each truncated value v goes wrong (by ~2^(64 - precision_bits)) with probability about
    |v| * 2^(2 * precision_bits - 64). A T=128, d=128, 2-layer baseline forward truncates ~5e6
    values: ~7e-4 of its runs get a corrupted value at 16 bits, ~1% at 18, ~17% at 20 (the sum of
    those probabilities, measured by instrumenting CrypTen's truncation).
    ``exp_iters``: n in exp(x) = (1 + z + z^2/2)^(2^n), z = x / 2^n: one round per iteration;
    valid for x >= -1.8 * 2^n (softmax logits must spread less than that, GELU inputs must stay
    within +-1.8 * 2^n / 1.702); the relative error is ~2^n * 2^-precision_bits.
    ``ln_iters``: Newton steps refining LayerNorm's inverse square root after its log-based
    initial guess. With the defaults a tiny model's logits are within ~2e-3 of plaintext; CrypTen's
    own functions (first-order exp with 8 iterations, its inv_sqrt) give ~1.4e-2, and far worse
    for LayerNorm inputs with a small variance.
    """

    precision_bits: int = 16
    exp_iters: int = 7
    ln_iters: int = 3


LN_LOG_SHIFT = 16.0
"""The private LayerNorm takes the log of var / 16 (CrypTen's log is accurate on [1e-4, 250]),
which centres its domain on the variances of trained residual streams (see the module docs)."""


class _PlainOps:
    """The private forward's nonlinear steps in plaintext torch (exact functions)."""

    @staticmethod
    def masked_softmax(scores, mask):
        s = scores * mask + (mask - 1.0) * -MASKED_LOGIT
        m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        e = (s - m).exp() * mask
        return e / e.sum(dim=-1, keepdim=True)

    @staticmethod
    def normalize(x, eps):
        c = x - x.mean(dim=-1, keepdim=True)
        return c * torch.rsqrt((c * c).mean(dim=-1, keepdim=True) + eps)

    @staticmethod
    def gelu(x):
        return x * torch.sigmoid(GELU_SIGMOID_COEF * x)

    @staticmethod
    def relu(x):
        return torch.relu(x)


class _CrypTenOps:
    """The same steps on CrypTen tensors, with CrypTen's approximations (module docstring)."""

    def __init__(self, approx: Approximation):
        self.cfg = import_crypten().cfg
        self.approx = approx

    def _exp(self, x):
        # exp(x) = (e^(x/2^n))^(2^n) with e^z ~ 1 + z + z^2/2 (CrypTen: 1 + z, which needs ~2
        # more squarings, i.e. precision bits, for the same accuracy). For x in [-2^n, 0] the
        # base lies in [0.5, 1]; down to x = -1.8 * 2^n the result is still ~0 (< 1e-3).
        n = self.approx.exp_iters
        z = x.div(2**n)
        base = z.square().div(2) + z + 1
        for _ in range(n):
            base = base.square()
        return base

    def masked_softmax(self, scores, mask):
        # an integer mask multiplies shares without a truncation step
        s = scores * mask.long() + (mask - 1.0) * 2.0**self.approx.exp_iters
        m = s.max(dim=s.dim() - 1, keepdim=True)[0]
        e = self._exp(s - m) * mask
        with self.cfg.temp_override({"functions.reciprocal_all_pos": True}):
            inv = e.sum(dim=-1, keepdim=True).reciprocal()
        return e * inv

    def normalize(self, x, eps):
        # 1/sqrt(var): initial guess exp(-ln(var)/2) from CrypTen's log (accurate on [1e-4, 250],
        # shifted by LN_LOG_SHIFT to cover larger variances), then Newton steps. CrypTen's own
        # inv_sqrt starts from a guess that suits variances near 1 and diverges above ~500.
        c = x - x.mean(dim=-1, keepdim=True)
        var = c.square().mean(dim=-1, keepdim=True) + eps
        y = self._exp((var * (1.0 / LN_LOG_SHIFT)).log() * -0.5) * (LN_LOG_SHIFT ** -0.5)
        for _ in range(self.approx.ln_iters):
            y = y * (3 - var * y.square()) * 0.5
        return c * y

    def sigmoid(self, z):
        # CrypTen's "reciprocal" sigmoid, with our exp accuracy: 1 / (1 + exp(-|z|)), mirrored
        ltz = z.lt(0)
        pos = z * (1 - 2 * ltz)
        den = self._exp(pos.neg()) + 1
        overrides = {"functions.reciprocal_nr_iters": 4, "functions.reciprocal_all_pos": True,
                     "functions.reciprocal_initial": 0.75}  # den in [1, 2]: 4 steps suffice
        with self.cfg.temp_override(overrides):
            r = den.reciprocal()
        return r.where(1 - ltz, 1 - r)

    def gelu(self, x):
        return x * self.sigmoid(x * GELU_SIGMOID_COEF)

    @staticmethod
    def relu(x):
        return x.relu()


def _forward(w: Mapping[str, Any], a: Mapping[str, Any], onehot, ops) -> Any:
    """The decoder on folded weights; ``onehot`` is (T, V); works for torch and CrypTen."""
    t = onehot.size(0)
    d, h = a["d_model"], a["n_heads"]
    dh = d // h
    mask = torch.tril(torch.ones(t, t))
    x = onehot.matmul(w["tok_emb"]) + w["pos_emb"]
    for i in range(a["n_layers"]):
        p = f"blocks.{i}."
        y = ops.normalize(x, a["ln_eps"]) if a["layernorm"] else x
        qkv = y.matmul(w[p + "qkv.weight"]) + w[p + "qkv.bias"]
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(t, h, dh).transpose(0, 1) for j in range(3))
        probs = ops.masked_softmax(q.matmul(k.transpose(1, 2)), mask)
        ctx = probs.matmul(v).transpose(0, 1).reshape(t, d)
        x = x + ctx.matmul(w[p + "out.weight"]) + w[p + "out.bias"]
        if a["ffn"]:
            y = ops.normalize(x, a["ln_eps"]) if a["layernorm"] else x
            if a["activation"] == "none":
                x = x + y.matmul(w[p + "ffn.weight"]) + w[p + "ffn.bias"]
            else:
                z = y.matmul(w[p + "fc1.weight"]) + w[p + "fc1.bias"]
                z = ops.gelu(z) if a["activation"] == "gelu" else ops.relu(z)
                x = x + z.matmul(w[p + "fc2.weight"]) + w[p + "fc2.bias"]
    if a["layernorm"]:
        return ops.normalize(x, a["ln_eps"]).matmul(w["head.weight"]) + w["head.bias"]
    head = w["head.weight"] if "head.weight" in w else w["tok_emb"].t()
    return x.matmul(head)


def _check_ids(token_ids: torch.Tensor, vocab: int, seq_len: int) -> torch.Tensor:
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    if ids.numel() != seq_len:
        raise MpcError(f"expected {seq_len} token ids (the agreed sequence length), got "
                       f"{ids.numel()}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise MpcError(f"token ids must lie in [0, {vocab}), got min {int(ids.min())} and max "
                       f"{int(ids.max())}")
    return ids


def reference_forward(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                      token_ids: torch.Tensor) -> torch.Tensor:
    """The private forward's math in plaintext (float32): logits (T, V) for one sequence."""
    a = _arch(config)
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    ids = _check_ids(ids, a["vocab_size"], ids.numel())
    w = fold_weights(state_dict, config, ids.numel())
    onehot = F.one_hot(ids, a["vocab_size"]).float()
    with torch.no_grad():
        return _forward(w, a, onehot, _PlainOps)


def private_forward(config: Mapping[str, Any], seq_len: int, *,
                    state_dict: Mapping[str, torch.Tensor] | None = None,
                    token_ids: torch.Tensor | None = None,
                    model_owner: int = 0, data_owner: int = 1,
                    approx: Approximation | None = None) -> torch.Tensor | None:
    """Evaluate the AERO decoder on one sequence under secure two-party computation.

    Call inside :func:`mpc_session` on both parties with the same public ``config``
    (``AeroConfig.to_dict()``) and ``seq_len``. The model owner passes ``state_dict`` (plaintext,
    folded locally by :func:`fold_weights`), the data owner its ``token_ids`` (``seq_len``
    ints); each party passes only its own. The data owner one-hot encodes its ids and shares the
    (T, V) matrix, so the embedding lookup is an encrypted matmul and the model owner never sees
    an id. Returns the logits (T, V) on the data owner, ``None`` on every other party.

    ``approx`` sets the approximations' accuracy (:class:`Approximation`; same on both sides).
    """
    party = _require_session()
    if model_owner == data_owner:
        raise MpcError("model_owner and data_owner must be different parties")
    for name, r in (("model_owner", model_owner), ("data_owner", data_owner)):
        if not 0 <= r < party.world_size:
            raise MpcError(f"{name} {r} is not a party of this {party.world_size}-party session")
    a = _arch(config)
    spec = weight_spec(config, seq_len)
    folded: Mapping[str, torch.Tensor] = {}
    if party.rank == model_owner:
        if state_dict is None:
            raise MpcError("the model owner must pass its state_dict")
        folded = fold_weights(state_dict, config, seq_len)
    onehot = None
    if party.rank == data_owner:
        if token_ids is None:
            raise MpcError("the data owner must pass its token_ids")
        ids = _check_ids(token_ids, a["vocab_size"], seq_len)
        onehot = F.one_hot(ids, a["vocab_size"]).float()
    approx = approx or Approximation()
    cfg = import_crypten().cfg
    try:
        with cfg.temp_override({"encoder.precision_bits": approx.precision_bits}):
            weights = {name: encrypt(folded.get(name), model_owner, shape)
                       for name, shape in spec}
            x = encrypt(onehot, data_owner, (seq_len, a["vocab_size"]))
            logits = _forward(weights, a, x, _CrypTenOps(approx))
            return decrypt(logits, dst=data_owner)
    except Exception as exc:
        if _looks_like_peer_failure(exc) and not isinstance(exc, MpcError):
            raise _peer_error(party, exc, "the private forward") from exc
        raise
