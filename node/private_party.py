"""The MPC party processes of private inference, each started as a fresh process.

``python -m confide.node.private_party model-owner ...`` is what a node daemon starts for every
``OpenPrivateInference`` session (``node.private_inference``): it hosts the session's rendezvous
store on the port the daemon chose, loads the model (safetensors only), joins the CrypTen
session as the model owner and runs ``aero_2pc.private_forward`` with its weights. It
never receives the data owner's token ids (only secret shares and values masked by Beaver
triples it does not know) and never the logits (they are revealed to the data owner alone).
It reports its progress in a small JSON status file the daemon reads, and with ``--audit`` it
records everything it received during the protocol (see :class:`Audit`).

``python -m confide.node.private_party dealer --rendezvous tcp://HOST:PORT`` runs the Beaver-triple
dealer of the trusted-third-party provider (TTP). The data owner's client starts one locally
(``sdk.private_inference``); a real deployment runs it on a third machine that colludes with
neither party.

All parties join torch.distributed as clients of the store the node's party hosts
(:func:`use_node_hosted_store`), so the data owner, which is rank 0, needs no listening port
for the rendezvous.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def use_node_hosted_store() -> None:
    """Make torch.distributed's ``tcp://`` rendezvous connect to an existing store instead of
    starting one in rank 0 (torch's switch for an externally hosted store). Call in every
    party process (and the dealer) before joining; the node's party hosts the store."""
    os.environ[AGENT_STORE_ENV] = "True"


def dial_host(bind: str) -> str:
    """The address a process on the node dials to reach a store bound to ``bind``."""
    bind = bind.strip("[]")
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


class StatusFile:
    """A JSON file the daemon reads: state (starting, waiting, joined, done, failed) and more."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"pid": os.getpid()}

    def write(self, **fields: Any) -> None:
        self.data |= fields | {"time": time.time()}
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class Audit:
    """Records what this party received during the protocol, for an audit.

    Two kinds of things reach a party: its *shares* of the other party's inputs (here the data
    owner's one-hot token matrix; CrypTen derives them from pseudo-random seeds, so no message
    carries them) and the values *opened* to it (results of ``all_reduce``, ``broadcast``,
    ``recv`` ... on CrypTen's communicator: the masked differences of every Beaver
    multiplication and the masked bits of every comparison). Both are written as int64
    tensors (the ring elements, as CrypTen holds them) to a safetensors file, in order, with
    a count of every communicator call in the metadata (``reduce`` towards the other party
    delivers nothing to this one). This is the party's whole view of the data owner's input,
    next to its own weights.
    """

    RECEIVING = ("all_reduce", "reduce", "broadcast", "recv", "gather", "all_gather",
                 "scatter", "recv_obj", "broadcast_obj")

    def __init__(self, path: str, own_rank: int) -> None:
        self.path = Path(path)
        self.own_rank = own_rank
        self.tensors: dict[str, Any] = {}
        self.calls: dict[str, int] = {}

    def _add(self, kind: str, value: Any) -> None:
        import torch

        if torch.is_tensor(value):
            self.tensors[f"{len(self.tensors):05d}.{kind}"] = value.detach().clone().long()
        elif isinstance(value, list | tuple):
            for item in value:
                self._add(kind, item)

    def install(self) -> None:
        import crypten.communicator as comm

        from confide.privacy import mpc

        original_encrypt = mpc.encrypt

        def encrypt(tensor, src, shape=None):
            out = original_encrypt(tensor, src, shape)
            if src != self.own_rank:  # the other party's input: what this party holds of it
                self._add("input_share", out.share)
            return out

        mpc.encrypt = encrypt  # private_forward looks the name up at call time
        communicator = comm.get()
        for name in self.RECEIVING:
            original = getattr(communicator, name)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                result = _original(*args, **kwargs)
                self.calls[_name] = self.calls.get(_name, 0) + 1
                if result is not None:
                    self._add(_name, result)
                return result

            setattr(communicator, name, wrapped)

    def save(self) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(self.path),
                  metadata={"calls": json.dumps(self.calls), "rank": str(self.own_rank)})


def run_model_owner(args: argparse.Namespace) -> int:
    status = StatusFile(args.status)
    status.write(state="starting", session_id=args.session_id)
    import torch

    torch.set_num_threads(1)
    use_node_hosted_store()
    from confide.node.aero import load_aero
    from confide.privacy import aero_2pc, mpc

    try:
        # the session's rendezvous store lives here, on the node, for the session's lifetime
        store = torch.distributed.TCPStore(
            args.bind, args.port, None, True,
            timeout=datetime.timedelta(seconds=args.timeout), wait_for_workers=False)
        model = load_aero(args.model_file)
        config = model.config.to_dict()
        from safetensors import safe_open

        from confide.node.private_inference import softmax_bound_of

        with safe_open(args.model_file, framework="pt") as handle:
            bound = softmax_bound_of(handle.metadata() or {})
        if bound is not None:  # the max-free softmax, as advertised in the public config
            config["softmax_bound"] = bound
        expected = json.loads(args.arch_json)
        if {k: config.get(k) for k in expected} != expected:
            raise mpc.MpcError(f"{args.model_file} changed since the session was offered")
        state = model.state_dict()
    except Exception as exc:
        traceback.print_exc()
        status.write(state="failed", error=f"setting up: {type(exc).__name__}: {exc}")
        return 1
    audit = Audit(args.audit, args.rank) if args.audit else None
    rendezvous = f"tcp://{dial_host(args.bind)}:{args.port}"
    status.write(state="waiting", rendezvous=rendezvous)
    print(f"session {args.session_id}: waiting for the data owner at {rendezvous} "
          f"(provider {args.provider}, seq_len {args.seq_len}, timeout {args.timeout:g}s)",
          flush=True)
    try:
        with mpc.mpc_session(args.rank, 2, rendezvous, timeout_s=args.timeout,
                             provider=args.provider) as party:
            status.write(state="joined")
            if audit is not None:
                audit.install()
            start = time.perf_counter()
            revealed = aero_2pc.private_forward(config, args.seq_len, state_dict=state,
                                           model_owner=args.rank,
                                           data_owner=args.data_owner_rank)
            forward_s = time.perf_counter() - start
            if revealed is not None:  # cannot happen: the logits go to the data owner only
                raise mpc.MpcError("the logits were revealed to the model owner")
            stats = party.stats()
    except mpc.MpcPeerError as exc:
        print(f"session {args.session_id}: {exc}", flush=True)
        status.write(state="failed", error=str(exc), peer=True)
        return 3
    except Exception as exc:
        traceback.print_exc()
        status.write(state="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if audit is not None:
            with contextlib.suppress(Exception):
                audit.save()
    status.write(state="done", forward_s=forward_s, stats=stats.to_dict())
    print(f"session {args.session_id}: done, forward {forward_s:.2f}s, {stats.rounds} rounds, "
          f"{stats.bytes} bytes (this party)", flush=True)
    time.sleep(0.5)  # the store outlives the other parties' teardown
    del store
    return 0


def run_dealer(rendezvous: str, timeout_s: float) -> None:
    """The TTP dealer (rank 2): deals Beaver triples until the data owner closes its session."""
    import torch

    torch.set_num_threads(1)
    use_node_hosted_store()
    from confide.privacy import mpc

    mpc.run_ttp_server(2, rendezvous, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m confide.node.private_party",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("model-owner", help="the node's party (started by the node daemon)")
    p.add_argument("--session-id", required=True)
    p.add_argument("--model-file", required=True)
    p.add_argument("--arch-json", required=True, help="the architecture the node advertised")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--provider", default="TFP", choices=["TFP", "TTP"])
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--bind", default="127.0.0.1", help="where the rendezvous store listens")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--data-owner-rank", type=int, default=0)
    p.add_argument("--status", default="", help="JSON status file")
    p.add_argument("--audit", default="", help="record what this party receives (safetensors)")
    d = sub.add_parser("dealer", help="the TTP dealer, on a machine trusted by both parties")
    d.add_argument("--rendezvous", required=True, help="tcp://HOST:PORT of the session")
    d.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.role == "dealer":
        run_dealer(args.rendezvous, args.timeout)
        return 0
    return run_model_owner(args)


if __name__ == "__main__":
    sys.exit(main())
