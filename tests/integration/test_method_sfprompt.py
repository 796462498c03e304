"""End to end: SFPrompt between real device nodes and a real split-server node.

The devices keep the embeddings, the first layer, the soft prompts and the tail; the
split-server runs the body. What crosses to the server is read off the wire: only floating
activations, a boolean mask and gradients, never token ids or labels; and what an attacker at
the split-server reads back from those activations (most of the tokens: the split-server is a
trusted role, opted into in the node policy or with --trust-split-server)."""

from __future__ import annotations

import time

import torch

from confide.cli.main import main as cli_main
from confide.cluster.experiment import Evaluator
from confide.cluster.local import LocalCluster
from confide.coordinator.broker import free_port
from confide.node.data import load_jsonl, synthetic_classification
from confide.node.methods.sfprompt import SFPromptConfig
from confide.node.models import ModelConfig
from confide.node.split.attacks import Captured, nearest_embedding
from confide.node.split.model import SplitConfig, build_split
from confide.node.store import ModelStore
from confide.protos.codec import to_dense
from confide.protos.stream import receive_tensor_map
from confide.sdk.client import Client, refusals
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2
from tests.integration.helpers import tiny_spec, wait_for_nodes
from tests.integration.wire_capture import WireCapture, grpc_messages

# tiny-bert has 2 layers: one on the device (head), one on the server (body), tail = pooler +
# classifier on the device
PARAMS = {"head_layers": 1, "tail_layers": 0, "num_prompts": 4}


def _spec(**overrides) -> pb.JobSpec:
    options = dict(method="sfprompt", rounds=2, min_nodes=2, max_steps=12,
                   learning_rate=3e-2, params=PARAMS)
    options.update(overrides)
    return tiny_spec(**options)


def test_sfprompt_trains_through_a_split_server_and_only_activations_cross(tmp_path, shards):
    folders = shards(2, per_node=64)
    spec = _spec()
    with LocalCluster(tmp_path / "cluster", folders, mqtt=False) as cluster:
        server_port = free_port()
        with WireCapture("127.0.0.1", server_port) as capture:
            cluster.start_split_server("--listen", f"127.0.0.1:{server_port}",
                                       "--advertise", capture.address)
            with Client(cluster.address) as client:
                nodes = wait_for_nodes(client, 3)
                job = client.submit_job(spec)
                events: list[pb.Event] = []
                final = client.wait_job(job.job_id, on_event=events.append)
                initial = client.fetch_global_model(job.job_id, 0)
                trained = client.fetch_global_model(job.job_id)
            upstream = bytes(capture.upstream)
            connections = [(bytes(up), bytes(down)) for up, down in capture.connections]

    assert final.state == pb.COMPLETED, final.reason
    server = next(n for n in nodes if "split-server" in n.info.roles)
    for summary in final.rounds:
        # the devices trained; the split-server was paired with them, never selected
        assert len(summary.participants) == 2
        assert server.node_id not in summary.selected
    done = [e for e in events if e.kind == "node.done"]
    assert done and all(e.metrics["split_bytes_up"] > 0 for e in done)
    # the global state is the prompts and the tail, and training moved it
    assert "head.prompts" in initial and initial["head.prompts"].shape == (4, 64)
    assert initial.keys() == trained.keys()
    assert not torch.equal(initial["head.prompts"], trained["head.prompts"])
    evaluate = Evaluator(spec, synthetic_classification(128, 2, seed=999))
    before, after = evaluate(initial), evaluate(trained)
    assert after["loss"] < before["loss"], (before, after)

    # what the split-server received, message by message
    requests = {i: [node_pb2.SplitRequest.FromString(m) for m in grpc_messages(up)]
                for i, (up, _) in enumerate(connections)}
    kinds = [r.WhichOneof("body") for stream in requests.values() for r in stream]
    assert kinds.count("open") == 4  # 2 devices x 2 rounds
    assert "forward" in kinds and "backward" in kinds
    streams: dict[tuple[int, str, int], list] = {}
    for connection, stream in requests.items():
        for request in stream:
            kind = request.WhichOneof("body")
            if kind in ("forward", "backward"):
                piece = getattr(request, kind)
                streams.setdefault((connection, kind, piece.step), []).append(piece.chunk)
    assert streams
    # the split link streams tensor maps: each step opens with a tensor's header
    assert all(chunks[0].WhichOneof("body") == "header" for chunks in streams.values())
    payloads = {key: receive_tensor_map(chunks) for key, chunks in streams.items()}
    for (_connection, kind, _step), payload in payloads.items():
        tensors = {k: to_dense(v) for k, v in payload.items()}
        if kind == "forward":
            assert set(tensors) == {"hidden", "attention_mask"}
            assert tensors["attention_mask"].dtype == torch.bool
            assert tensors["hidden"].dtype == torch.float32
            assert tensors["hidden"].shape[-1] == 64
        else:
            assert set(tensors) == {"grad"} and tensors["grad"].dtype == torch.float32
    # ... what the server reads back from them: nearest-embedding inversion with the public
    # model, scored against the devices' own sentences
    recovered = _attack_recovery([to_dense(v) for (_c, kind, _s), payload in payloads.items()
                                  if kind == "forward"
                                  for k, v in payload.items()
                                  if k == "hidden"], folders, spec)
    # chance is ~3e-5 per token; tiny-bert (random init) gives ~40%, MiniLM 100%
    # (bench/results/split_attack.json): the activations are the text
    assert recovered > 0.25, recovered
    # the device's plain bytes: the sentences are not in the bytes the server saw
    for folder in folders:
        for line in (folder / "train.jsonl").read_text().splitlines()[:16]:
            text = line.split('"text": "')[1].split('"')[0]
            assert text.encode() not in upstream
    # the server answered only with the body's output and gradients
    replies = [node_pb2.SplitReply.FromString(m)
               for _, down in connections for m in grpc_messages(down)]
    assert {r.WhichOneof("body") for r in replies} == {"ready", "output", "input_grad"}


