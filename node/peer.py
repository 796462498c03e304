"""The node's peer service (NodePeer): what other nodes, and the coordinator when it can
reach the node, ask of it directly. Later methods (DIMAT merges, split learning, MPC) add
their RPCs here; the foundation serves the node's info and the global models it holds."""

from __future__ import annotations

import grpc

from node.store import ModelStore
from protos.chunking import split_payload
from protos.codec import tensor_map_to_bytes
from protos.confide.v1 import coordinator_pb2 as pb
from protos.confide.v1 import node_pb2
from protos.confide.v1 import node_pb2_grpc as node_grpc


class NodePeerService(node_grpc.NodePeerServicer):
    def __init__(self, info: pb.NodeInfo, models: ModelStore) -> None:
        self.info = info
        self.models = models

    async def GetInfo(self, request: node_pb2.GetInfoRequest, context) -> pb.NodeInfo:
        return self.info

    async def FetchModel(self, request: node_pb2.FetchModelRequest, context):
        which = request.which or "global"
        if which != "global":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"which={which!r}: this node serves only 'global' models")
        try:
            state = self.models.load(request.job_id, "global")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"this node holds no global model for job {request.job_id!r}")
        for chunk in split_payload(tensor_map_to_bytes(state), f"{request.job_id}-global"):
            yield chunk
