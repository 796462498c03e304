"""Private inference, the data owner's side (the client): ``private_infer`` and its parts.

::

    from confide.sdk.private_inference import private_infer

    result = private_infer("10.0.0.5:7070", "aero", "The markets rallied after", timeout_s=60)
    result.next_token, result.logits.shape, result.stats.bytes

The client asks the node for a session on one of its models (``OpenPrivateInference``: the
model name, the sequence length and the provider travel, never a token), then runs the data
owner's MPC party in a fresh process (``python -m confide.sdk.private_inference``: CrypTen keeps
global
state, and a fresh interpreter needs no ``if __name__ == "__main__"`` guard in the caller) that
meets the node's party at the rendezvous the node gave. The token ids are secret-shared with
the node's party; the logits are revealed to this process alone. Text is tokenized here, with
the tokenizer the model's public configuration names.

The data owner is rank 0 of the computation (see ``node.private_inference`` for why, and what
that means for each party); with ``provider="TTP"`` this client also starts the Beaver-triple
dealer as a separate local process, which measures the TTP mode end to end but only protects
the model owner when the dealer runs on a third machine instead.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from confide.protos.tls import channel as tls_channel
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc

__all__ = [
    "PrivateInferenceError",
    "PrivateInferenceResult",
    "encode_text",
    "list_private_models",
    "open_private_session",
    "private_infer",
    "run_private_session",
]

DEFAULT_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent


class PrivateInferenceError(RuntimeError):
    """The node refused the session (``code`` is its gRPC status) or the client failed."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PrivateInferenceResult:
    node: str
    model: str
    session_id: str
    provider: str
    token_ids: list[int]          # the model's ids of the input (never sent to the node)
    logits: Any                   # torch.Tensor (T, V), revealed to the data owner only
    next_token_id: int            # argmax of the last position, a model id
    next_token: str | None        # decoded with the model's tokenizer, when it names one
    stats: Any                    # privacy.mpc.CommStats of the data owner's party
    forward_s: float              # seconds of the private forward (computation + waiting)
    total_s: float                # the whole call: RPC, party start-up, forward
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, logits: bool = False) -> dict[str, Any]:
        out = {"node": self.node, "model": self.model, "session_id": self.session_id,
               "provider": self.provider, "seq_len": len(self.token_ids),
               "token_ids": self.token_ids, "next_token_id": self.next_token_id,
               "next_token": self.next_token, "stats": self.stats.to_dict(),
               "forward_s": self.forward_s, "total_s": self.total_s}
        if logits:
            out["logits"] = self.logits.tolist()
        return out


# --------------------------------------------------------------------------------------------
# The node's RPCs


def _call(node_address: str, method: str, request, timeout: float):
    with tls_channel(node_address) as channel:  # the CLI's --tls, if any
        stub = node_grpc.NodePeerStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            raise PrivateInferenceError(f"node {node_address}: {code.name}: {exc.details()}",
                                        code) from None


