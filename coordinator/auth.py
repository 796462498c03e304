"""Who may submit jobs (and read them): the coordinator operator's credential.

An open coordinator port used to mean open nodes: anyone who reached it could put every node
to work. A coordinator that listens beyond loopback therefore requires a credential on the
user RPCs: under ``--tls`` the client certificate of the cluster's CA (mutual TLS, checked by
gRPC before any handler runs); without TLS a bearer token, generated at first start and kept
in ``<data>/client_token`` (mode 0600), sent as gRPC metadata ``authorization: Bearer
TOKEN``. A loopback-only coordinator may run open (the demo does): whoever can reach it is
already on the machine.

The nodes' own RPCs (Register, Session, the anonymous submission) are not behind the token:
a node proves possession of its Ed25519 key on every registration and session, or signs its
anonymous update with a ring signature over the round's members; giving every data owner the
operator's token would let any of them submit jobs. The Agora registry RPCs stay open for the
same reason: the nodes' agents publish and look up protocols there.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

import grpc

TOKEN_FILE = "client_token"
SERVICE = "/confide.v1.Coordinator/"
#: RPCs that put nodes to work or change a job: always need the credential
SUBMIT_METHODS = frozenset(SERVICE + m for m in ("SubmitJob", "CancelJob", "Ask",
                                                 "ReportEvaluation"))
#: RPCs that read jobs, nodes and results: need it too unless reads are open (--open-reads)
READ_METHODS = frozenset(SERVICE + m for m in ("GetJob", "ListJobs", "WatchJob", "ListNodes",
                                               "FetchGlobalModel", "GetLedger"))


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` listens on loopback only ("0.0.0.0", "[::]" and names that are
    not "localhost" count as beyond)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_or_create_token(data_dir: Path | str) -> str:
    """The coordinator's client token, created (0600, atomically) at first start."""
    path = Path(data_dir) / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return token


def read_token(data_dir: Path | str) -> str:
    """The token a coordinator keeps in ``data_dir`` ("" when there is none)."""
    try:
        return (Path(data_dir) / TOKEN_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class TokenAuth(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer TOKEN`` on the user RPCs (reads too unless
    ``open_reads``); a call without it ends UNAUTHENTICATED before its handler runs."""

    def __init__(self, token: str, *, open_reads: bool = False) -> None:
        self._expected = f"Bearer {token}".encode()
        self.protected = SUBMIT_METHODS if open_reads else SUBMIT_METHODS | READ_METHODS

    def authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method not in self.protected
                or self.authorized(handler_call_details.invocation_metadata)):
            return handler
        return _refusing(handler, handler_call_details.method.rsplit("/", 1)[-1])


def _refusing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    message = (f"{method} needs the coordinator's client token: pass token= to the SDK, "
               "--token or CONFIDE_TOKEN to the CLI (the coordinator keeps it in "
               f"<data>/{TOKEN_FILE}), or use --tls with a client certificate of its CA")

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (a generator: abort raises)

    options = dict(request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **options)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **options)