def _attack_recovery(hidden: list[torch.Tensor], folders, spec: pb.JobSpec) -> float:
    """Share of real tokens the nearest-embedding attack recovers from the captured forward
    activations, each sequence scored against the device sentence it matches best."""
    config = SFPromptConfig(**PARAMS)
    model_cfg = ModelConfig(base=spec.model.base, num_labels=spec.model.num_labels,
                            max_length=spec.model.max_length, seed=spec.model.seed)
    public = build_split(model_cfg, SplitConfig.from_method(config, model_cfg.seed))
    texts = [ex.text for folder in folders for ex in load_jsonl(folder / "train.jsonl")]
    truth = public.tokenizer(texts, truncation=True, max_length=model_cfg.max_length,
                             padding="max_length", return_tensors="pt",
                             return_special_tokens_mask=True)
    real = (truth["attention_mask"] == 1) & (truth["special_tokens_mask"] == 0)
    hits = total = 0
    for batch in hidden:
        length = batch.shape[1] - config.num_prompts
        ids = truth["input_ids"][:, :length]
        seen = Captured(batch.float(), torch.zeros(batch.shape[0], length, dtype=torch.long),
                        torch.ones(batch.shape[0], length, dtype=torch.bool),
                        torch.zeros(batch.shape[0], length, dtype=torch.bool),
                        config.num_prompts)
        guesses = nearest_embedding(seen, public.head)
        for row in guesses:
            matches = ((row.unsqueeze(0) == ids) & real[:, :length]).sum(-1)
            best = int(matches.argmax())
            hits += int(matches[best])
            total += int(real[best, :length].sum())
    return hits / max(total, 1)


def test_split_server_killed_mid_step_fails_the_round_and_devices_keep_their_state(
        tmp_path, shards):
    spec = _spec(rounds=2, max_steps=400, batch_size=8, round_timeout_s=60)
    with LocalCluster(tmp_path / "cluster", shards(2, per_node=64), mqtt=False,
                      split_server=True) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 3)
        job = client.submit_job(spec)
        killed = False
        for event in client.watch_job(job.job_id):
            if event.kind == "node.progress" and not killed:
                cluster.kill_node(2)  # the split-server, mid-round
                killed = True
        final = client.get_job(job.job_id)
        time.sleep(1.0)
        online = [n for n in client.list_nodes() if n.online]
        initial = client.fetch_global_model(job.job_id, 0)
        device_processes = [cluster.nodes[0], cluster.nodes[1]]
        assert all(p.poll() is None for p in device_processes)  # the devices live on
    assert killed
    assert final.state == pb.FAILED
    assert final.rounds_completed == 0
    assert "split-server" in final.reason and "round 1" in final.reason, final.reason
    assert len(online) >= 2
    # each device still holds the global state it received, intact
    for index in (0, 1):
        store = ModelStore(cluster.node_data_dirs[index] / "models")
        kept = store.load(job.job_id, "global")
        assert kept is not None and kept.keys() == initial.keys()
        for name, value in initial.items():
            assert torch.equal(kept[name], value)


