"""The ``confide`` command line: run the daemons, submit and watch jobs, prepare data,
run the demo and the benchmarks. ``confide COMMAND --help`` explains each command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

DESCRIPTION = """\
Confide: privacy-preserving, decentralized collaboration between language-model agents.
Raw data never leaves the node that owns it.

Typical session on one machine:
  confide coordinator serve --data runs/coordinator
  confide data bbc --nodes 3 --out runs/data
  confide node serve --coordinator 127.0.0.1:50051 --data runs/data/node0
  confide job submit --base minilm --num-labels 5 --rounds 3 --min-nodes 2 --wait
  confide status
Or everything at once: confide demo
"""


def _run_until_signal(coro) -> int:
    """Run a daemon coroutine; SIGINT/SIGTERM stop it gracefully."""

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await coro

    asyncio.run(main())
    return 0


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from confide.coordinator.server import CoordinatorConfig, serve

    config = CoordinatorConfig(
        listen=args.listen,
        data_dir=Path(args.data),
        mqtt=args.mqtt,
        mqtt_listen=args.mqtt_listen,
        heartbeat_interval_s=args.heartbeat,
        remote_model=args.remote_model,
        minions_max_tokens=args.minions_max_tokens,
    )
    config.tls_dir = getattr(args, "tls", "")
    config.tls_name = getattr(args, "tls_name", "")
    config.anonymous_listen = args.anonymous_listen
    config.token = args.token
    config.open_reads = args.open_reads
    config.dashboard = args.dashboard
    if config.dashboard:  # a dashboard that would be open beyond loopback never starts
        from confide.coordinator.auth import is_loopback
        from confide.coordinator.dashboard.server import dashboard_token

        enforced = bool(config.token) or (not config.tls_dir and not is_loopback(config.listen))
        try:
            dashboard_token(config.dashboard, "token" if enforced else "")
        except ValueError as exc:  # DashboardRefused included
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if config.tls_dir:
        from confide.protos.tls import TLSError, load

        try:  # a bad folder is an error message, not a traceback
            load(config.tls_dir, config.tls_name).server_credentials()
        except TLSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    ready = Path(args.ready_file) if args.ready_file else None
    return _run_until_signal(serve(config, ready))


def cmd_node_serve(args: argparse.Namespace) -> int:
    from confide.node.daemon import NodeConfig, serve

    config = NodeConfig(
        coordinator=args.coordinator,
        data_dir=Path(args.data),
        name=args.name,
        listen=args.listen,
        advertise=args.advertise,
        device=args.device,
        roles=args.role or ["trainer"],
        mqtt=args.mqtt,
        threads=args.threads,
        cost=args.cost,
        local_model=args.local_model,
        agent=not args.no_agent,
    )
    config.tls_dir = getattr(args, "tls", "")
    config.tls_name = getattr(args, "tls_name", "")
    config.anonymous_coordinator = args.anonymous_coordinator
    from confide.node.policy import PolicyError

    try:
        config.policy = _policy_from_args(args)
    except PolicyError as exc:
        print(f"error: policy: {exc}", file=sys.stderr)
        return 2
    config.privacy_budget = args.privacy_budget
    config.privacy_delta = args.delta
    config.private_datasets = args.private_dataset or []
    from confide.privacy.budget import LedgerError

    try:
        return _run_until_signal(serve(config))
    except LedgerError as exc:  # never start from an empty budget
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. --device cuda on a machine without CUDA
        print(f"error: {exc}", file=sys.stderr)
        return 2


#: the node policy's caps as `confide node serve` flags: flag, cap, type, metavar, meaning
CAP_FLAGS = [
    ("--max-local-steps", "local_steps_per_round", int, "N", "local steps per round"),
    ("--max-rounds", "rounds_per_job", int, "N", "rounds per job"),
    ("--max-examples", "examples_per_round", int, "N", "examples per round"),
    ("--max-task-seconds", "seconds_per_task", float, "S",
     "seconds per task; a longer task is stopped"),
    ("--max-payload-mb", "payload_bytes", float, "MB", "MiB a task may bring in"),
    ("--max-concurrent-jobs", "concurrent_jobs", int, "N", "jobs worked for at once"),
]


def _policy_from_args(args: argparse.Namespace):
    """The node's effective policy: its file (``--policy``, default ``<data>/policy.toml``)
    with the command-line flags applied."""
    from confide.node.policy import load_policy

    def listed(value: str | None) -> list[str] | None:
        return None if value is None else [v.strip() for v in value.split(",") if v.strip()]

    caps = {cap: getattr(args, flag[2:].replace("-", "_")) for flag, cap, *_ in CAP_FLAGS}
    if caps["payload_bytes"] is not None:
        caps["payload_bytes"] = int(caps["payload_bytes"] * (1 << 20))
    return load_policy(args.data, args.policy or None).with_overrides(
        allow_models=[os.path.abspath(os.path.expanduser(d)) for d in args.allow_model or ()],
        methods=listed(args.methods), roles=listed(args.roles),
        private_datasets=args.private_dataset or (), reveal=args.reveal, caps=caps,
        trust_split_servers=args.trust_split_server or ())


def cmd_node_policy_show(args: argparse.Namespace) -> int:
    import json

    from confide.node.policy import PolicyError, to_toml

    try:
        policy = _policy_from_args(args)
    except PolicyError as exc:
        print(f"error: policy: {exc}", file=sys.stderr)
        return 2
    data = policy.to_mapping()
    print(json.dumps(data, indent=2) if args.json else to_toml(data), end="" if not args.json
          else "\n")
    return 0


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "policy", "what this node agrees to run (node/policy.py); flags override the policy "
        "file; `confide node policy show` prints the result")
    g.add_argument("--policy", default="", metavar="FILE",
                   help="the policy file (default: <data>/policy.toml; the safe defaults when "
                        "it does not exist)")
    g.add_argument("--allow-model", action="append", metavar="DIR",
                   help="a local model folder jobs may name as model.base (and folders inside "
                        "it; symlinks are resolved first), repeatable")
    g.add_argument("--methods", default=None, metavar="M1,M2",
                   help="the only methods this node runs (default: every shipped method)")
    g.add_argument("--roles", default=None, metavar="R1,R2",
                   help="what it takes part in: trainer, split-server, peer-merging, "
                        "private-inference, minions (default: all)")
    if "--private-dataset" not in p._option_string_actions:  # the DP budget's flag is this one
        g.add_argument("--private-dataset", action="append", metavar="NAME",
                       help="a dataset only differentially private methods may use, "
                            "repeatable")
    g.add_argument("--reveal", default=None, choices=["exact", "coarse", "hidden"],
                   help="what registration reveals of the datasets: names and sizes, sizes "
                        "rounded up to a power of two, or nothing (default: exact)")
    g.add_argument("--trust-split-server", action="append", metavar="NAME",
                   help="take part in SFPrompt (split learning) jobs whose split-server is NAME "
                        "(its --name or node id), repeatable; added to the policy's "
                        "trust_split_servers. The split-server can read this node's text from "
                        "the activations it receives (README: split-learning threat model); "
                        "a node that trusts none refuses SFPrompt tasks")
    from confide.node.policy import Caps

    defaults = Caps()
    for flag, cap, kind, metavar, what in CAP_FLAGS:
        default = getattr(defaults, cap) / (1 << 20 if cap == "payload_bytes" else 1)
        g.add_argument(flag, type=kind, default=None, metavar=metavar,
                       help=f"cap: {what} (default {default:g}; caps.{cap})")


def _spec_from_args(args: argparse.Namespace):
    import json

    from confide.sdk.client import job_spec

    params = json.loads(args.params) if args.params else None
    return job_spec(
        args.method,
        name=args.name,
        rounds=args.rounds,
        min_nodes=args.min_nodes,
        nodes_per_round=args.nodes_per_round,
        task=args.task,
        base=args.base,
        num_labels=args.num_labels,
        max_length=args.max_length,
        lora_r=args.lora_r,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        dataset=args.dataset,
        round_timeout_s=args.round_timeout,
        wait_for_nodes_s=args.wait_for_nodes,
        seed=args.seed,
        params=params,
        anonymous=args.anonymous,
        anonymity_set=args.anonymity_set,
        budget=args.budget,
        secure_aggregation=args.secure_aggregation,
    )


def format_event(event) -> str:
    from confide.v1 import coordinator_pb2 as pb

    parts = [f"#{event.seq:<4} {event.kind:<16}"]
    if event.round:
        parts.append(f"round {event.round}")
    if event.node_id:
        parts.append(f"node {event.node_id[:8]}")
    if event.message:
        parts.append(event.message)
    if event.metrics:
        parts.append(" ".join(f"{k}={v:.4g}" for k, v in sorted(event.metrics.items())))
    if event.bytes.up or event.bytes.down:
        parts.append(f"up {_human(event.bytes.up)} down {_human(event.bytes.down)}")
    if event.state:
        parts.append(f"[{pb.JobState.Name(event.state)}]")
    return "  ".join(parts)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _client(args: argparse.Namespace):
    from confide.sdk.client import Client

    return Client(args.coordinator, tls=_client_tls(args), token=_client_token(args))


#: where `confide coordinator serve` keeps its state (and client token) by default
DEFAULT_COORDINATOR_DATA = "runs/coordinator"


def _client_token(args: argparse.Namespace) -> str:
    """--token, else $CONFIDE_TOKEN, else the token in the coordinator's --data folder (by
    default runs/coordinator, where a coordinator started here keeps it)."""
    from confide.sdk.client import resolve_token

    return resolve_token(getattr(args, "token", "") or None,
                         getattr(args, "data", "") or DEFAULT_COORDINATOR_DATA)


def _client_tls(args: argparse.Namespace):
    """The client commands' ``--tls DIR`` (protos.tls), or None for plaintext."""
    from confide.protos.tls import load

    return load(getattr(args, "tls", ""), getattr(args, "tls_name", ""))


