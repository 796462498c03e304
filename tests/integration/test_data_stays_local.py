"""The promise, checked on the wire: nothing a node sends the coordinator contains its data."""

from __future__ import annotations

from confide.cluster.local import LocalCluster
from confide.node.data import Example, synthetic_classification, write_jsonl
from confide.sdk.client import Client
from tests.integration.helpers import tiny_spec, wait_for_nodes
from tests.integration.wire_capture import WireCapture

CANARY = "zebracanary"


def test_no_training_text_crosses_the_wire_to_the_coordinator(tmp_path):
    folder = tmp_path / "node0"
    folder.mkdir()
    examples = [Example(f"{e.text} {CANARY}{i} secret", e.label)
                for i, e in enumerate(synthetic_classification(64, 2, seed=3))]
    write_jsonl(folder / "train.jsonl", examples)
    cluster = LocalCluster(tmp_path / "cluster", [folder], mqtt=False)
    host, port = cluster.address.rsplit(":", 1)
    with WireCapture(host, int(port)) as capture:
        try:
            cluster.start(dial={0: capture.address})  # the node behind the capturing relay
            with Client(cluster.address) as client:
                (node,) = wait_for_nodes(client, 1)
                job = client.submit_job(tiny_spec(rounds=2, min_nodes=1, max_steps=4))
                final = client.wait_job(job.job_id)
            assert final.rounds_completed == 2
            upstream = bytes(capture.upstream)
        finally:
            cluster.stop()
    # the capture saw the node's session: its id and its update chunks
    assert node.node_id.encode() in upstream
    assert len(upstream) > sum(r.bytes.up for r in final.rounds) * 0.9
    # ... and none of its text, in any form a tokenizer-free search can find
    assert CANARY.encode() not in upstream
    for example in examples:
        assert example.text.encode() not in upstream
        assert example.text.split(" zebra")[0].encode() not in upstream
