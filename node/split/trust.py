"""The device owner's opt-in to SFPrompt: the split-server reads the device's text.

What a device sends to its split-server (the hidden states of its first layers) gives the
tokens back: ``confide bench split --attack`` recovers nearly all of them (MiniLM, one head
layer: 100%), and none of the defences in ``node.split.defences`` stops that at an accuracy
worth having. So the split-server is a *trusted* role, and the party whose text it is decides:
a node takes part in an SFPrompt job only if its owner named that split-server (its ``--name``
or node id) in the node policy's ``trust_split_servers`` (``<data>/policy.toml``) or with the
``confide node serve --trust-split-server NAME`` shortcut. The policy (``node/policy.py``)
refuses any other task with the reason below, before any activation is computed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from confide.v1 import coordinator_pb2 as pb

__all__ = ["untrusted_split_server"]


def untrusted_split_server(peers: Iterable[pb.Peer], trusted: Collection[str]) -> str | None:
    """Why a task paired with ``peers`` may not run here: the first split-server among them
    not named (by name or node id) in ``trusted``, with how to opt in; None when every
    split-server is trusted, or the task has none."""
    for peer in peers:
        if peer.role != "split-server":
            continue
        if (peer.name and peer.name in trusted) or peer.node_id in trusted:
            continue
        who = f"{peer.name!r} ({peer.node_id})" if peer.name else peer.node_id
        name = peer.name or peer.node_id
        return (
            f"this SFPrompt job sends this node's hidden states to split-server {who}, which "
            "can read the node's text back from them (measured: nearly every token, see the "
            "README's split-learning threat model), and this node's owner has not trusted it. "
            f"To take part, add it to the node policy (trust_split_servers = [\"{name}\"] in "
            f"<data>/policy.toml) or start the node with `confide node serve "
            f"--trust-split-server {name}`"
        )
    return None
