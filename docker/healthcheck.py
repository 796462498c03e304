#!/usr/bin/env python3
"""``python docker/healthcheck.py HOST:PORT [--service NAME] [--tls DIR] [--registered]``:
asks a daemon's standard gRPC health service (grpc.health.v1, served by the coordinator and by
every node's peer service) and exits 0 when it answers SERVING, 1 otherwise. ``--registered``
(a node's check) also asks the coordinator ($CONFIDE_COORDINATOR, with $CONFIDE_TOKEN) and
passes only once it lists this node ($CONFIDE_ADVERTISE) online: a node whose peer service is
up but whose registration failed or has not happened yet is not healthy, so nothing that
depends on it starts early. The compose healthchecks run it; so does docker/netns_cluster.py.
Imports grpcio and the generated stubs only (fast enough for a 5 s interval)."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__)
    p.add_argument("address", help="the daemon's gRPC HOST:PORT")
    p.add_argument("--service", default="",
                   help="a service name (confide.v1.Coordinator, confide.v1.NodePeer); "
                        "'' = the whole server (default)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls", default="", metavar="DIR",
                   help="the daemon runs with --tls: a folder with ca.pem and a certificate")
    p.add_argument("--registered", action="store_true",
                   help="a node: also require that the coordinator ($CONFIDE_COORDINATOR) "
                        "lists it ($CONFIDE_ADVERTISE) online")
    return p


def _channel(address: str, tls: str):
    import grpc

    if tls:  # the daemon runs with --tls: the project's TLS helpers (mutual TLS)
        from confide.protos.tls import channel as tls_channel
        from confide.protos.tls import load

        return tls_channel(address, tls=load(tls))
    return grpc.insecure_channel(address)


def _import_stubs():
    """The generated coordinator stubs, without running ``confide/__init__.py``: it imports
    the SDK and with it torch, seconds on a loaded machine (past a healthcheck's timeout);
    the stubs need grpcio and protobuf only."""
    import importlib.util
    import types

    if "confide" not in sys.modules:
        spec = importlib.util.find_spec("confide")
        if spec is not None and spec.submodule_search_locations:
            package = types.ModuleType("confide")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            sys.modules["confide"] = package
    from confide.v1 import coordinator_pb2, coordinator_pb2_grpc

    return coordinator_pb2, coordinator_pb2_grpc


def registered(coordinator: str, advertise: str, token: str = "", timeout: float = 3.0,
               tls: str = "") -> str:
    """"REGISTERED" when the coordinator lists a node advertising ``advertise`` online, else
    why not (the RPC error, or the peer addresses it does list)."""
    import grpc

    pb, pb_grpc = _import_stubs()
    if not coordinator or not advertise:
        return "CONFIDE_COORDINATOR and CONFIDE_ADVERTISE must be set for --registered"
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with _channel(coordinator, tls) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).ListNodes(
                pb.ListNodesRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            return f"coordinator {coordinator}: {exc.code().name}: {exc.details()}"
    online = [n.info.peer_address for n in reply.nodes if n.online]
    if advertise in online:
        return "REGISTERED"
    return f"not online at {coordinator} (online: {', '.join(online) or 'none'})"


def check(address: str, service: str = "", timeout: float = 3.0, tls: str = "") -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or the RPC error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = check(args.address, args.service, args.timeout, args.tls)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    if status != "SERVING":
        return 1
    if args.registered:
        env = os.environ
        state = registered(env.get("CONFIDE_COORDINATOR", ""), env.get("CONFIDE_ADVERTISE", ""),
                           env.get("CONFIDE_TOKEN", ""), args.timeout,
                           args.tls or env.get("CONFIDE_TLS", ""))
        print(f"{env.get('CONFIDE_ADVERTISE', '?')} at the coordinator: {state}")
        return 0 if state == "REGISTERED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
