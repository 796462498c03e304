"""Mutual TLS across real processes: a coordinator and nodes started with --tls.

Accept path: nodes with certificates from the cluster's CA register, train, merge peer to peer
and stream split-learning activations, all over TLS. Reject path: a node without a certificate,
one with a certificate from another CA and one speaking plaintext never get a session (the
handshake fails: UNAVAILABLE) while the coordinator goes on serving the others. Anonymous
uploads use the coordinator's server-only-TLS port, so they carry no node certificate.
"""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from confide.cluster.local import LocalCluster
from confide.coordinator.broker import free_port
from confide.protos.tls import TLSConfig, channel, configure, create_ca, issue_certificate
from confide.sdk.client import Client, ConfideError
from confide.sdk.private_inference import PrivateInferenceError, list_private_models
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc
from tests.integration.helpers import tiny_spec, wait_for_nodes
from tests.integration.wire_capture import WireCapture

TLS_RECORD = b"\x16\x03"          # a TLS handshake record opens every TLS connection
HTTP2_PREFACE = b"PRI * HTTP/2.0"  # what a plaintext gRPC connection opens with


def confide(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "confide.cli.main", "--log-level", "WARNING",
                           *args],
                          capture_output=True, text=True, timeout=timeout)


def _rejected(cluster: LocalCluster, index: int, timeout: float = 30.0) -> str:
    """Wait until node ``index``'s log shows its link failing; return the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = cluster.log(f"node{index}").read_text(errors="replace")
        if "coordinator link down (UNAVAILABLE" in text:
            return text
        time.sleep(0.3)
    raise AssertionError(f"node{index} was not refused:\n{text[-2000:]}")


def test_mutual_tls_cluster_trains_and_refuses_nodes_without_a_ca_certificate(tmp_path, shards):
    # a stranger CA, and a folder that trusts the right CA but holds no certificate
    create_ca(tmp_path / "other-ca")
    rogue = tmp_path / "rogue"
    issue_certificate(tmp_path / "other-ca", "node9", rogue)
    cluster = LocalCluster(tmp_path / "cluster", shards(5), mqtt=False,
                           tls_dir=tmp_path / "pki")
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    try:
        cluster.start_coordinator()
        (ca_only / "ca.pem").write_bytes((tmp_path / "pki" / "ca" / "ca.pem").read_bytes())
        cluster.start_node(0)
        cluster.start_node(1)
        cluster.start_node(2, "--tls", str(rogue))      # certificate from another CA
        cluster.start_node(3, "--tls", "")              # plaintext
        # TLS, but no client certificate (and so no peer service: it would need one)
        cluster.start_node(4, "--tls", str(ca_only), "--listen", "")
        client_dir = cluster.tls_folder("client")
        with Client(cluster.address, tls=client_dir) as client:
            nodes = wait_for_nodes(client, 2)
            for index in (2, 3, 4):
                _rejected(cluster, index)
            job = client.submit_job(tiny_spec(rounds=1, min_nodes=2, max_steps=2))
            final = client.wait_job(job.job_id)
            assert final.state == pb.COMPLETED, final.reason
            # the refused nodes never registered, and the coordinator kept serving
            registered = client.list_nodes()
            assert {n.info.name for n in registered} == {"node0", "node1"}
            assert cluster.coordinator.poll() is None

            # anonymous uploads under TLS: the server-only port, no node certificate
            anonymous = client.submit_job(tiny_spec(rounds=1, min_nodes=2, max_steps=2,
                                                    anonymous=True))
            final = client.wait_job(anonymous.job_id)
            assert final.state == pb.COMPLETED, final.reason
            assert all(p.startswith("anon-") for p in final.rounds[0].participants)
            assert len(final.rounds[0].participants) == 2

            # the nodes' peer services require client certificates too
            peer_address = nodes[0].info.peer_address
        tls = TLSConfig.from_folder(client_dir)
        # trusts the right CA but presents a certificate of another: only the server can
        # refuse it (a --tls folder like this is refused at start, see the unit tests)
        foreign = TLSConfig(root=tls.root, cert=(rogue / "node9.pem").read_bytes(),
                            key=(rogue / "node9.key").read_bytes())
        with channel(peer_address, tls=tls) as ch:
            info = node_grpc.NodePeerStub(ch).GetInfo(node_pb2.GetInfoRequest(), timeout=10)
            assert info.name in ("node0", "node1")
        for config in (None, tls.without_identity(), foreign, TLSConfig.from_folder(rogue)):
            with channel(peer_address, tls=config) as ch, pytest.raises(grpc.RpcError) as err:
                node_grpc.NodePeerStub(ch).GetInfo(node_pb2.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # private inference's calls follow the process configuration (the CLI's --tls)
        with pytest.raises(PrivateInferenceError, match="UNAVAILABLE"):
            list_private_models(peer_address, timeout=5)
        try:
            configure(tls)
            assert list_private_models(peer_address) == {}
        finally:
            configure(None)

        # the SDK without a client certificate, with a stranger's, or in plaintext: refused
        for tls_choice in (ca_only, rogue, foreign, None):
            with Client(cluster.address, tls=tls_choice, timeout=5) as client, \
                    pytest.raises(ConfideError) as err:
                client.list_nodes()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE

        # the anonymous port: TLS without a client certificate, the anonymous RPCs only
        anonymous_address = f"127.0.0.1:{cluster.anonymous_port}"
        with channel(anonymous_address, tls=tls.without_identity()) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            assert len(stub.GetChallenge(pb.GetChallengeRequest(), timeout=10).nonce) >= 16
            with pytest.raises(grpc.RpcError) as err:
                stub.ListNodes(pb.ListNodesRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # the CLI: global or per-command --tls
        status = confide("status", "--coordinator", cluster.address, "--tls", str(client_dir))
        assert status.returncode == 0, status.stderr
        assert "2 of 2 node(s) online" in status.stdout
        status = confide("--tls", str(client_dir), "job", "list", "--coordinator",
                         cluster.address)
        assert status.returncode == 0 and job.job_id in status.stdout, status.stderr
        refused = confide("status", "--coordinator", cluster.address, timeout=60)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
        assert cluster.coordinator.poll() is None
    finally:
        cluster.stop()


def test_split_learning_and_dimat_peer_channels_run_over_tls(tmp_path, shards):
    """The peer channels follow --tls: split-learning streams (the bytes on the wire are a
    TLS session, not HTTP/2 in the clear) and DIMAT's model fetches between nodes."""
    cluster = LocalCluster(tmp_path / "cluster", shards(3, per_node=48), mqtt=False,
                           tls_dir=tmp_path / "pki")
    try:
        cluster.start()
        server_port = free_port()
        with WireCapture("127.0.0.1", server_port) as capture, \
                Client(cluster.address, tls=cluster.tls_folder("client")) as client:
            cluster.start_split_server("--listen", f"127.0.0.1:{server_port}",
                                       "--advertise", capture.address)
            wait_for_nodes(client, 4)
            split = client.submit_job(tiny_spec(
                method="sfprompt", rounds=1, min_nodes=3, max_steps=4, learning_rate=3e-2,
                params={"head_layers": 1, "tail_layers": 0, "num_prompts": 4}))
            final = client.wait_job(split.job_id)
            assert final.state == pb.COMPLETED, final.reason
            connections = [bytes(up) for up, _ in capture.connections]
            dimat = client.submit_job(tiny_spec(
                method="dimat", rounds=1, min_nodes=3, max_steps=4,
                params={"topology": "ring", "match_examples": 16}))
            final = client.wait_job(dimat.job_id)
        assert final.state == pb.COMPLETED, final.reason
        assert final.rounds[0].metrics["neighbours_merged"] == 2
        assert connections and all(up.startswith(TLS_RECORD) for up in connections if up)
        assert not any(HTTP2_PREFACE in up for up in connections)
    finally:
        cluster.stop()
