"""Private inference through the product path: a real node daemon (the model owner) serves
tiny AERO-family models from its data folder; the data owner's client (``sdk.private_inference``
and ``confide infer --private``) opens sessions over gRPC and runs its party as a separate
process. Checked: logits equal plaintext within 1e-2, the gRPC request carries no input, the
node's MPC party only ever held shares and masked values of the input (its audit record), a
party that vanishes mid-inference gives the other side a clear error (no hang), and bad requests
get proper status codes while the daemon keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors import safe_open

from confide.cluster.local import LocalCluster
from confide.node import private_inference as node_private
from confide.node.aero import AeroConfig, AeroModel, default_tokenizer
from confide.node.aero_bound import measure_score_bound
from confide.node.private_inference import TokenizerSpec, publish_model
from confide.privacy import aero_2pc, mpc
from confide.sdk.private_inference import (
    PrivateInferenceError,
    encode_text,
    list_private_models,
    open_private_session,
    private_infer,
    run_private_session,
)
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc
from tests.integration.wire_capture import WireCapture, grpc_messages

T, VOCAB = 8, 64
TINY = {"max_len": T, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "init_std": 0.3}
# big enough that its forward lasts well over the time a test needs to kill a party
MEDIUM = {"max_len": 64, "d_model": 64, "n_heads": 4, "n_layers": 4, "d_ff": 128,
          "init_std": 0.3}
IDS = [7, 50, 23, 61, 2, 38, 19, 44]  # distinctive: no two equal, no run of consecutive ids
TEXT = "the markets rallied as the government said growth was strong"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    folder = root / "node0"
    tokenizer = default_tokenizer()
    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    vocab = [tokenizer.unk_token_id, tokenizer.cls_token_id]
    vocab += [t for t in dict.fromkeys(text_ids) if t not in vocab]
    vocab += [t for t in range(1000, 2000) if t not in vocab][: VOCAB - len(vocab)]
    spec = TokenizerSpec("minilm", tuple(vocab), 0)
    models = {
        "tiny": AeroModel(AeroConfig.baseline(VOCAB, **TINY)).eval(),
        "tiny-aero": AeroModel(AeroConfig.softmax_only(VOCAB, seed=1, **TINY)).eval(),
        "medium": AeroModel(AeroConfig.baseline(256, **MEDIUM)).eval(),
    }
    for name, model in models.items():
        publish_model(model, folder, name, spec if name == "tiny-aero" else None)
    # tiny-aero's architecture with smaller weights (scores within the max-free softmax's
    # stated range), exported with its measured score bound: the max-free softmax
    bounded = AeroModel(AeroConfig.softmax_only(VOCAB, seed=2, **(TINY | {"init_std": 0.2})))
    models["tiny-aero-bound"] = bounded.eval()
    calibration = [IDS, list(range(2, 2 + T))]
    bound = measure_score_bound(bounded, calibration)
    publish_model(bounded, folder, "tiny-aero-bound", spec, softmax_bound=bound,
                  calibration=calibration)
    # a file that is not a model, and a pickle under a safetensors name: never served
    (folder / "private" / "notes.safetensors").write_bytes(b"\x00" * 64)
    (folder / "private" / "pickled.safetensors").write_bytes(
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94.")
    port = _free_port()
    cluster = LocalCluster(root / "cluster", [folder], mqtt=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(node_private.AUDIT_ENV, "1")  # the node's parties record their view
        cluster.start(flags={0: ("--listen", f"127.0.0.1:{port}")})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                list_private_models(address, timeout=5)
                break
            except PrivateInferenceError:
                assert time.monotonic() < deadline, cluster.log("node0").read_text()[-2000:]
                time.sleep(0.2)
        yield {"address": address, "port": port, "folder": folder, "models": models,
               "spec": spec, "tokenizer": tokenizer, "cluster": cluster}
    finally:
        cluster.stop()


def _status(folder: Path, session_id: str) -> dict:
    return node_private.read_status(folder / "private" / "sessions" / f"{session_id}.json")


def _wait_status(folder: Path, session_id: str, states: set[str], timeout: float = 60.0,
                 poll: float = 0.01) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(folder, session_id)
        if status.get("state") in states:
            return status
        time.sleep(poll)
    raise AssertionError(f"session {session_id} never reached {states}: {status}")


def _plain(model: AeroModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids))


# --------------------------------------------------------------------------------------------
# What a node's party saw


def _encodings(ids: list[int]) -> list[bytes]:
    """The ways a list of token ids could appear in bytes on a wire or in a tensor."""
    t = torch.tensor(ids)
    return [bytes(ids),                                   # uint8 / single-byte varints (packed)
            t.to(torch.int32).numpy().tobytes(), t.numpy().tobytes(),       # int32 / int64 LE
            (t * 2**16).numpy().tobytes(),                # fixed-point encoded, as CrypTen does
            ",".join(map(str, ids)).encode(), " ".join(map(str, ids)).encode(),
            json.dumps(ids).encode()]


def leaks_input(tensors: dict[str, torch.Tensor], ids: list[int], vocab: int) -> list[str]:
    """Names of recorded int64 tensors from which the input can be read in the clear: the
    one-hot matrix (plain or fixed-point encoded: one 1 or 2^16 per row, zeros elsewhere; or
    any (T, V) tensor whose row maxima sit at the ids), or the ids themselves as a run of
    values in any encoding above."""
    found = []
    patterns = _encodings(ids)
    for name, tensor in tensors.items():
        if tensor.shape == (len(ids), vocab):
            # (opened comparison bits are 0/1 too, but random: not one 1 per row)
            onehot = any(bool(((tensor == 0) | (tensor == one)).all()
                              and ((tensor == one).sum(-1) == 1).all()) for one in (1, 2**16))
            if onehot or torch.equal(tensor.argmax(-1), torch.tensor(ids)):
                found.append(f"{name}: one-hot")
        raw = tensor.numpy().tobytes()
        if any(p in raw for p in patterns):
            found.append(f"{name}: ids")
    return found


def test_leak_scanner_finds_a_plaintext_input():
    """The audit check below is not vacuous: it flags the input sent in the clear."""
    onehot = torch.nn.functional.one_hot(torch.tensor(IDS), VOCAB).long()
    leaky = {"a": onehot, "b": onehot * 2**16, "c": torch.tensor([3, *IDS, 9])}
    assert sorted(leaks_input(leaky, IDS, VOCAB)) == ["a: one-hot", "b: one-hot", "c: ids"]
    clean = {"d": torch.randint(-(2**62), 2**62, (T, VOCAB))}
    assert leaks_input(clean, IDS, VOCAB) == []


# --------------------------------------------------------------------------------------------
# The client path


def test_private_inference_matches_plaintext_and_the_node_never_sees_the_input(node):
    with WireCapture("127.0.0.1", node["port"]) as capture:
        result = private_infer(capture.address, "tiny", IDS, timeout_s=20)
        upstream = [grpc_messages(bytes(up)) for up, _ in capture.connections]
        downstream = [grpc_messages(bytes(down)) for _, down in capture.connections]

    # the output: logits revealed to this process only, equal to plaintext within 1e-2
    expected = _plain(node["models"]["tiny"], IDS)
    assert result.logits.shape == (T, VOCAB)
    error = (result.logits - expected).abs().max().item()
    assert error < 1e-2, f"max abs error {error:.3g} vs plaintext"
    assert expected.abs().max() > 1.0
    assert result.next_token_id == int(expected[-1].argmax())
    assert result.stats.bytes > 0 and result.stats.rounds > 0 and result.forward_s > 0

    # the wire to the node: one OpenPrivateInference request, with no ids in any encoding
    messages = [m for conn in upstream for m in conn]
    assert len(messages) == 1
    request = node_pb2.PrivateInferenceRequest.FromString(messages[0])
    assert (request.model, request.seq_len, request.provider) == ("tiny", T, "TFP")
    exactly = node_pb2.PrivateInferenceRequest(model="tiny", seq_len=T, provider="TFP",
                                               timeout_s=20)
    assert exactly.SerializeToString() == messages[0]  # these four fields, nothing else
    everything_sent = b"".join(bytes(up) for up, _ in capture.connections)
    for pattern in _encodings(IDS):
        assert pattern not in everything_sent
    (reply,) = [m for conn in downstream for m in conn]
    session = node_pb2.PrivateInferenceSession.FromString(reply)
    assert session.session_id == result.session_id
    assert (session.data_owner_rank, session.model_owner_rank) == (0, 1)
    assert json.loads(session.config_json)["vocab_size"] == VOCAB

    # the node's MPC party: its whole view of the input is its share of the one-hot matrix
    # and the values opened to it during the protocol (recorded from CrypTen's communicator)
    status = _wait_status(node["folder"], result.session_id, {"done", "failed"})
    assert status["state"] == "done", status
    assert status["stats"]["bytes"] == result.stats.bytes  # both parties count the same traffic
    audit_path = node["folder"] / "private" / "sessions" / f"{result.session_id}.audit.safetensors"
    with safe_open(str(audit_path), framework="pt") as handle:
        seen = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        calls = json.loads(handle.metadata()["calls"])
    shares = {k: v for k, v in seen.items() if k.endswith("input_share")}
    assert [tuple(v.shape) for v in shares.values()] == [(T, VOCAB)]
    # the masked input opened in the embedding matmul (onehot - a, a unknown to the node)
    assert any(tuple(v.shape) == (T, VOCAB) and "all_reduce" in k for k, v in seen.items())
    assert len(seen) > 100 and calls["all_reduce"] > 100
    assert calls.get("reduce") == 1  # the logits: sent towards the data owner, nothing back
    assert leaks_input(seen, IDS, VOCAB) == []
    # and its share looks like what it is: uniform ring elements
    share = next(iter(shares.values()))
    assert (share.abs() < 2**40).float().mean().item() < 0.01


def test_a_model_with_a_score_bound_runs_the_max_free_softmax(node):
    listed = list_private_models(node["address"])
    assert "softmax_bound" not in listed["tiny-aero"]
    bound = listed["tiny-aero-bound"]["softmax_bound"]
    assert bound > 0
    assert bound <= 5.2  # within the max-free softmax's stated range
    exact = private_infer(node["address"], "tiny-aero", IDS, timeout_s=20)
    free = private_infer(node["address"], "tiny-aero-bound", IDS, timeout_s=20)
    for name, result in (("tiny-aero", exact), ("tiny-aero-bound", free)):
        expected = _plain(node["models"][name], IDS)
        assert (result.logits - expected).abs().max().item() < 2e-2
        assert torch.equal(result.logits.argmax(-1), expected.argmax(-1))
    assert free.config["softmax_bound"] == bound
    # no row-max comparisons: fewer bytes and rounds than the same architecture with CrypTen's
    assert free.stats.bytes < exact.stats.bytes and free.stats.rounds < exact.stats.rounds
    status = _wait_status(node["folder"], free.session_id, {"done", "failed"})
    assert status["state"] == "done" and status["stats"]["bytes"] == free.stats.bytes


def test_cli_text_under_the_trusted_third_party(node):
    """``confide infer --private --text`` tokenizes on the client with the model's tokenizer;
    TTP: the client also runs the dealer, as a third process."""
    cmd = [sys.executable, "-m", "confide.cli.main", "--log-level", "WARNING", "infer", "--private",
           "--node", node["address"], "--model", "tiny-aero", "--text", TEXT,
           "--provider", "TTP", "--timeout", "20", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    config = list_private_models(node["address"])["tiny-aero"]
    ids = encode_text(TEXT, config, node["tokenizer"])
    assert out["token_ids"] == ids and len(ids) == T  # the last max_len tokens
    assert ids[-1] != 0  # in the model's vocabulary, not [UNK]
    expected = _plain(node["models"]["tiny-aero"], ids)
    error = (torch.tensor(out["logits"]) - expected).abs().max().item()
    assert error < 1e-2, error
    assert out["provider"] == "TTP" and out["stats"]["rounds"] > 0
    predicted = node["spec"].ids[int(expected[-1].argmax())]
    assert out["next_token"] == node["tokenizer"].convert_ids_to_tokens(predicted)

    listed = subprocess.run([*cmd[:5], "infer", "--private", "--node", node["address"],
                             "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "tiny-aero" in listed.stdout
    assert "notes" not in listed.stdout and "pickled" not in listed.stdout


# --------------------------------------------------------------------------------------------
# Parties that vanish


def test_the_nodes_party_vanishing_mid_inference_is_a_clear_error(node):
    ids = list(range(1, 65))
    session = open_private_session(node["address"], "medium", 64, timeout_s=5)
    outcome: dict = {}

    def client() -> None:
        try:
            outcome["result"] = run_private_session(session, ids, node["address"])
        except Exception as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    status = _wait_status(node["folder"], session.session_id, {"joined", "done", "failed"})
    assert status["state"] == "joined", status
    os.kill(status["pid"], signal.SIGKILL)  # the node's party process, mid-forward
    killed = time.monotonic()
    thread.join(60)
    assert not thread.is_alive(), "the client hung after the node's party died"
    error = outcome.get("error")
    assert isinstance(error, mpc.MpcPeerError), outcome
    text = str(error)
    assert node["address"] in text and "node's party is gone" in text
    assert "disconnected or did not answer" in text
    assert outcome["at"] - killed < 5 + 10  # within the step timeout, plus process teardown


def test_the_clients_party_vanishing_fails_the_nodes_session_not_the_node(node):
    session = open_private_session(node["address"], "medium", 64, timeout_s=5)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"rendezvous": session.rendezvous, "rank": 0, "model_owner_rank": 1,
               "provider": "TFP", "timeout_s": 5.0, "config": json.loads(session.config_json),
               "seq_len": 64, "token_ids": list(range(1, 65))}
        party = subprocess.Popen([sys.executable, "-m", "confide.sdk.private_inference",
                                  "data-owner",
                                  tmp], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        assert party.stdin is not None
        party.stdin.write(json.dumps(job).encode())
        party.stdin.close()
        try:
            status = _wait_status(node["folder"], session.session_id,
                                  {"joined", "done", "failed"})
            assert status["state"] == "joined", status
        finally:
            party.kill()
            party.wait()
    status = _wait_status(node["folder"], session.session_id, {"done", "failed"}, timeout=30)
    assert status["state"] == "failed" and status.get("peer"), status
    assert "disconnected or did not answer within 5s" in status["error"]
    log = node["cluster"].log("node0")
    deadline = time.monotonic() + 10
    while f"session {session.session_id} (model medium) failed" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    assert "medium" in list_private_models(node["address"])  # the daemon serves on


# --------------------------------------------------------------------------------------------
# Bad requests, limits


@pytest.mark.parametrize(("request_fields", "code", "needle"), [
    ({"model": "nope", "seq_len": 4}, grpc.StatusCode.NOT_FOUND, "serves: medium, tiny"),
    ({"model": "", "seq_len": 4}, grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
    ({"model": "../tiny", "seq_len": 4}, grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
    ({"model": "tiny", "seq_len": 0}, grpc.StatusCode.INVALID_ARGUMENT, "seq_len must be in"),
    ({"model": "tiny", "seq_len": T + 1}, grpc.StatusCode.INVALID_ARGUMENT, "[1, 8]"),
    ({"model": "tiny", "seq_len": 4, "provider": "XYZ"}, grpc.StatusCode.INVALID_ARGUMENT,
     "provider"),
    ({"model": "tiny", "seq_len": 4, "timeout_s": -1}, grpc.StatusCode.INVALID_ARGUMENT,
     "timeout_s"),
    ({"model": "tiny", "seq_len": 4, "timeout_s": 1e9}, grpc.StatusCode.INVALID_ARGUMENT,
     "timeout_s"),
    ({"model": "notes", "seq_len": 4}, grpc.StatusCode.FAILED_PRECONDITION, "not servable"),
    ({"model": "pickled", "seq_len": 4}, grpc.StatusCode.FAILED_PRECONDITION, "not servable"),
])
def test_bad_requests_get_a_status_and_the_daemon_keeps_serving(node, request_fields, code,
                                                                needle):
    with grpc.insecure_channel(node["address"]) as channel:
        stub = node_grpc.NodePeerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenPrivateInference(node_pb2.PrivateInferenceRequest(**request_fields),
                                      timeout=10)
        assert info.value.code() == code, info.value.details()
        assert needle in info.value.details()
        listed = stub.ListPrivateModels(node_pb2.ListPrivateModelsRequest(), timeout=10)
        assert sorted(m.name for m in listed.models) == ["medium", "tiny", "tiny-aero",
                                                         "tiny-aero-bound"]


def test_sessions_are_limited_and_finished_parties_are_reaped(node):
    """Two sessions at most; a data owner that never shows up costs a slot for the session's
    timeout, then the node's party gives up, is reaped, and the slot is free again."""
    opened = []
    deadline = time.monotonic() + 60
    while len(opened) < 2:  # earlier tests' parties may still be finishing
        try:
            opened.append(open_private_session(node["address"], "tiny", 4, timeout_s=2))
        except PrivateInferenceError as exc:
            assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert time.monotonic() < deadline
            time.sleep(0.2)
    with pytest.raises(PrivateInferenceError) as info:
        open_private_session(node["address"], "tiny", 4, timeout_s=2)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit" in str(info.value)
    for session in opened:
        status = _wait_status(node["folder"], session.session_id, {"done", "failed"}, 60, 0.2)
        assert status["state"] == "failed" and "joining the session" in status["error"]
    deadline = time.monotonic() + 30
    while True:
        try:
            later = open_private_session(node["address"], "tiny", 4, timeout_s=1)
            break
        except PrivateInferenceError as exc:
            assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "finished parties were not reaped"
            time.sleep(0.2)
    assert later.session_id not in {s.session_id for s in opened}


def test_the_public_architecture_keys_match_privacy_mpc():
    assert node_private.ARCH_KEYS == aero_2pc.ARCH_KEYS
    assert node_private.PROVIDERS == mpc.PROVIDERS
    with pytest.raises(ValueError, match="lists 3 ids"):
        TokenizerSpec.from_dict({"name": "minilm", "ids": [1, 2, 3]}, vocab_size=4)
