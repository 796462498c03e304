"""The device owner's opt-in to SFPrompt: the split-server reads the device's text.

What a device sends to its split-server (the hidden states of its first layers) gives the
tokens back: ``confide bench split --attack`` recovers nearly all of them, and none of the
defences in ``node.split.defences`` stops that at an accuracy worth having. So the split-server
is a *trusted* role, and the party whose text it is decides: a node takes part in an SFPrompt
job only if its owner named that split-server with ``confide node serve
--trust-split-server NAME`` (its ``--name`` or node id); otherwise the task is refused with a
reason that says so, before any activation is computed.
"""

from __future__ import annotations

from collections.abc import Collection

from confide.v1 import coordinator_pb2 as pb

__all__ = ["UntrustedSplitServer", "require_trusted_split_server"]


class UntrustedSplitServer(ValueError):
    """The job's split-server is not one this node's owner trusts with its text."""


def require_trusted_split_server(task: pb.Task, trusted: Collection[str]) -> None:
    """Raise ``UntrustedSplitServer`` unless every split-server peer of ``task`` is named (by
    name or node id) in ``trusted``. Tasks without a split-server pass."""
    for peer in task.peers:
        if peer.role != "split-server":
            continue
        if (peer.name and peer.name in trusted) or peer.node_id in trusted:
            continue
        who = f"{peer.name!r} ({peer.node_id})" if peer.name else peer.node_id
        raise UntrustedSplitServer(
            f"refused: this SFPrompt job sends this node's hidden states to split-server {who}, "
            "which can read the node's text back from them (measured: nearly every token, "
            "see the README's split-learning threat model). The node's owner has not trusted "
            "it; to take part, restart the node with `confide node serve "
            f"--trust-split-server {peer.name or peer.node_id}`"
        )
