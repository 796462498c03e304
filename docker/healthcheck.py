#!/usr/bin/env python3
"""``python docker/healthcheck.py HOST:PORT [--service NAME] [--tls DIR]``: asks a daemon's
standard gRPC health service (grpc.health.v1, served by the coordinator and by every node's
peer service) and exits 0 when it answers SERVING, 1 otherwise. The compose healthchecks run
it; so does docker/netns_cluster.py. Imports grpcio only (fast enough for a 5 s interval)."""

from __future__ import annotations

import argparse
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
    return p


def check(address: str, service: str = "", timeout: float = 3.0, tls: str = "") -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or the RPC error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls:  # the daemon runs with --tls: the project's TLS helpers (mutual TLS)
        from confide.protos.tls import channel as tls_channel
        from confide.protos.tls import load

        channel = tls_channel(address, tls=load(tls))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
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
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
