"""Minions across real processes: a coordinator (remote model "tiny") and two node daemons
(local model "tiny") with private documents in <data>/docs. Questions go through the SDK and
the CLI; a wire capture between one node and the coordinator shows what the coordinator could
have seen: with citations "none", not a word run of the canary sentence planted in the node's
document."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from confide.cluster.local import LocalCluster
from confide.sdk.client import Client, ConfideError
from tests.integration.helpers import wait_for_nodes
from tests.integration.wire_capture import WireCapture, grpc_messages

pytestmark = pytest.mark.integration

CANARY = "Quartz otters negotiated the harbour lease with seventeen silver kettles"
DOC_A = ("Northwind Shipping opened a new depot in Hull last spring. The depot cost 4.2 "
         "million pounds and employs 85 staff.\n\n" + CANARY + ". The agreement runs until "
         "2031, according to the company's annual report.\n\nIts chairman, Edith Marlow, said "
         "exports to Norway had risen by a third.")
DOC_B = ("The Riverside festival drew 12,000 visitors. Organisers said the headline act, "
         "The Lanterns, played for two hours.")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("minions")
    dirs = []
    for name, text in (("node0", DOC_A), ("node1", DOC_B)):
        (root / name / "docs").mkdir(parents=True)
        (root / name / "docs" / "private-report.txt").write_text(text)
        dirs.append(root / name)
    cluster = LocalCluster(root / "cluster", dirs, mqtt=False,
                           coordinator_args=("--remote-model", "tiny",
                                             "--minions-max-tokens", "8"))
    host, port = cluster.address.rsplit(":", 1)
    with WireCapture(host, int(port)) as capture:
        cluster.start(dial={0: capture.address},
                      flags={0: ("--local-model", "tiny"), 1: ("--local-model", "tiny")})
        try:
            with Client(cluster.address) as client:
                wait_for_nodes(client, 2)
                yield cluster, client, capture
        finally:
            cluster.stop()


def _ask(client, question, **kwargs):
    return list(client.ask(question, timeout=120, **kwargs))


def test_questions_through_the_sdk_and_the_wire(cluster):
    _, client, capture = cluster
    nodes = sorted(n.node_id for n in client.list_nodes() if n.online)
    for mode in ("minions", "minion", "local-only"):
        events = _ask(client, "Who chairs Northwind Shipping?", mode=mode, citations="none")
        kinds = [e.kind for e in events]
        assert kinds[-1] == "answer" and "error" not in kinds, [e.message for e in events]
        final = events[-1]
        assert final.answer
        assert final.local_prompt_tokens > 0 and final.local_completion_tokens > 0
        answered = {e.node_id for e in events if e.kind == "node.answered"}
        assert answered == set(nodes)
        if mode == "local-only":
            assert final.remote_prompt_tokens == 0 and final.remote_completion_tokens == 0
        else:
            assert final.remote_prompt_tokens > 0 and final.remote_completion_tokens > 0
        if mode == "minions":
            assert "plan" in kinds
            counts = [e.remote_prompt_tokens for e in events]
            assert counts == sorted(counts)  # totals so far: never decrease
    # what node0 sent the coordinator: its replies went this way, its document did not
    upstream = bytes(capture.upstream)
    messages = [m for up, _ in capture.connections for m in grpc_messages(bytes(up))]
    assert messages and b'"outputs"' in upstream and b'"reply"' in upstream
    assert CANARY.encode() not in upstream
    words = re.findall(r"\w+", CANARY)
    for i in range(len(words) - 5):  # no run of six canary words, in any spacing
        assert " ".join(words[i:i + 6]).encode() not in upstream
    assert b"private-report" not in upstream  # file names stay private too
    # and the instructions came down it: the question, as data
    assert b"Who chairs Northwind Shipping?" in bytes(capture.downstream)


def test_the_cli_asks(cluster):
    c, _, _ = cluster
    result = subprocess.run(
        [sys.executable, "-m", "confide.cli.main", "ask", "What did the festival draw?",
         "--coordinator", c.address, "--mode", "local-only", "--anonymous"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "answer:" in result.stdout and "local tokens:" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "confide.cli.main", "ask", " ", "--coordinator",
                          c.address], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


@pytest.mark.parametrize("kwargs, code", [
    ({"question": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"question": "q", "mode": "psychic"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"question": "q", "mode": "remote-only"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"question": "q", "citations": "lots"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"question": "q", "node_ids": ["f" * 32]}, grpc.StatusCode.FAILED_PRECONDITION),
])
def test_bad_questions_are_refused(cluster, kwargs, code):
    _, client, _ = cluster
    question = kwargs.pop("question")
    with pytest.raises(ConfideError) as info:
        _ask(client, question, **kwargs)
    assert info.value.code == code
    assert client.list_nodes()  # the coordinator is still up