def _sdk_errors(func):
    def wrapper(args: argparse.Namespace) -> int:
        from confide.sdk.client import ConfideError

        try:
            return func(args)
        except ConfideError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper


@_sdk_errors
def cmd_job_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.submit_job(_spec_from_args(args))
        print(f"submitted job {status.job_id}")
        if not args.wait:
            return 0
        final = client.wait_job(status.job_id, lambda e: print(format_event(e)))
        return 0 if final.state == 3 else 1


@_sdk_errors
def cmd_job_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for event in client.watch_job(args.job_id):
            print(format_event(event))
    return 0


@_sdk_errors
def cmd_job_list(args: argparse.Namespace) -> int:
    from confide.v1 import coordinator_pb2 as pb

    with _client(args) as client:
        jobs = client.list_jobs()
    print(f"{'JOB':<14}{'METHOD':<14}{'STATE':<11}{'ROUNDS':<8}REASON")
    for job in jobs:
        print(f"{job.job_id:<14}{job.spec.method:<14}{pb.JobState.Name(job.state):<11}"
              f"{job.rounds_completed}/{job.spec.rounds:<6}{job.reason}")
    return 0


@_sdk_errors
def cmd_job_status(args: argparse.Namespace) -> int:
    """A job's state and each round's outcome, with every dropped or refused node's
    reason."""
    from confide.v1 import coordinator_pb2 as pb

    with _client(args) as client:
        status = client.get_job(args.job_id)
    spec = status.spec
    print(f"job {status.job_id} ({spec.name or spec.method}): {pb.JobState.Name(status.state)}, "
          f"{status.rounds_completed}/{spec.rounds} rounds")
    print(f"  method {spec.method}, base {spec.model.base}, dataset {spec.train.dataset}, "
          f"min_nodes {spec.min_nodes}, round timeout {spec.round_timeout_s:g}s")
    if status.reason:
        print(f"  reason: {status.reason}")
    if spec.secure_aggregation:
        print("  secure aggregation: the coordinator saw masked updates and each round's sum")
    print(f"  {'ROUND':>5}  {'STATE':<10}{'NODES':>6}{'DROPPED':>8}  {'SECURE SUM':<22}"
          f"{'UP (KB)':>10}{'SECONDS':>9}")
    for r in status.rounds:
        sum_of = (f"yes: {r.secagg_survivors} survivors, t={r.secagg_threshold}"
                  if r.secure_aggregation else "no")
        print(f"  {r.round:>5}  {r.state:<10}{len(r.participants):>6}{len(r.dropped):>8}  "
              f"{sum_of:<22}{r.bytes.up / 1e3:>10.1f}{r.seconds:>9.1f}")
        for node, reason in r.dropped.items():
            print(f"{'':>9}{node[:16]}: {reason}")
    return 0


