"""The node's peer service (NodePeer): what other nodes, and the coordinator when it can
reach the node, ask of it directly: the node's info, the global models it holds, the body of
SFPrompt jobs on a node with the "split-server" role (``node.split.transport``), and private
inference sessions on its AERO models (``node.private_inference``)."""

from __future__ import annotations

import asyncio

import grpc

from confide.node.agent_service import NodeAgentService
from confide.node.policy import AdmissionGate, NodePolicy, Refused, TaskRequest
from confide.node.private_inference import PrivateInference, PrivateInferenceError
from confide.node.split.transport import SplitServer
from confide.node.store import ModelStore
from confide.protos.stream import stream_tensor_map
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc


class NodePeerService(node_grpc.NodePeerServicer):
    def __init__(self, info: pb.NodeInfo, models: ModelStore,
                 split_server: SplitServer | None = None,
                 private: PrivateInference | None = None,
                 agent: NodeAgentService | None = None,
                 gate: AdmissionGate | None = None) -> None:
        self.info = info
        self.gate = gate or AdmissionGate(NodePolicy())
        self.models = models
        self.split_server = split_server
        self.private = private
        self.agent = agent

    async def GetInfo(self, request: node_pb2.GetInfoRequest, context) -> pb.NodeInfo:
        return self.info

    async def FetchModel(self, request: node_pb2.FetchModelRequest, context):
        """"global": the last global state received; "shared": a decentralized job's model as
        trained in ``round`` (what its neighbours merge; only that round's, so a slow peer
        never merges a model of another round). A federated job's local state is never
        served: it would reveal the node's update."""
        which = request.which or "global"
        if which not in ("global", "shared"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"which={which!r}: this node serves 'global' and 'shared' models")
        try:  # a "shared" model is DIMAT's: whole weights handed to the node's neighbours
            self.gate.policy.admit(TaskRequest(
                role="peer-merging" if which == "shared" else "trainer", dataset=""))
        except Refused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        try:
            metadata = self.models.metadata(request.job_id, which)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if metadata is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"this node holds no {which} model for job {request.job_id!r}")
        if which == "shared" and metadata.get("round") != str(request.round):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this node's shared model of job {request.job_id!r} is from "
                                f"round {metadata.get('round')}, not {request.round}")
        # a full model (DIMAT: hundreds of MB) is read off the event loop, so the daemon's
        # heartbeats and other calls go on meanwhile; it then streams straight from the
        # tensors' memory, one chunk at a time
        state = await asyncio.to_thread(self.models.load, request.job_id, which)
        for chunk in stream_tensor_map(state or {}, f"{request.job_id}-{which}"):
            yield chunk

    async def SplitSession(self, request_iterator, context):
        if self.split_server is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this node is not a split-server (start it with "
                                "--role split-server)")
        async for reply in self.split_server.session(request_iterator, context):
            yield reply

    async def OpenPrivateInference(self, request: node_pb2.PrivateInferenceRequest, context
                                   ) -> node_pb2.PrivateInferenceSession:
        """Start the node's MPC party for one private forward (``node.private_inference``)."""
        if self.private is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this node does not serve private inference")
        try:
            return await asyncio.to_thread(self.private.open, request)
        except PrivateInferenceError as exc:
            await context.abort(exc.code, str(exc))

    async def ListPrivateModels(self, request: node_pb2.ListPrivateModelsRequest, context
                                ) -> node_pb2.ListPrivateModelsResponse:
        if self.private is None:
            return node_pb2.ListPrivateModelsResponse()
        return await asyncio.to_thread(self.private.list_models)

    async def AgentMessage(self, request: node_pb2.AgentEnvelope,
                           context) -> node_pb2.AgentEnvelope:
        """Agora: answer another agent with a routine, a fetched protocol or the local
        model (``node.agent_service``); errors come back as ``handled_by="error"``."""
        if self.agent is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this node runs no agent (it was started with --no-agent)")
        return await self.agent.handle(request)
