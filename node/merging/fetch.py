"""DIMAT between daemons: fetch the neighbours' models over NodePeer, merge, keep the result.

The coordinator sends a MERGE task naming the node's neighbours (their peer addresses and
mixing weights) once every member finished training the round. The node then streams each
neighbour's model of that round straight from the neighbour (``NodePeer.FetchModel``,
which="shared": a tensor-map stream, never through the coordinator), and
merges with ``node.merging.merge.dimat_merge``. A neighbour that cannot be reached, or sends a
model that does not fit, is skipped for this merge and its weight handled by the job's
``unreachable`` policy; the node goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
import torch

from confide.protos.chunking import DEFAULT_MAX_PAYLOAD, ChunkError, wire_bytes
from confide.protos.codec import CodecError, to_dense
from confide.protos.stream import TensorMapReceiver
from confide.protos.tls import channel as tls_channel
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]


@dataclass
class Fetched:
    """What a round's fetches brought: the states that arrived, why the others did not, and
    the bytes the node received from its peers."""

    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0


def fetch_local_model(address: str, job_id: str, round_number: int, timeout_s: float,
                      max_bytes: int = DEFAULT_MAX_PAYLOAD
                      ) -> tuple[dict[str, torch.Tensor], int, int]:
    """A peer's model of ``round_number`` (dense tensors), with bytes sent and received; a
    stream that announces more than ``max_bytes`` is refused before anything is allocated."""
    request = node_pb2.FetchModelRequest(job_id=job_id, which="shared", round=round_number)
    assembler = TensorMapReceiver(max_bytes=max_bytes)
    received = 0
    with tls_channel(address, CHANNEL_OPTIONS) as channel:  # the node's --tls, if any
        stub = node_grpc.NodePeerStub(channel)
        for chunk in stub.FetchModel(request, timeout=timeout_s):
            received += wire_bytes(chunk)
            received_map = assembler.add(chunk)
            if received_map is not None:
                state = {k: to_dense(v) for k, v in received_map.items()}
                return state, wire_bytes(request), received
    raise ChunkError(f"the model stream ended early ({assembler.received_bytes} bytes)")


def fetch_neighbours(task: pb.Task, timeout_s: float,
                     max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Fetched:
    """Fetch every neighbour of a MERGE task that has an address, within one shared
    ``timeout_s``; skip the unreachable, the too slow and those over ``max_bytes``."""
    fetched = Fetched()
    deadline = time.monotonic() + timeout_s  # one budget for all: a stalled peer cannot
    for peer in task.peers:                   # spend every neighbour's time
        if peer.role != "neighbour":
            continue
        if not peer.address:
            fetched.failures[peer.node_id] = "did not train this round"
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 1.0:
            fetched.failures[peer.node_id] = "no time left in the merge's deadline"
            continue
        try:
            state, up, down = fetch_local_model(peer.address, task.job_id, task.round,
                                                remaining, max_bytes)
        except grpc.RpcError as exc:
            fetched.failures[peer.node_id] = f"{exc.code().name}: {exc.details()}"
        except (ChunkError, CodecError) as exc:
            fetched.failures[peer.node_id] = f"malformed model stream: {exc}"
        else:
            fetched.states[peer.node_id] = state
            fetched.bytes_up += up
            fetched.bytes_down += down
    for node_id, reason in fetched.failures.items():
        log.warning("merge of round %d skips neighbour %s: %s", task.round, node_id[:12], reason)
    return fetched