@_sdk_errors
def cmd_job_show(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    with _client(args) as client:
        print(json_format.MessageToJson(client.get_job(args.job_id)))
    return 0


@_sdk_errors
def cmd_job_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.cancel_job(args.job_id)
    print(f"job {status.job_id}: {status.reason}")
    return 0


@_sdk_errors
def cmd_job_fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    with _client(args) as client:
        state = client.fetch_global_model(args.job_id)
    save_file({k: v.contiguous() for k, v in state.items()}, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


@_sdk_errors
def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from confide.bench.audit import audit_global_model, reference_losses
    from confide.node.data import load_jsonl

    members = load_jsonl(Path(args.members))
    nonmembers = load_jsonl(Path(args.non_members))
    if not members or not nonmembers:
        print("error: --members and --non-members must each hold at least one example",
              file=sys.stderr)
        return 2
    with _client(args) as client:
        status = client.get_job(args.job_id)
        state = client.fetch_global_model(args.job_id)
    spec = status.spec
    refs = []
    if args.reference_data and args.references:
        refs = reference_losses(spec, load_jsonl(Path(args.reference_data)),
                                members + nonmembers, args.references, args.reference_size,
                                args.reference_epochs, spec.train.learning_rate or 2e-3, 0)
    results = audit_global_model(spec, state, members, nonmembers, refs, args.delta)
    epsilon = status.rounds[-1].metrics.get("epsilon") if status.rounds else None
    if args.json:
        print(json.dumps({"job": args.job_id, "accounted_epsilon": epsilon, "delta": args.delta,
                          "attacks": results}, indent=2))
        return 0
    print(f"job {args.job_id} ({spec.method}): accounted epsilon "
          f"{f'{epsilon:.3g}' if epsilon is not None else 'none (not private)'} at delta "
          f"{args.delta:g}; {len(members)} members, {len(nonmembers)} non-members")
    print(f"{'attack':<16}{'AUC':>7}{'TPR@1%FPR':>11}{'TPR@0.1%FPR':>13}{'eps lower bound':>17}")
    for r in results:
        print(f"{r['attack']:<16}{r['auc']:>7.3f}{r['tpr_at_1pct_fpr']:>11.3f}"
              f"{r['tpr_at_0_1pct_fpr']:>13.3f}{r['epsilon_lower_bound']:>17.3f}")
    return 0


@_sdk_errors
def cmd_status(args: argparse.Namespace) -> int:
    from confide.v1 import coordinator_pb2 as pb

    with _client(args) as client:
        nodes = client.list_nodes()
        jobs = client.list_jobs()
        ledger = client.get_ledger()
    print(f"coordinator {args.coordinator}: {sum(n.online for n in nodes)} of {len(nodes)} "
          "node(s) online")
    print(f"{'NODE':<34}{'NAME':<12}{'STATE':<9}{'DEVICE':<8}{'ROLES':<16}{'PAID':>8}  DATASETS")
    for node in nodes:
        state = ("busy" if node.busy else "online") if node.online else "offline"
        datasets = ", ".join(f"{k}={v}" for k, v in node.info.datasets.items())
        paid = ledger.totals.get(node.node_id, 0.0)
        print(f"{node.node_id:<34}{node.info.name[:11]:<12}{state:<9}{node.info.device:<8}"
              f"{','.join(node.info.roles)[:15]:<16}{paid:>8.3f}  {datasets}")
    budgets = [(node, row) for node in nodes for row in node.info.privacy]
    if budgets:
        print()
        print(f"{'NODE':<12}{'DATASET':<16}{'EPSILON SPENT':>14}{'BUDGET':>9}{'DELTA':>9}"
              f"{'JOBS':>6}  PRIVATE")
        for node, row in budgets:
            budget = f"{row.epsilon_budget:g}" if row.epsilon_budget else "none"
            print(f"{node.info.name[:11]:<12}{row.dataset[:15]:<16}{row.epsilon_spent:>14.3f}"
                  f"{budget:>9}{row.delta:>9.0e}{row.charges:>6}  "
                  f"{'yes' if row.private else 'no'}")
    if jobs:
        print()
        print(f"{'JOB':<14}{'METHOD':<14}{'STATE':<11}ROUNDS")
        for job in jobs:
            print(f"{job.job_id:<14}{job.spec.method:<14}{pb.JobState.Name(job.state):<11}"
                  f"{job.rounds_completed}/{job.spec.rounds}")
    return 0


def _protocol_json(message) -> dict:
    import json

    data = {f: getattr(message, f) for f in ("hash", "name", "description", "task_kind",
                                              "multiround", "rules", "uses")}
    for field in ("request_schema", "response_schema"):
        data[field] = json.loads(getattr(message, field))
    return data


@_sdk_errors
def cmd_protocols_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        documents = client.list_protocols(args.task_kind)
    print(f"{'HASH':<14}{'TASK KIND':<24}{'USES':>6}  NAME")
    for d in documents:
        print(f"{d.hash[:12]:<14}{d.task_kind[:23]:<24}{d.uses:>6}  {d.name}")
    return 0


@_sdk_errors
def cmd_protocols_show(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        wanted = args.hash.lower()
        if len(wanted) < 64:  # a prefix, as `protocols list` prints them
            matches = [d.hash for d in client.list_protocols() if d.hash.startswith(wanted)]
            if len(matches) != 1:
                print(f"error: {len(matches)} protocols start with {wanted!r}; give more of "
                      "the hash", file=sys.stderr)
                return 1
            wanted = matches[0]
        print(json.dumps(_protocol_json(client.get_protocol(wanted)), indent=2,
                         ensure_ascii=False))
    return 0


@_sdk_errors
def cmd_protocols_register(args: argparse.Namespace) -> int:
    import json

    from confide.agents.agora import AgoraError, ProtocolDocument

    try:
        document = ProtocolDocument.from_dict(json.loads(Path(args.file).read_text()))
    except (OSError, ValueError) as exc:  # AgoraError is a ValueError
        kind = "invalid protocol document" if isinstance(exc, AgoraError) else "cannot read"
        print(f"error: {kind} {args.file}: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        stored = client.register_protocol(document.to_proto())
    print(f"registered {stored.hash} ({stored.task_kind}: {stored.name}), {stored.uses} use(s)")
    return 0


@_sdk_errors
def cmd_agent_send(args: argparse.Namespace) -> int:
    """One message to a node's Agora agent (NodePeer.AgentMessage), optionally anonymous."""
    import json

    import grpc

    from confide.node.anonymous import AnonymityError, load_or_create_ring_key, sign_agent_message
    from confide.protos.tls import channel as tls_channel
    from confide.sdk.client import ConfideError
    from confide.v1 import node_pb2
    from confide.v1 import node_pb2_grpc as node_grpc

    if args.body:
        try:
            json.loads(args.body)
        except ValueError as exc:
            print(f"error: --body must be JSON ({exc})", file=sys.stderr)
            return 2
    envelope = node_pb2.AgentEnvelope(sender="" if args.anonymous else args.sender,
                                      task_kind=args.task_kind, protocol_hash=args.protocol,
                                      body=args.body, text=args.text)
    try:
        if args.protocol == "auto":  # the registry's most used document for the task kind
            with _client(args) as client:
                documents = client.list_protocols(args.task_kind)
            envelope.protocol_hash = documents[0].hash if documents else ""
        if args.anonymous:
            if not args.data:
                print("error: --anonymous needs --data (the node folder holding its ring key)",
                      file=sys.stderr)
                return 2
            key = load_or_create_ring_key(Path(args.data) / "ring_key.seed")
            with _client(args) as client:
                ring = client.get_ring("")
            envelope = sign_agent_message(envelope, ring, key)
        with tls_channel(args.node, tls=_client_tls(args)) as channel:
            reply = node_grpc.NodePeerStub(channel).AgentMessage(envelope, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ConfideError, AnonymityError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"handled_by": reply.handled_by, "body": reply.body, "text": reply.text,
                      "error": reply.error, "prompt_tokens": reply.prompt_tokens,
                      "completion_tokens": reply.completion_tokens}))
    return 0 if reply.handled_by != "error" else 1


def cmd_ask(args: argparse.Namespace) -> int:
    """A question over the nodes' private documents (Minions); events as they come."""
    import json

    from google.protobuf import json_format

    node_ids = [n for n in (args.nodes or "").split(",") if n.strip()]
    answer = None
    with _client(args) as client:
        for event in client.ask(args.question, mode=args.mode, node_ids=node_ids,
                                max_rounds=args.max_rounds, citations=args.citations,
                                anonymous=args.anonymous):
            if args.json:
                print(json.dumps(json_format.MessageToDict(event), ensure_ascii=False),
                      flush=True)
            elif event.kind != "answer":
                node = f"node {event.node_id[:8]}  " if event.node_id else ""
                print(f"{event.kind:<14}{node}{event.message}", flush=True)
            if event.kind in ("answer", "error"):
                answer = event
    if answer is None or answer.kind == "error":
        if answer is not None and not args.json:
            print(f"error: {answer.message}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"\nanswer: {answer.answer}")
        print(f"remote tokens: {answer.remote_prompt_tokens} prompt + "
              f"{answer.remote_completion_tokens} completion; local tokens: "
              f"{answer.local_prompt_tokens} prompt + {answer.local_completion_tokens} "
              "completion")
    return 0


def cmd_data_bbc(args: argparse.Namespace) -> int:
    from confide.node.data import prepare_bbc_shards

    summary = prepare_bbc_shards(Path(args.out), nodes=args.nodes, alpha=args.alpha,
                                 test_fraction=args.test_fraction, seed=args.seed,
                                 max_train_per_node=args.max_per_node or None)
    print(f"wrote {args.nodes} node shard(s) and a held-out test set to {args.out}")
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from confide.cli.demo import run_demo

    return run_demo(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from confide.cli.simulate import run_simulate

    return run_simulate(args)


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"confide.bench.{args.action}")
    if hasattr(args, "methods"):  # a typo in --methods fails now, not after minutes of setup
        try:
            importlib.import_module("confide.bench.federated").parse_methods(args.methods)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return module.run_benchmark(args)


def cmd_infer(args: argparse.Namespace) -> int:
    """Private inference on a node's model (``sdk.private_inference``)."""
    import json

    from confide.sdk.private_inference import (
        PrivateInferenceError,
        list_private_models,
        private_infer,
    )

    if not args.private:
        print("error: nodes offer inference on their models only as two-party computation: "
              "add --private (your input stays with you, the node's weights with the node)",
              file=sys.stderr)
        return 2
    try:
        if args.list:
            for name, config in list_private_models(args.node).items():
                tokenizer = (config.get("tokenizer") or {}).get("name", "ids only")
                print(f"{name:<20} d_model {config['d_model']}, {config['n_layers']} layer(s), "
                      f"vocab {config['vocab_size']}, max_len {config['max_len']}, layernorm "
                      f"{config['layernorm']}, activation {config['activation']}, tokenizer "
                      f"{tokenizer}, softmax {_softmax_mode(config)}")
            return 0
        if not args.model or (args.text is None) == (args.ids is None):
            print("error: give --model and exactly one of --text or --ids", file=sys.stderr)
            return 2
        source = args.text if args.text is not None else [
            int(x) for x in args.ids.replace(" ", "").split(",") if x]
        result = private_infer(args.node, args.model, source, provider=args.provider,
                               timeout_s=args.timeout)
    except ValueError as exc:
        print(f"error: --ids must be comma-separated integers ({exc})", file=sys.stderr)
        return 2
    except PrivateInferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # privacy.mpc.MpcPeerError / MpcError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(logits=True)))
        return 0
    top = result.logits[-1].topk(min(5, result.logits.shape[-1]))
    print(f"model {result.model} on node {result.node}, {len(result.token_ids)} token(s), "
          f"provider {result.provider}, session {result.session_id}")
    shown = result.next_token if result.next_token is not None else "-"
    top5 = top.indices.tolist()
    if result.next_token is not None:
        from confide.sdk.private_inference import decode_token

        top5 = [f"{i} ({decode_token(i, result.config)})" for i in top5]
    print(f"next token: id {result.next_token_id} ({shown}); top-5 ids {top5} logits "
          f"{[round(v, 3) for v in top.values.tolist()]}")
    print(f"softmax: {_softmax_mode(result.config)}")
    print(f"2PC forward {result.forward_s:.2f}s ({result.total_s:.1f}s with set-up), "
          f"{result.stats.rounds} rounds, {result.stats.bytes / 1e6:.1f} MB sent+received by "
          "this party; the logits were revealed to this process only")
    return 0


def _softmax_mode(config: dict) -> str:
    """How the model's attention softmax runs under 2PC (privacy.aero_2pc)."""
    bound = config.get("softmax_bound")
    if bound is None:
        return "CrypTen's (row max by comparisons)"
    return f"max-free (public score bound {bound:g}, no comparisons)"


def cmd_aero_train(args: argparse.Namespace) -> int:
    from confide.node.aero_training import train_command

    return train_command(args)


BENCHMARKS = {
    "federated": "federated methods side by side on non-IID BBC News, through real daemons",
    "ringsig": "linkable ring signature sign/verify time vs ring size",
    "split": "SFPrompt split learning vs federated full fine-tuning and FedAvg-LoRA",
    "dimat": "DIMAT vs gossip vs local-only merging between peers, through real daemons",
    "private": "AERO vs LayerNorm+GELU decoders under CrypTen 2PC: bytes, rounds, seconds, "
               "error, perplexity",
    "minions": "Minions/MinionS vs remote-only and local-only on long BBC articles: accuracy "
               "and remote tokens",
    "agora": "Agora agents: routines, negotiated protocols and natural language vs an "
             "all-natural-language baseline: model tokens and bytes",
    "secagg": "secure aggregation (SecAgg+) vs the plain round: bytes and seconds per phase at "
              "3-100 nodes with dropouts, and plain vs secure fedavg-lora through real daemons",
    "audit": "membership inference (loss threshold, offline LiRA) against non-private and "
             "example-level DP-LoRA global models: AUC, TPR at low FPR, empirical epsilon",
    "soak": "one coordinator under many simulated node sessions (1,000 by default): sessions "
            "held, round latency, heartbeat RTT, coordinator memory",
    "simulate": "many virtual nodes on Ray (10-200): wall time per round and peak memory vs "
                "nodes, the 200 MiniLM LoRA nodes goal, and (--dp-curve) accuracy vs nodes "
                "per round at node-level epsilon 8",
    "dashboard": "the web dashboard with 10-3,000 nodes online: page load to rendered node "
                 "table in headless Chromium",
    "stream": "tensor-map streaming vs a memory copy and a raw gRPC stream (150 MB-2 GB "
              "states): MB/s and peak RSS at each end",
}


def _add_token_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default="",
                   help="the coordinator's client token (default: $CONFIDE_TOKEN, else the one "
                        "in the coordinator's --data folder on this machine)")
    p.add_argument("--data", default="", metavar="DIR",
                   help="the coordinator's data folder, to read its client token from "
                        "(default: runs/coordinator)")


def _add_job_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--method", default="fedavg-lora", help="learning method (default: %(default)s)")
    g.add_argument("--name", default="", help="a label for the job")
    g.add_argument("--rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    g.add_argument("--min-nodes", type=int, default=1,
                   help="results a round needs to count (default: %(default)s)")
    g.add_argument("--nodes-per-round", type=int, default=0,
                   help="nodes sampled per round, 0 = every online node (default)")
    g.add_argument("--task", default="sequence-classification",
                   choices=["sequence-classification", "causal-lm"])
    g.add_argument("--base", default="tiny-bert",
                   help="minilm, smollm2, tiny-bert, tiny-llama or a local model folder "
                        "(default: %(default)s)")
    g.add_argument("--num-labels", type=int, default=2, help="classes (classification)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    g.add_argument("--max-steps", type=int, default=0, help="cap on local steps, 0 = none")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=5e-4, help="local learning rate")
    g.add_argument("--dataset", default="train", help="node-local dataset name (default: train)")
    g.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for results (default: %(default)s)")
    g.add_argument("--wait-for-nodes", type=float, default=60.0,
                   help="seconds a round waits for --min-nodes to be online")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--params", default="", help='method parameters as JSON, e.g. \'{"k": 0.1}\'')
    g.add_argument("--anonymous", action="store_true",
                   help="nodes submit updates ring-signed, outside their sessions: the "
                        "coordinator cannot tell which update came from which node")
    g.add_argument("--anonymity-set", type=int, default=0, metavar="K",
                   help="with --anonymous: each update is signed over a set of at least K of "
                        "the round's nodes (the whole round when it has fewer than 2K), so "
                        "the coordinator's check costs O(K), not O(nodes); smaller K hides "
                        "each node among fewer others (0: the default, 32)")
    g.add_argument("--budget", type=float, default=0.0,
                   help="per-round payment budget: select nodes by a truthful auction over "
                        "their reported costs (0 = no incentives)")
    g.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: nodes upload masked vectors and the coordinator learns only "
                        "the sum of each round's surviving updates (fedavg-lora, fedavg-full, "
                        "sfprompt, ferret, dp-lora mode local; README 'Secure aggregation')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="confide", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    coord = sub.add_parser("coordinator", help="the coordinator service")
    coord_sub = coord.add_subparsers(dest="action", required=True)
    p = coord_sub.add_parser("serve", help="run the coordinator daemon")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="gRPC address (default: %(default)s)")
    p.add_argument("--data", default="runs/coordinator",
                   help="folder for SQLite state and global models (default: %(default)s)")
    p.add_argument("--mqtt", default="",
                   help="external broker mqtt://HOST:PORT; 'none' disables MQTT events; "
                        "unset starts an embedded broker")
    p.add_argument("--mqtt-listen", default="127.0.0.1:1883",
                   help="where the embedded broker listens (default: %(default)s)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="node heartbeat interval, s")
    p.add_argument("--ready-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--remote-model", default="smollm2",
                   help="Minions' remote model: smollm2, tiny, path:DIR or openai:URL#model "
                        "(a real API; key in OPENAI_API_KEY), loaded on the first question "
                        "(default: %(default)s)")
    p.add_argument("--minions-max-tokens", type=int, default=0,
                   help="cap every generation of a question, remote and local, at N tokens "
                        "(0 = the protocol's defaults)")
    p.add_argument("--token", default=os.environ.get("CONFIDE_TOKEN", ""),
                   help="the client token to accept (default: $CONFIDE_TOKEN, else the one "
                        "generated at first start in <data>/client_token, mode 0600); required "
                        "on job submission when --listen is beyond loopback without --tls")
    p.add_argument("--open-reads", action="store_true",
                   help="let status, watch and model downloads through without the token "
                        "(submission and cancel still need it)")
    p.add_argument("--anonymous-listen", default="",
                   help="a second port serving only anonymous (ring-signed) submissions, with "
                        "TLS but no client certificate under --tls (nodes: "
                        "--anonymous-coordinator)")
    p.add_argument("--dashboard", default="", metavar="HOST:PORT",
                   help="serve the read-only web dashboard there (e.g. 127.0.0.1:8080); beyond "
                        "loopback every request needs the client token, and without one the "
                        "coordinator refuses to start")
    p.set_defaults(func=cmd_coordinator_serve)

    node = sub.add_parser("node", help="the node daemon")
    node_sub = node.add_subparsers(dest="action", required=True)
    p = node_sub.add_parser("serve", help="run a node daemon",
                            description="Run a node: it dials out to the coordinator (works "
                            "behind NAT), trains on the *.jsonl datasets in --data, and keeps its "
                            "key and models there. Its data never leaves this process.")
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    p.add_argument("--data", required=True, help="the node's private folder (datasets, key)")
    p.add_argument("--name", default="", help="a readable name (default: node id prefix)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="peer service address; '' disables it (default: %(default)s)")
    p.add_argument("--advertise", default="", help="peer address others should dial")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument("--role", action="append", help="node role, repeatable (default: trainer)")
    p.add_argument("--mqtt", default="", help="override the broker the coordinator announces")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch default")
    p.add_argument("--cost", type=float, default=0.0,
                   help="participation cost per round for budgeted jobs; the auction makes "
                        "reporting your true cost the best strategy")
    p.add_argument("--no-agent", action="store_true",
                   help="do not serve an Agora agent on the peer service")
    p.add_argument("--local-model", default="smollm2",
                   help="Minions' local model, reading the documents in <data>/docs/*.txt: "
                        "smollm2, tiny, path:DIR or openai:URL#model (default: %(default)s)")
    p.add_argument("--anonymous-coordinator", default="",
                   help="the coordinator's --anonymous-listen HOST:PORT, for ring-signed "
                        "uploads without this node's certificate (needed under --tls)")
    p.add_argument("--privacy-budget", type=float, default=None, metavar="EPS",
                   help="the epsilon each of this node's datasets may spend over all DP jobs "
                        "(composed; kept in <data>/privacy-ledger.json across restarts): a "
                        "task that would exceed it is refused (default: uncapped, spending is "
                        "still recorded)")
    p.add_argument("--delta", type=float, default=1e-5,
                   help="the delta the budget is accounted at (default: %(default)s)")
    p.add_argument("--private-dataset", action="append", metavar="NAME",
                   help="a dataset only differentially private tasks may use (example-level "
                        "dp-lora); repeatable")
    _add_policy_options(p)
    p.set_defaults(func=cmd_node_serve)
    policy = node_sub.add_parser("policy", help="what this node agrees to run")
    policy_sub = policy.add_subparsers(dest="policy_action", required=True)
    p = policy_sub.add_parser("show", help="print the effective policy (file + flags)",
                              description="Print the policy a node started with these "
                              "options would enforce, as TOML (or --json).")
    p.add_argument("--data", default=".", help="the node's folder (holds policy.toml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    _add_policy_options(p)
    p.set_defaults(func=cmd_node_policy_show)

    job = sub.add_parser("job", help="submit, watch and inspect jobs")
    job_sub = job.add_subparsers(dest="action", required=True)
    for name, func, helptext in [
        ("submit", cmd_job_submit, "submit a job"),
        ("watch", cmd_job_watch, "follow a job's events until it ends"),
        ("list", cmd_job_list, "list jobs"),
        ("status", cmd_job_status, "a job's state and rounds: nodes, every node's refusal or "
                                   "drop reason, secure aggregation"),
        ("show", cmd_job_show, "a job's full status as JSON"),
        ("cancel", cmd_job_cancel, "cancel a running job"),
        ("fetch", cmd_job_fetch, "download a job's global model as safetensors"),
    ]:
        p = job_sub.add_parser(name, help=helptext)
        p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
        _add_token_options(p)
        if name in ("watch", "status", "show", "cancel", "fetch"):
            p.add_argument("job_id")
        if name == "fetch":
            p.add_argument("--out", required=True, help="output .safetensors file")
        if name == "submit":
            _add_job_options(p)
            p.add_argument("--wait", action="store_true", help="follow events until the end")
        p.set_defaults(func=func)

    p = sub.add_parser("agent", help="send a message to a node's Agora agent")
    agent_sub = p.add_subparsers(dest="action", required=True)
    p = agent_sub.add_parser(
        "send", help="one message (a protocol body or natural language) to a node's agent",
        description="Sends one AgentEnvelope to a node's peer service. With --anonymous the "
                    "message names no sender and is ring-signed with the node key in --data "
                    "over the coordinator's registry ring: the receiver learns that some "
                    "registered node sent it, not which.")
    p.add_argument("--node", required=True, help="the receiving node's peer HOST:PORT")
    p.add_argument("--task-kind", required=True, help="e.g. weather.lookup")
    p.add_argument("--body", default="", help="JSON body under the protocol")
    p.add_argument("--text", default="", help="natural-language content")
    p.add_argument("--protocol", default="",
                   help="protocol hash; 'auto' = the registry's most used for the task kind; "
                        "'' = natural language (default)")
    p.add_argument("--sender", default="cli", help="the sender's name (not with --anonymous)")
    p.add_argument("--anonymous", action="store_true",
                   help="ring-sign instead of naming the sender (needs --data and the "
                        "coordinator)")
    p.add_argument("--data", default="", help="a node folder holding ring_key.seed")
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_agent_send)

    p = sub.add_parser("ask", help="ask a question over the nodes' private documents (Minions)",
                       description="The coordinator's remote model plans small jobs, the "
                       "nodes' local models run them on their own documents (<data>/docs/*.txt)"
                       " and return short structured findings, the remote model answers. The "
                       "documents never leave their nodes; citations (verbatim text) follow "
                       "--citations, enforced by each node.")
    p.add_argument("question")
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    p.add_argument("--mode", default="minions", choices=["minions", "minion", "local-only"],
                   help="minions: decomposition into jobs on chunks; minion: the remote model "
                        "chats with the local models; local-only: no remote model "
                        "(default: %(default)s)")
    p.add_argument("--citations", default="", choices=["", "allow", "short", "none"],
                   metavar="{allow,short,none}",
                   help="verbatim text the nodes may return: allow, short (a few words), none "
                        "(default: allow; none with --anonymous)")
    p.add_argument("--nodes", default="", help="comma-separated node ids (default: all online)")
    p.add_argument("--max-rounds", type=int, default=0,
                   help="remote rounds (MinionS) or chat turns (Minion); 0 = default (2)")
    p.add_argument("--anonymous", action="store_true",
                   help="an anonymous question: citations default to none")
    p.add_argument("--json", action="store_true", help="print every event as a JSON line")
    _add_token_options(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("audit", help="membership inference against a finished job's model",
                       description="Can the job's global model tell your training examples "
                       "(--members) from held-out ones of the same distribution "
                       "(--non-members)? A loss-threshold attack and, with --reference-data, "
                       "an offline LiRA calibrated by reference models trained here on "
                       "examples that are neither. Prints AUC, TPR at 1%% and 0.1%% FPR and "
                       "the empirical epsilon lower bound (95%%) beside the accounted epsilon. "
                       "Run it where the data is: only its owner has the members.")
    p.add_argument("job_id")
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    p.add_argument("--members", required=True, help="JSONL of examples the job trained on")
    p.add_argument("--non-members", required=True,
                   help="JSONL of held-out examples of the same distribution")
    p.add_argument("--reference-data", default="",
                   help="JSONL to train reference models on (neither members nor non-members)")
    p.add_argument("--references", type=int, default=2)
    p.add_argument("--reference-size", type=int, default=240)
    p.add_argument("--reference-epochs", type=int, default=3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("status", help="nodes and jobs at a glance")
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    _add_token_options(p)
    p.set_defaults(func=cmd_status)

    protocols = sub.add_parser("protocols", help="the Agora protocol registry",
                               description="Protocol documents agents use to talk without a "
                               "model: each is identified by the SHA-256 of its canonical JSON.")
    protocols_sub = protocols.add_subparsers(dest="action", required=True)
    p = protocols_sub.add_parser("list", help="protocol documents, most used first")
    p.add_argument("--task-kind", default="", help="only this task kind (e.g. weather.lookup)")
    p.set_defaults(func=cmd_protocols_list)
    p = protocols_sub.add_parser("show", help="one document as JSON")
    p.add_argument("hash", help="its hash, or a unique prefix of it")
    p.set_defaults(func=cmd_protocols_show)
    p = protocols_sub.add_parser("register", help="register a document from a JSON file",
                                 description="The file holds name, task_kind, request_schema "
                                 "and response_schema (JSON Schemas, Draft 2020-12), and "
                                 "optionally description, rules and multiround.")
    p.add_argument("file")
    p.set_defaults(func=cmd_protocols_register)
    for p in protocols_sub.choices.values():
        p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")

    data = sub.add_parser("data", help="prepare node datasets")
    data_sub = data.add_subparsers(dest="action", required=True)
    p = data_sub.add_parser("bbc", help="non-IID BBC News shards, one folder per node")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration: small = more skewed labels (default: 0.5)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--max-per-node", type=int, default=0, help="cap examples per node, 0 = none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data_bbc)

    from confide.cli.demo import add_demo_arguments

    p = sub.add_parser("demo", help="local multi-node demo: coordinator + nodes on 127.0.0.1",
                       description="Start a coordinator and N node daemons as separate "
                       "processes, give each a private non-IID BBC News shard, fine-tune "
                       "all-MiniLM-L6-v2 with LoRA for a few federated rounds and print "
                       "accuracy before/after, bytes and time per round.")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    from confide.cli.simulate import add_simulate_arguments

    p = sub.add_parser("simulate", help="many virtual nodes (Ray) against a real coordinator",
                       description="Run N virtual nodes (the real node session, trainer and "
                       "method code, many per Ray actor over one shared base model) against a "
                       "real coordinator on 127.0.0.1, on Dirichlet-skewed BBC News shards, "
                       "with dropout and straggler injection; prints the rounds' table.")
    add_simulate_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("infer", help="private inference on a node's model (two-party computation)",
                       description="Run a model a node serves on your input under CrypTen "
                       "secure two-party computation: the node never sees your tokens, you never "
                       "see its weights, the output is revealed to you only. Semi-honest "
                       "security; see README 'Private inference' for the threat model.")
    p.add_argument("--private", action="store_true", help="two-party computation (required)")
    p.add_argument("--node", required=True, help="the node's peer address HOST:PORT")
    p.add_argument("--model", default="", help="a model the node serves (see --list)")
    p.add_argument("--text", default=None, help="your text (tokenized here)")
    p.add_argument("--ids", default=None, help="or the model's token ids, e.g. 101,2023,2003")
    p.add_argument("--provider", default="TFP", choices=["TFP", "TTP"],
                   help="Beaver triples: TFP (CrypTen's default: you, rank 0, deal them) or TTP "
                        "(a dealer process started here) (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per communication step before giving up (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the node's private models")
    p.add_argument("--json", action="store_true", help="print the result (with logits) as JSON")
    p.set_defaults(func=cmd_infer)

    aero = sub.add_parser("aero", help="AERO softmax-only models for private inference")
    aero_sub = aero.add_subparsers(dest="action", required=True)
    p = aero_sub.add_parser("train", help="train a variant on BBC News, publish it for a node",
                            description="Train a small decoder (baseline or an AERO variant) on "
                            "BBC News, offline, print its held-out perplexity and save it as "
                            "safetensors into a node's data folder (private/NAME.safetensors), "
                            "where `confide node serve` offers it for private inference.")
    from confide.node.aero_training import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=cmd_aero_train)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON + PNG)")
    bench_sub = bench.add_subparsers(dest="action", required=True)
    for name, helptext in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=helptext)
        if importlib.util.find_spec(f"confide.bench.{name}") is not None:
            importlib.import_module(f"confide.bench.{name}").add_arguments(p)
        p.set_defaults(func=cmd_bench)
    _add_certs_commands(sub)
    _add_tls_options(parser, sub)
    return parser


# --------------------------------------------------------------------------------------------
# TLS: `confide certs` and the --tls options (protos.tls)

TLS_HELP = ("a TLS folder: ca.pem (the CA to trust) and NAME.pem/NAME.key (this party's "
            "certificate, from `confide certs issue`); daemons then require client "
            "certificates from that CA (mutual TLS)")


def _add_tls_options(parser: argparse.ArgumentParser, sub) -> None:
    """``--tls DIR`` (and ``--tls-name``) on the main parser and on every command that dials
    or serves: ``confide --tls DIR status`` and ``confide status --tls DIR`` both work."""
    parser.add_argument("--tls", default="", metavar="DIR", help=TLS_HELP)
    parser.add_argument("--tls-name", default="", metavar="NAME",
                        help="which certificate of a --tls folder holding several")

    def walk(subparsers):
        for command in subparsers.choices.values():
            nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            for action in nested:
                walk(action)
            options = command._option_string_actions
            if nested or "--tls" in options:
                continue
            if any(o in options for o in ("--coordinator", "--node", "--listen")):
                command.add_argument("--tls", default=argparse.SUPPRESS, metavar="DIR",
                                     help=TLS_HELP)
                command.add_argument("--tls-name", default=argparse.SUPPRESS, metavar="NAME",
                                     help="which certificate of a --tls folder holding several")

    walk(sub)


def _add_certs_commands(sub) -> None:
    certs = sub.add_parser("certs", help="a development CA and TLS certificates (mutual TLS)",
                           description="Create a development certificate authority and issue "
                           "certificates (ECDSA P-256) for the coordinator, nodes and clients. "
                           "Give each party its folder with --tls DIR.")
    certs_sub = certs.add_subparsers(dest="action", required=True)
    p = certs_sub.add_parser("init", help="create a CA: DIR/ca.pem and DIR/ca.key (0600)")
    p.add_argument("--out", required=True, help="the CA folder")
    p.add_argument("--name", default="Confide development CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=3650, help="validity (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=cmd_certs_init)
    p = certs_sub.add_parser("issue", help="issue NAME.pem/NAME.key into a --tls folder",
                             description="Issue a certificate signed by the CA, valid for "
                             "server and client use, for the given DNS names and IP addresses; "
                             "OUT gets NAME.pem, NAME.key (0600) and a copy of ca.pem.")
    p.add_argument("--ca", required=True, help="the CA folder (from certs init)")
    p.add_argument("--name", required=True, help="the certificate's name (e.g. coordinator, "
                   "node0, alice)")
    p.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="a DNS name or IP address the holder is reached at, repeatable "
                        "(default: NAME, localhost, 127.0.0.1)")
    p.add_argument("--out", required=True, help="the holder's --tls folder")
    p.add_argument("--days", type=int, default=825, help="validity (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing NAME.key")
    p.set_defaults(func=cmd_certs_issue)
    p = certs_sub.add_parser("show", help="subject, issuer, validity and names of a certificate")
    p.add_argument("file", help="a PEM certificate (e.g. DIR/NAME.pem)")
    p.set_defaults(func=cmd_certs_show)


def cmd_certs_init(args: argparse.Namespace) -> int:
    from confide.protos.tls import TLSError, create_ca

    try:
        files = create_ca(args.out, common_name=args.name, days=args.days, force=args.force)
    except TLSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CA certificate {files.cert}, key {files.key} (0600: keep it off the daemons)")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from confide.protos.tls import TLSError, describe, issue_certificate

    try:
        files = issue_certificate(args.ca, args.name, args.out, args.san, days=args.days,
                                  force=args.force)
    except TLSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = describe(files.cert.read_bytes())
    print(f"{files.cert} (key {files.key}, 0600; CA {files.ca}) valid until "
          f"{info['not_after']} for {', '.join(info['sans'])}")
    print(f"use it with --tls {args.out}")
    return 0


def cmd_certs_show(args: argparse.Namespace) -> int:
    import json

    from confide.protos.tls import describe

    try:
        print(json.dumps(describe(Path(args.file).read_bytes()), indent=2))
    except (OSError, ValueError) as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    """transformers prints load reports, weight-loading bars and deprecation warnings from
    inside peft on every model build; the daemons and the demo log what matters themselves."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if (isinstance(getattr(args, "tls", ""), str) and getattr(args, "tls", "")
            and args.func not in (cmd_coordinator_serve, cmd_node_serve)):
        from confide.protos.tls import TLSError, configure

        try:  # every channel of a client command (SDK, private inference) follows --tls
            configure(_client_tls(args))
        except TLSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