def list_private_models(node_address: str, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The models a node serves for private inference: name -> public config."""
    response = _call(node_address, "ListPrivateModels", node_pb2.ListPrivateModelsRequest(),
                     timeout)
    return {m.name: json.loads(m.config_json) for m in response.models}


def open_private_session(node_address: str, model: str, seq_len: int, provider: str = "TFP",
                         timeout_s: float = DEFAULT_TIMEOUT_S,
                         rpc_timeout: float = 30.0) -> node_pb2.PrivateInferenceSession:
    """Ask the node for a session; it starts its party and says where to meet it."""
    request = node_pb2.PrivateInferenceRequest(model=model, seq_len=seq_len, provider=provider,
                                               timeout_s=timeout_s)
    return _call(node_address, "OpenPrivateInference", request, rpc_timeout)


def _dial_rendezvous(rendezvous: str, node_address: str) -> str:
    """The node's rendezvous, with a wildcard host replaced by the host we reach the node at."""
    from urllib.parse import urlparse

    parsed = urlparse(rendezvous)
    if parsed.scheme != "tcp" or parsed.port is None or not parsed.hostname:
        raise PrivateInferenceError(f"node {node_address} sent an unusable rendezvous "
                                    f"{rendezvous!r}")
    if parsed.hostname in ("0.0.0.0", "::"):
        host = node_address.rsplit(":", 1)[0]
        return f"tcp://{host}:{parsed.port}"
    return rendezvous


# --------------------------------------------------------------------------------------------
# Tokens


def _tokenizer(spec: dict[str, Any]):
    return _tokenizer_named(spec["name"])


@functools.lru_cache(maxsize=4)
def _tokenizer_named(name: str):
    if name == "minilm":
        from confide.node.aero import default_tokenizer

        return default_tokenizer()
    if Path(name).expanduser().is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
    raise PrivateInferenceError(f"the model's tokenizer {name!r} is not available here: pass "
                                "token ids instead")


def encode_text(text: str, config: dict[str, Any], tokenizer=None) -> list[int]:
    """The model's token ids for ``text``, as the model saw its training data.

    The tokenizer named in the model's public config (``node.private_inference.TokenizerSpec``)
    runs here, on the data owner's machine; a leading [CLS] (the tokenizer's begin marker, when
    it has one) starts the sequence as articles started in training; the last ``max_len`` ids
    are kept.
    """
    spec = config.get("tokenizer")
    if not spec:
        raise PrivateInferenceError(f"model {config.get('name')!r} names no tokenizer: pass "
                                    "token ids")
    tokenizer = tokenizer or _tokenizer(spec)
    base = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    begin = getattr(tokenizer, "cls_token_id", None) or getattr(tokenizer, "bos_token_id", None)
    if begin is not None:
        base = [begin, *base]
    if spec.get("ids") is not None:
        index = {tok: i for i, tok in enumerate(spec["ids"])}
        ids = [index.get(tok, spec.get("unk", 0)) for tok in base]
    else:
        ids = base
    ids = ids[-int(config["max_len"]):]
    if not ids:
        raise PrivateInferenceError("the text gives no tokens")
    return ids


def decode_token(model_id: int, config: dict[str, Any], tokenizer=None) -> str | None:
    spec = config.get("tokenizer")
    if not spec:
        return None
    try:
        tokenizer = tokenizer or _tokenizer(spec)
    except PrivateInferenceError:
        return None
    base = spec["ids"][model_id] if spec.get("ids") is not None else model_id
    return tokenizer.convert_ids_to_tokens(int(base))


# --------------------------------------------------------------------------------------------
# The data owner's party (and the local TTP dealer), as fresh processes


def _party_main(folder: str) -> int:
    """``python -m confide.sdk.private_inference data-owner FOLDER``: the data owner's party
    process.

    Reads its job (rendezvous, config, token ids) from stdin as JSON (ids never appear on a
    command line, where other local users could read them) and writes ``FOLDER/result.json``
    plus the logits as ``FOLDER/logits.safetensors``.
    """
    job = json.loads(sys.stdin.read())
    out = Path(folder)
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from confide.node.private_party import use_node_hosted_store
    from confide.privacy import aero_2pc, mpc

    use_node_hosted_store()
    try:
        with mpc.mpc_session(job["rank"], 2, job["rendezvous"], timeout_s=job["timeout_s"],
                             provider=job["provider"]) as party:
            start = time.perf_counter()
            logits = aero_2pc.private_forward(job["config"], job["seq_len"],
                                         token_ids=torch.tensor(job["token_ids"]),
                                         model_owner=job["model_owner_rank"],
                                         data_owner=job["rank"])
            forward_s = time.perf_counter() - start
            stats = party.stats().to_dict()
        if logits is None:
            raise mpc.MpcError("the logits were not revealed to the data owner")
        save_file({"logits": logits.float().contiguous()}, str(out / "logits.safetensors"))
        result = {"forward_s": forward_s, "stats": stats}
    except mpc.MpcPeerError as exc:
        result = {"error": str(exc), "peer": True}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "peer": False}
    (out / "result.json").write_text(json.dumps(result))
    return 0 if "error" not in result else 3


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _stop(process: subprocess.Popen | None, grace: float) -> None:
    if process is None:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_private_session(session: node_pb2.PrivateInferenceSession, token_ids: Sequence[int],
                        node_address: str, *, start_dealer: bool = True) -> dict[str, Any]:
    """Join a session the node opened, as the data owner; returns logits, stats, timing.

    The party runs as a fresh process (``python -m confide.sdk.private_inference``; with TTP and
    ``start_dealer`` a dealer process too). Raises :class:`privacy.mpc.MpcPeerError` (naming
    the node) when the node's party disconnects or stops answering, within the session's
    timeout per communication step.
    """
    from safetensors.torch import load_file

    from confide.privacy import mpc

    config = json.loads(session.config_json)
    ids = [int(i) for i in token_ids]
    if len(ids) != session.seq_len:
        raise PrivateInferenceError(f"the session is for {session.seq_len} tokens, got "
                                    f"{len(ids)}")
    if session.data_owner_rank != 0 or session.model_owner_rank != 1:
        raise PrivateInferenceError(f"node {node_address} proposed ranks data owner "
                                    f"{session.data_owner_rank} / model owner "
                                    f"{session.model_owner_rank}; this client only joins as "
                                    "rank 0 (the party that deals triples under TFP)")
    rendezvous = _dial_rendezvous(session.rendezvous, node_address)
    what = (f"private inference on node {node_address} (model {config.get('name')!r}, "
            f"session {session.session_id})")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    party = dealer = None
    with tempfile.TemporaryDirectory(prefix="confide-private-") as tmp:
        folder = Path(tmp)
        try:
            if session.provider == "TTP" and start_dealer:
                with open(folder / "dealer.log", "wb") as log_file:
                    dealer = subprocess.Popen(
                        [sys.executable, "-m", "confide.node.private_party", "dealer",
                         "--rendezvous",
                         rendezvous, "--timeout", repr(session.timeout_s)],
                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                        env=env, cwd=ROOT)
            job = {"rendezvous": rendezvous, "rank": session.data_owner_rank,
                   "model_owner_rank": session.model_owner_rank, "provider": session.provider,
                   "timeout_s": session.timeout_s, "config": config,
                   "seq_len": session.seq_len, "token_ids": ids}
            with open(folder / "party.log", "wb") as log_file:
                party = subprocess.Popen(
                    [sys.executable, "-m", "confide.sdk.private_inference", "data-owner", tmp],
                    stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                    cwd=ROOT)
            assert party.stdin is not None
            party.stdin.write(json.dumps(job).encode())
            party.stdin.close()
            code = party.wait()  # bounded: every communication step has the session's timeout
            try:
                result = json.loads((folder / "result.json").read_text())
            except (OSError, ValueError):
                raise PrivateInferenceError(
                    f"{what}: the data owner's party process exited (code {code}) without a "
                    f"result: {_tail(folder / 'party.log')}") from None
            if "error" in result:
                if result["peer"]:
                    raise mpc.MpcPeerError(f"{what}: the node's party is gone: "
                                           f"{result['error']}")
                raise PrivateInferenceError(f"{what}: {result['error']}")
            logits = load_file(str(folder / "logits.safetensors"))["logits"]
        finally:
            if party is not None and party.poll() is None:
                party.kill()
                party.wait()
            _stop(dealer, 10.0)
    return {"logits": logits, "forward_s": result["forward_s"],
            "stats": mpc.CommStats(**result["stats"]), "config": config}


