"""Assembles and runs the node daemon: its key, local data, model store, peer gRPC server
(NodePeer + health) and the outbound session with the coordinator."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from confide.node.agent_service import NodeAgentService, demo_capabilities
from confide.node.anonymous import load_or_create_ring_key
from confide.node.data import LocalData
from confide.node.device import select_device
from confide.node.peer import NodePeerService
from confide.node.policy import AdmissionGate, NodePolicy, load_policy
from confide.node.privacy_guard import PrivacyGuard, PrivacySettings
from confide.node.private_inference import PrivateInference
from confide.node.session import CoordinatorLink
from confide.node.split.transport import SplitServer
from confide.node.store import ModelStore
from confide.node.worker import TaskWorker
from confide.protos.identity import RING_KEY_FEATURE, NodeKey
from confide.protos.interceptors import MalformedRequestInterceptor
from confide.protos.state import STATE_DIGEST_FEATURE
from confide.protos.tls import add_port as tls_add_port
from confide.protos.tls import configure as tls_configure
from confide.protos.tls import load as tls_load
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2_grpc as node_grpc

log = logging.getLogger(__name__)

VERSION = "0.1.0"


@dataclass
class NodeConfig:
    coordinator: str = "127.0.0.1:50051"
    #: the node's private folder: datasets (*.jsonl), its key, its models
    data_dir: Path = Path("runs/node")
    name: str = ""
    #: the peer service's address; "" disables it (a node behind NAT needs none)
    listen: str = "127.0.0.1:0"
    #: the address other parties should dial, when it differs from `listen` (NAT, docker)
    advertise: str = ""
    device: str = "auto"
    roles: list[str] = field(default_factory=lambda: ["trainer"])
    mqtt: str = ""
    #: torch intra-op threads; 0 keeps torch's default
    threads: int = 0
    #: participation cost per round, reported to budgeted jobs' truthful auctions
    cost: float = 0.0
    #: Minions: the local model that reads <data dir>/docs (agents.backends spec); also the
    #: model of the node's Agora agent (loaded on first use)
    local_model: str = "smollm2"
    #: serve an Agora agent on the peer service (NodePeer.AgentMessage)
    agent: bool = True
    #: a --tls folder (protos.tls): its certificate dials the coordinator and the peers, and
    #: the peer service requires client certificates from its CA ("" = plaintext)
    tls_dir: str = ""
    tls_name: str = ""
    #: the coordinator's anonymous port (server-only TLS); "" = the coordinator address
    anonymous_coordinator: str = ""
    #: what the node agrees to (node/policy.py), SFPrompt's trusted split-servers included;
    #: None: <data>/policy.toml, or the defaults
    policy: NodePolicy | None = None
    #: the owner's privacy budget per dataset (None: uncapped), its delta, and the datasets
    #: only DP tasks may use (node/privacy_guard.py)
    privacy_budget: float | None = None
    privacy_delta: float = 1e-5
    private_datasets: list[str] = field(default_factory=list)


class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.key = NodeKey.load_or_create(self.data_dir / "node_key.pem")
        self.ring_key = load_or_create_ring_key(self.data_dir / "ring_key.seed")
        self.tls = tls_load(config.tls_dir, config.tls_name)
        self.data = LocalData(self.data_dir)
        self.policy = config.policy or load_policy(self.data_dir)
        #: the one admission check every entry point calls before it starts work
        self.gate = AdmissionGate(self.policy)
        # before anything else runs: a corrupt ledger (LedgerError) stops the node
        self.privacy = PrivacyGuard.open(
            self.data_dir,
            PrivacySettings(config.privacy_budget, config.privacy_delta,
                            list(config.private_datasets)),
            list(self.data.datasets()))
        self.models = ModelStore(self.data_dir / "models")
        self.device = select_device(config.device)
        self.server: grpc.aio.Server | None = None
        self.link: CoordinatorLink | None = None
        self._link_task: asyncio.Task | None = None
        self.peer_port = 0
        #: private inference on the AERO models in <data dir>/private (needs the peer service)
        self.private: PrivateInference | None = None
        #: the node's Agora agent (needs the peer service)
        self.agent: NodeAgentService | None = None
        self._agent_setup: asyncio.Task | None = None

    @property
    def node_id(self) -> str:
        return self.key.node_id

    def info(self) -> pb.NodeInfo:
        info = pb.NodeInfo(
            name=self.config.name or self.node_id[:8],
            roles=self.config.roles,
            device=str(self.device),
            version=VERSION,
            ring_public_key=self.ring_key.public,
            cost=self.config.cost,
            features=[STATE_DIGEST_FEATURE, RING_KEY_FEATURE],
        )
        datasets, info.dataset_disclosure = self.policy.disclose(self.data.datasets())
        if self.peer_port:
            host = self.config.listen.rsplit(":", 1)[0]
            info.peer_address = self.config.advertise or f"{host}:{self.peer_port}"
        info.datasets.update(datasets)
        return info

    async def start(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        # every channel this process opens (peers, split-server, DIMAT) follows --tls
        tls_configure(self.tls)
        if self.config.listen:
            self.server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
            self.peer_port = tls_add_port(self.server, self.config.listen, tls=self.tls)
            if self.peer_port == 0:
                raise OSError(f"cannot listen on {self.config.listen}")
        info = self.info()
        if self.server is not None:
            split_server = (SplitServer(self.device, gate=self.gate)
                            if "split-server" in self.config.roles else None)
            self.private = PrivateInference(
                self.data_dir / "private", bind_host=self.config.listen.rsplit(":", 1)[0],
                advertise_host=info.peer_address.rsplit(":", 1)[0], gate=self.gate)
            if self.config.agent:
                # no capability yet: publishing them needs the coordinator, which may be
                # down; they are added in the background below
                self.agent = await NodeAgentService.for_node(
                    info.name, coordinator=self.config.coordinator,
                    model=self.config.local_model, device=str(self.device), capabilities=[])
                self._agent_setup = asyncio.create_task(self._publish_agent_routines())
            node_grpc.add_NodePeerServicer_to_server(
                NodePeerService(info, self.models, split_server, self.private, self.agent,
                                gate=self.gate),
                self.server)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
            await self.server.start()
            for name in ("", "confide.v1.NodePeer"):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        worker = TaskWorker(self.data, self.models, self.device,
                            local_model=self.config.local_model,
                            guard=self.privacy,
                            payload_cap=self.policy.caps.payload_bytes)
        self.link = CoordinatorLink(self.config.coordinator, self.key, info, worker,
                                    mqtt_override=self.config.mqtt, ring_key=self.ring_key,
                                    cost=self.config.cost, gate=self.gate)
        self.link.tls = self.tls
        self.link.anonymous_coordinator = self.config.anonymous_coordinator
        self._link_task = asyncio.create_task(self.link.run(), name="coordinator-link")
        log.info("node %s (%s) on %s, %d dataset(s) revealed (%s): %s; peer service %s",
                 self.node_id, info.name, self.device, len(info.datasets),
                 info.dataset_disclosure,
                 ", ".join(f"{k}={v}" for k, v in info.datasets.items()) or "none",
                 info.peer_address or "off")

    async def _publish_agent_routines(self) -> None:
        """The demo routines of the node's agent, registered at the coordinator when it can
        be reached (served unpublished otherwise)."""
        assert self.agent is not None
        for capability in demo_capabilities():
            await asyncio.to_thread(self.agent.publish, capability)

    async def stop(self) -> None:
        if self._agent_setup is not None:
            self._agent_setup.cancel()
            await asyncio.gather(self._agent_setup, return_exceptions=True)
        if self._link_task is not None:
            self._link_task.cancel()
            await asyncio.gather(self._link_task, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        if self.server is not None:
            await self.server.stop(1.0)
        if self.private is not None:
            await asyncio.to_thread(self.private.close)
        if self.agent is not None:
            await self.agent.close()  # flushes usage counts to the registry


async def serve(config: NodeConfig) -> None:
    daemon = NodeDaemon(config)
    await daemon.start()
    try:
        await asyncio.Event().wait()
    finally:
        await daemon.stop()
