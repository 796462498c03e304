"""The node's side of secure aggregation: one ``SecAggClient`` per (job, round) it takes part in.

The coordinator relays the protocol's messages on the session stream (``SecAggMessage``); this
module answers them and, once the TRAIN task is done, turns the method's update into the masked
input that replaces the plain upload (``privacy.secagg`` for the protocol, threat model and
parameters; ``node.methods.secure_layout`` for the vector). Phases 1 and 2 (keys and shares)
run while the node trains; the masked input waits for the shares forwarded in phase 2.

Whose keys a node trusts. The Setup comes with the participants' registered Ed25519 public
keys. A node id is the SHA-256 of its key (``protos.identity.node_id_for``), so the node checks
every key against its id: a coordinator that substitutes a key changes the id, and cannot
impersonate a registered node to sit in the middle of a pairwise key agreement. It can still
select nodes it controls (registered under their own ids): see the README's threat model.

What the node refuses (never crashing): a Setup whose keys do not match their ids, that does not
list it, or that breaks ``privacy.secagg``'s rules (threshold, degree, encoding); an unmask
request that would reveal both shares of a peer, lists it as dropped, or names another job or
round; any message that does not parse. Each refusal is logged and the message dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide.node.methods import get_method, method_params
from confide.node.methods.base import State
from confide.node.methods.secure_layout import flatten_update, layout_for
from confide.privacy.secagg import SecAggClient, SecAggError
from confide.privacy.secagg.distributed_dp import DistributedGaussian
from confide.privacy.secagg.messages import (
    ForwardedShares,
    KeyBundle,
    Setup,
    UnmaskRequest,
)
from confide.protos.codec import WireTensor
from confide.protos.identity import node_id_for
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

MAX_OPEN_ROUNDS = 4
"""Rounds a node keeps protocol state for (a new Setup evicts the oldest)."""
_TYPE_OFFSET = 4  # privacy.secagg.messages: b"CSA" + version, then the type byte


class SecureAggregationError(Exception):
    """The node cannot produce its masked input for this task (the message says why)."""


def registered_verifier(node_keys: Mapping[str, bytes]) -> Callable[[str, bytes, bytes], bool]:
    """``verify(node_id, payload, signature)`` against the keys the Setup came with, each
    already checked to hash to its node id."""
    keys = {}
    for node_id, raw in node_keys.items():
        if len(raw) != 32 or node_id_for(bytes(raw)) != node_id:
            raise SecureAggregationError(f"the key given for {node_id[:16]} is not that node's "
                                         "(its SHA-256 is not the node id): refusing the round")
        keys[node_id] = Ed25519PublicKey.from_public_bytes(bytes(raw))

    def verify(node_id: str, payload: bytes, signature: bytes) -> bool:
        key = keys.get(node_id)
        if key is None:
            return False
        try:
            key.verify(signature, payload)
        except InvalidSignature:
            return False
        return True

    return verify


class _Round:
    def __init__(self, client: SecAggClient, setup: Setup) -> None:
        self.client = client
        self.setup = setup
        self.forwarded: ForwardedShares | None = None
        self.ready = asyncio.Event()


class NodeSecureAggregation:
    """Answers the coordinator's secure-aggregation messages for this node and masks its
    updates. ``send`` puts a ``NodeMessage`` on the session stream."""

    def __init__(self, node_id: str, sign: Callable[[bytes], bytes],
                 send: Callable[[pb.NodeMessage], None]) -> None:
        self.node_id = node_id
        self._sign = sign
        self._send = send
        self._rounds: OrderedDict[tuple[str, int], _Round] = OrderedDict()

    def handle(self, message: pb.SecAggMessage) -> None:
        """One message from the coordinator; a bad one is logged and dropped."""
        try:
            self._handle(message)
        except (SecAggError, SecureAggregationError, ValueError) as exc:
            log.warning("secure aggregation, job %s round %d: refused a message: %s",
                        message.job_id[:12], message.round, exc)

    def _handle(self, message: pb.SecAggMessage) -> None:
        payload = bytes(message.payload)
        kind = payload[_TYPE_OFFSET] if len(payload) > _TYPE_OFFSET else -1
        key = (message.job_id, int(message.round))
        if kind == Setup.TYPE:
            setup = Setup.from_bytes(payload)
            if (setup.job_id, setup.round) != key:
                raise SecureAggregationError("the Setup names another job or round than its "
                                             "envelope")
            if self.node_id not in setup.participants:
                raise SecureAggregationError("this node is not among the Setup's participants")
            if key in self._rounds:
                raise SecureAggregationError("a second Setup for a round already set up")
            missing = set(setup.participants) - set(message.node_keys)
            if missing:
                raise SecureAggregationError(f"no registered key for {len(missing)} participant(s)")
            verify = registered_verifier({p: message.node_keys[p] for p in setup.participants})
            client = SecAggClient(self.node_id, self._sign, verify)
            advertisement = client.handle_setup(setup)
            self._rounds[key] = _Round(client, setup)
            while len(self._rounds) > MAX_OPEN_ROUNDS:
                self._rounds.popitem(last=False)
            self._reply(key, advertisement.to_bytes())
            return
        state = self._rounds.get(key)
        if state is None:
            raise SecureAggregationError("no Setup for this job and round")
        if kind == KeyBundle.TYPE:
            self._reply(key, state.client.handle_key_bundle(KeyBundle.from_bytes(payload))
                        .to_bytes())
        elif kind == ForwardedShares.TYPE:
            forwarded = ForwardedShares.from_bytes(payload)
            if state.forwarded is not None:
                raise SecureAggregationError("the shares were already forwarded")
            if (forwarded.job_id, forwarded.round, forwarded.receiver) != (*key, self.node_id):
                raise SecureAggregationError("forwarded shares for another job, round or node")
            state.forwarded = forwarded
            state.ready.set()
        elif kind == UnmaskRequest.TYPE:
            response = state.client.handle_unmask_request(UnmaskRequest.from_bytes(payload))
            self._reply(key, response.to_bytes())
        else:
            raise SecureAggregationError(f"unexpected secure-aggregation message type {kind}")

    def _reply(self, key: tuple[str, int], payload: bytes) -> None:
        self._send(pb.NodeMessage(secagg=pb.SecAggMessage(job_id=key[0], round=key[1],
                                                          payload=payload)))

    async def masked_input(self, task: pb.Task, update: dict[str, WireTensor], num_examples: int,
                           global_state: State, timeout: float) -> tuple[bytes, int]:
        """The MaskedInput bytes that replace ``update`` (the method's tensor map), and how
        many entries were clipped to the layout's bound. Waits for phase 2's shares."""
        state = self._rounds.get((task.job_id, int(task.round)))
        if state is None:
            raise SecureAggregationError("the coordinator sent no secure-aggregation Setup for "
                                         "this round")
        try:
            await asyncio.wait_for(state.ready.wait(), timeout)
        except TimeoutError as exc:
            raise SecureAggregationError("the key shares of phase 2 never came") from exc
        method = get_method(task.spec.method)
        config = method.parse_config(method_params(task.spec))
        layout = layout_for(method, config, global_state)
        if layout.dim != state.setup.dim:
            raise SecureAggregationError(f"the Setup's dimension {state.setup.dim} is not this "
                                         f"method's update size {layout.dim}")
        vector, clipped = flatten_update(layout, update)
        bound = min(layout.clip, state.setup.clip)
        clipped += int(np.count_nonzero(np.abs(vector) > bound))
        vector = np.clip(vector, -bound, bound)
        weight = min(int(num_examples), state.setup.max_weight) if layout.weighted else 1
        noise = None
        if layout.distributed_noise is not None:  # this node's share of the sum's noise
            sigma, clip_norm = layout.distributed_noise
            norm = float(np.linalg.norm(vector))
            if norm > clip_norm:  # the node's own bound, in float64 (its sensitivity)
                vector = vector * (clip_norm / norm)
            noise = DistributedGaussian(sigma, clip_norm, state.setup.threshold)
        assert state.forwarded is not None
        masked = await asyncio.to_thread(state.client.handle_forwarded_shares, state.forwarded,
                                         vector, weight, noise)
        return masked.to_bytes(), clipped