def private_infer(node_address: str, model: str, text_or_token_ids: str | Sequence[int],
                  provider: str = "TFP", timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  tokenizer=None, start_dealer: bool = True) -> PrivateInferenceResult:
    """Run ``model`` on the node at ``node_address`` over your input, privately.

    ``text_or_token_ids``: text (tokenized here with the model's tokenizer) or the model's token
    ids. ``provider``: "TFP" (CrypTen's default; this client deals the triples) or "TTP" (a
    dealer process, started here unless ``start_dealer=False``, deals them). ``timeout_s``
    bounds every communication step: a node whose party vanishes or stalls makes this raise
    :class:`privacy.mpc.MpcPeerError` within it. Returns the logits (revealed to this process
    only), the next-token prediction and the data owner's communication counts.
    """
    start = time.perf_counter()
    if isinstance(text_or_token_ids, str):
        configs = list_private_models(node_address)
        if model not in configs:
            # let the node phrase the error (NOT_FOUND with the models it serves)
            open_private_session(node_address, model, 1, provider, timeout_s)
            raise PrivateInferenceError(f"node {node_address} does not list model {model!r}")
        config = configs[model]
        ids = encode_text(text_or_token_ids, config, tokenizer)
    else:
        ids = [int(i) for i in text_or_token_ids]
    if not ids:
        raise PrivateInferenceError("no token ids to run")
    session = open_private_session(node_address, model, len(ids), provider, timeout_s)
    out = run_private_session(session, ids, node_address, start_dealer=start_dealer)
    config = out["config"]
    next_id = int(out["logits"][-1].argmax())
    next_token = None
    if config.get("tokenizer"):
        next_token = decode_token(next_id, config, tokenizer)
    return PrivateInferenceResult(
        node=node_address, model=model, session_id=session.session_id,
        provider=session.provider, token_ids=ids, logits=out["logits"], next_token_id=next_id,
        next_token=next_token, stats=out["stats"], forward_s=out["forward_s"],
        total_s=time.perf_counter() - start, config=config)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "data-owner":
        sys.exit("usage: python -m confide.sdk.private_inference data-owner FOLDER "
                 "(job JSON on stdin); "
                 "use `confide infer --private` or private_infer() instead")
    sys.exit(_party_main(sys.argv[2]))