def test_sfprompt_without_a_split_server_fails_clearly(tmp_path, shards):
    with LocalCluster(tmp_path / "cluster", shards(2), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 2)
        job = client.submit_job(_spec(wait_for_nodes_s=3))
        final = client.wait_job(job.job_id)
    assert final.state == pb.FAILED
    assert "split-server role" in final.reason


def test_two_devices_train_the_servers_body_in_turns(tmp_path, shards):
    """body_lr > 0: the split-server trains its body; two devices must not interleave their
    steps on it (one's optimizer step would break the other's pending graph). Then a securely
    aggregated SFPrompt job on the same cluster."""
    spec = _spec(rounds=1, max_steps=8, params={**PARAMS, "body_lr": 1e-3})
    with LocalCluster(tmp_path / "cluster", shards(2, per_node=64), mqtt=False,
                      split_server=True) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 3)
        final = client.wait_job(client.submit_job(spec).job_id)
        # the prompts and tail average under secure aggregation too (the devices' masked sum)
        secure = client.wait_job(client.submit_job(
            _spec(rounds=1, max_steps=4, secure_aggregation=True)).job_id)
    assert final.state == pb.COMPLETED, final.reason
    assert len(final.rounds[0].participants) == 2
    assert secure.state == pb.COMPLETED, secure.reason
    assert secure.rounds[0].secure_aggregation and secure.rounds[0].secagg_survivors == 2


def test_the_policy_file_opts_in_and_a_node_without_it_is_dropped_with_its_reason(
        tmp_path, shards, capsys):
    """The opt-in is a key of the node policy (``trust_split_servers`` in <data>/policy.toml;
    the flag is a shortcut, and none is given here). A node whose policy lacks it refuses the
    SFPrompt task as other policy refusals do: the coordinator drops that node alone (the job
    completes with the other, min_nodes 1), and the submitter reads why in the job's status
    (``confide job status`` and the SDK's ``refusals``) and its events. A job that needs both
    nodes (min_nodes 2) fails, the refusal in its reason; both daemons live on."""
    folders = shards(2, per_node=32)
    (folders[0] / "policy.toml").write_text('trust_split_servers = ["split-server"]\n')
    with LocalCluster(tmp_path / "cluster", folders, mqtt=False, split_server=True,
                      trust_split_server="") as cluster:
        with Client(cluster.address) as client:
            nodes = wait_for_nodes(client, 3)
            job = client.submit_job(_spec(rounds=1, min_nodes=1, max_steps=4,
                                          round_timeout_s=60))
            events: list[pb.Event] = []
            final = client.wait_job(job.job_id, on_event=events.append)
            both = client.wait_job(client.submit_job(
                _spec(rounds=1, min_nodes=2, max_steps=4, round_timeout_s=60)).job_id)
        code = cli_main(["job", "status", job.job_id, "--coordinator", cluster.address])
        status = capsys.readouterr().out
        alive = [cluster.nodes[i].poll() is None for i in (0, 1)]
    ids = {n.info.name: n.node_id for n in nodes}
    assert all(alive)
    assert final.state == pb.COMPLETED, final.reason
    (summary,) = final.rounds
    assert list(summary.participants) == [ids["node0"]]
    assert set(summary.selected) == {ids["node0"], ids["node1"]}
    (why,) = refusals(final).values()
    assert list(refusals(final)) == [(1, ids["node1"])]
    for text in ("split-server 'split-server'", "read the node's text",
                 'trust_split_servers = ["split-server"]', "--trust-split-server split-server"):
        assert text in why, why
    refused = [e for e in events if e.kind == "node.refused"]
    assert [e.node_id for e in refused] == [ids["node1"]] and refused[0].message.startswith(
        "node refused: ")
    assert code == 0
    assert both.state == pb.FAILED
    assert "--trust-split-server split-server" in both.reason, both.reason
    assert list(refusals(both)) == [(1, ids["node1"])]
    assert "trust_split_servers" in status and ids["node1"][:16] in status
