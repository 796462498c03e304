"""``confide bench soak``: one coordinator process under many node sessions.

Workload: a real coordinator (a separate process, SQLite state, no MQTT unless ``--mqtt``)
and ``--sessions`` simulated nodes in ONE asyncio load-generator process on loopback. Each
simulated node speaks the real protocol through the generated stubs, on its own connection:
``Register`` with its Ed25519 proof, ``Session`` hello -> challenge -> proof -> welcome,
heartbeats at the interval the coordinator sets, and tasks: the one node asked to INIT answers
with a tiny tensor map (the global state: ``--params`` float32 values), every TRAIN task is
answered with a tiny delta of the same shape (``TaskChunk`` + ``TaskResult``). A FedAvg job
then runs ``--rounds`` rounds over every session (min_nodes = the sessions held), so each
round the coordinator fans out a task and the global state to every session, gathers every
update, records an event per node in SQLite and aggregates.

With ``--anonymous`` the job is anonymous: every simulated node also has a ring key (announced
as a v2 ristretto255 key), answers each TRAIN task with "done" on its session and uploads its
delta ring-signed over its anonymity set of ``--anonymity-set`` keys (GetRing, the node's own
check of the published sets, GetChallenge, SubmitAnonymousUpdate), as a node daemon does; the
simplifications are the ones of the soak (no model, no jitter before the upload, and the upload
shares the session's connection instead of opening its own). The coordinator reports what
checking the uploads cost it (a ``round.anonymous`` event per round: the wall and CPU seconds
of decoding and verifying every filed update), and the goal is one round of 1,000 nodes
verified in under 10 s with k = 32.

What is measured: sessions requested / held, the time to register and authenticate them all,
rounds completed, the coordinator's round duration (selection to commit, p50/p99 over rounds),
the fan-out (first to last node receiving its round's task), heartbeat round-trip times
(p50/p99 over every heartbeat of every session after the ramp, idle hold and job: how
responsive the coordinator stays), the coordinator's RSS (``/proc/PID/status``: idle, with
the sessions, peak) and errors by kind. The baseline is the previous run
(``bench/results/soak.json``).

Limits: the load generator raises its file-descriptor soft limit to the hard limit (one
socket per session), and so does the coordinator (``coordinator.server.raise_fd_limit``);
``--duration`` caps the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confide.bench.common import goal_record, hardware, pyplot, save_figure

GOAL_ANONYMOUS_NODES = 1000
GOAL_ANONYMITY_SET = 32
GOAL_VERIFY_S = 10.0

# torch loads inside run_benchmark: `confide --help` stays fast


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=1000,
                   help="simulated node sessions (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds over every session")
    p.add_argument("--duration", type=float, default=600.0,
                   help="cap on the whole run, seconds (default: %(default)s)")
    p.add_argument("--connect-parallel", type=int, default=64,
                   help="registrations/handshakes in flight at once (default: %(default)s)")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="the coordinator's heartbeat interval, s (default: %(default)s)")
    p.add_argument("--params", type=int, default=64,
                   help="float32 values in the global state (default: %(default)s)")
    p.add_argument("--hold", type=float, default=10.0,
                   help="seconds to hold the sessions idle before the job (heartbeats only)")
    p.add_argument("--mqtt", action="store_true", help="with the embedded MQTT broker")
    p.add_argument("--anonymous", action="store_true",
                   help="an anonymous job: every node uploads its update ring-signed over its "
                        "anonymity set; reports the coordinator's verification time per round")
    p.add_argument("--anonymity-set", type=int, default=GOAL_ANONYMITY_SET, metavar="K",
                   help="with --anonymous: the job's anonymity set size (default: %(default)s)")
    p.add_argument("--tls", action="store_true", dest="soak_tls",
                   help="mutual TLS (a development CA in the workdir; every session presents "
                        "a client certificate)")
    p.add_argument("--workdir", default="runs/bench-soak")
    p.add_argument("--out", default="bench/results",
                   help="where soak.json and soak.png go (soak-anonymous.* with --anonymous); "
                        "the previous JSON there is compared "
                        "with this run (default: %(default)s)")


def soak_hardware() -> dict:
    return hardware() | {"load_average": round(os.getloadavg()[0], 1),
                         "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc (0, 0 when unavailable)."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------------------------
# The simulated node


@dataclass
class Stats:
    held: int = 0
    max_held: int = 0
    connected_at: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    heartbeat_rtt: list[float] = field(default_factory=list)
    record_heartbeats: bool = False
    #: round -> monotonic times the nodes got their task's complete global state
    task_received: dict[int, list[float]] = field(default_factory=dict)
    tasks_done: int = 0
    anonymous_uploads: int = 0


class SimNode:
    """One node's session, through the generated stubs only (no node daemon code)."""

    def __init__(self, index: int, address: str, tls_config, stats: Stats, params: int,
                 anonymous: bool = False) -> None:
        from confide.privacy.ringsig import RingKeyPair
        from confide.protos.identity import NodeKey

        self.index = index
        self.address = address
        self.tls = tls_config
        self.stats = stats
        self.params = params
        self.key = NodeKey.generate()
        self.ring_key = RingKeyPair.generate() if anonymous else None
        self.stub = None
        self._uploads: set[asyncio.Task] = set()
        self.connected = False
        self._busy = False

    async def run(self, gate: asyncio.Semaphore) -> None:
        import grpc

        from confide.protos.identity import RING_KEY_FEATURE
        from confide.protos.state import STATE_DIGEST_FEATURE
        from confide.protos.tls import aio_channel
        from confide.v1 import coordinator_pb2 as pb
        from confide.v1 import coordinator_pb2_grpc as pb_grpc

        options = [("grpc.max_receive_message_length", 8 * 1024 * 1024),
                   ("grpc.keepalive_time_ms", 60_000),
                   # one TCP connection per node, as with real nodes (gRPC would otherwise
                   # share one subchannel between channels with equal arguments)
                   ("grpc.use_local_subchannel_pool", 1)]
        outbox: asyncio.Queue = asyncio.Queue()
        stage = "connect"
        try:
            async with aio_channel(self.address, options, tls=self.tls) as channel:
                stub = self.stub = pb_grpc.CoordinatorStub(channel)
                async with gate:
                    stage = "register"
                    ts, sig = self.key.sign_registration()
                    info = pb.NodeInfo(name=f"sim{self.index}", roles=["trainer"],
                                       version="soak", datasets={"train": 10},
                                       features=[STATE_DIGEST_FEATURE])
                    if self.ring_key is not None:
                        info.ring_public_key = self.ring_key.public
                        info.features.append(RING_KEY_FEATURE)
                    await stub.Register(pb.RegisterRequest(
                        public_key=self.key.public_bytes, timestamp_ms=ts, signature=sig,
                        info=info), timeout=120)
                    stage = "session"

                    async def outgoing():
                        while (message := await outbox.get()) is not None:
                            yield message

                    call = stub.Session(outgoing())
                    outbox.put_nowait(pb.NodeMessage(hello=pb.SessionHello(
                        node_id=self.key.node_id)))
                    challenge = await asyncio.wait_for(call.read(), 120)
                    if challenge is grpc.aio.EOF or challenge.WhichOneof("body") != "challenge":
                        raise ConnectionError("no challenge")
                    outbox.put_nowait(pb.NodeMessage(proof=pb.SessionProof(
                        signature=self.key.sign_session(challenge.challenge.nonce))))
                    welcome = await asyncio.wait_for(call.read(), 120)
                    if welcome is grpc.aio.EOF or welcome.WhichOneof("body") != "welcome":
                        raise ConnectionError("no welcome")
                self.connected = True
                self.stats.held += 1
                self.stats.max_held = max(self.stats.max_held, self.stats.held)
                self.stats.connected_at.append(time.monotonic())
                stage = "running"
                await self._serve(call, outbox, welcome.welcome.heartbeat_interval_s)
                self.stats.errors["session ended by the coordinator"] += 1
        except asyncio.CancelledError:
            outbox.put_nowait(None)
            raise
        except grpc.aio.AioRpcError as exc:
            self.stats.errors[f"{stage}: {exc.code().name}"] += 1
        except (TimeoutError, ConnectionError) as exc:
            self.stats.errors[f"{stage}: {type(exc).__name__}"] += 1
        finally:
            if self.connected:
                self.stats.held -= 1
                self.connected = False

    async def _serve(self, call, outbox: asyncio.Queue, interval: float) -> None:
        import grpc

        from confide.protos.stream import TensorMapReceiver, stream_tensor_map
        from confide.v1 import coordinator_pb2 as pb

        sent: dict[int, float] = {}

        async def heartbeats() -> None:
            seq = 0
            # spread the sessions' beats over the interval, as independent nodes would
            await asyncio.sleep(interval * (self.index % 97) / 97)
            while True:
                seq += 1
                sent[seq] = time.monotonic()
                outbox.put_nowait(pb.NodeMessage(heartbeat=pb.Heartbeat(seq=seq,
                                                                       busy=self._busy)))
                if len(sent) > 64:
                    sent.pop(min(sent))
                await asyncio.sleep(max(interval, 0.2))

        def reply(task_id: str, payload: dict, num_examples: int) -> None:
            if task is not None and task.anonymous and task.kind != pb.INIT:
                # "done" on the session, the update on its own ring-signed call
                outbox.put_nowait(pb.NodeMessage(result=pb.TaskResult(task_id=task_id)))
                self.stats.tasks_done += 1
                self._busy = False
                upload = asyncio.create_task(self._upload_anonymously(task, payload))
                self._uploads.add(upload)
                upload.add_done_callback(self._uploads.discard)
                return
            for chunk in stream_tensor_map(payload, task_id):
                outbox.put_nowait(pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task_id,
                                                                           chunk=chunk)))
            outbox.put_nowait(pb.NodeMessage(result=pb.TaskResult(
                task_id=task_id, num_examples=num_examples, metrics={"loss": 1.0})))
            self.stats.tasks_done += 1
            self._busy = False

        beat = asyncio.create_task(heartbeats())
        task = None
        assembler = None
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("body")
                if kind == "heartbeat_ack":
                    started = sent.pop(message.heartbeat_ack.seq, None)
                    if started is not None and self.stats.record_heartbeats:
                        self.stats.heartbeat_rtt.append(time.monotonic() - started)
                elif kind == "task":
                    task = message.task
                    self._busy = True
                    if task.kind == pb.INIT:
                        import torch

                        reply(task.task_id,
                              {"w": torch.zeros(self.params)}, 0)
                        task = None
                    elif task.global_from_seed:  # the state INIT answers, built here
                        import torch

                        self.stats.task_received.setdefault(task.round, []).append(
                            time.monotonic())
                        state = {"w": torch.zeros(self.params)}
                        delta = {name: _delta_like(value) for name, value in state.items()}
                        reply(task.task_id, delta, 10)
                        task = None
                    elif task.has_global:
                        assembler = TensorMapReceiver(transfer_id=task.task_id)
                    else:
                        outbox.put_nowait(pb.NodeMessage(failure=pb.TaskFailure(
                            task_id=task.task_id, reason="soak node: unexpected task")))
                        task = None
                elif kind == "global_chunk" and task is not None and assembler is not None:
                    payload = assembler.add(message.global_chunk.chunk)
                    if payload is None:
                        continue
                    self.stats.task_received.setdefault(task.round, []).append(
                        time.monotonic())
                    state = payload  # decoded and checked as it streamed, as a node does
                    delta = {name: _delta_like(value) for name, value in state.items()}
                    reply(task.task_id, delta, 10)
                    task, assembler = None, None
        finally:
            beat.cancel()
            for upload in list(self._uploads):
                upload.cancel()
            outbox.put_nowait(None)
            call.cancel()

    async def _upload_anonymously(self, task, payload: dict) -> None:
        """What a node daemon does after "done" (node.anonymous): fetch the round's ring,
        check its anonymity sets against the rule, sign over its own set, upload."""
        import grpc

        from confide.node.anonymous import AnonymityError, check_ring, signed_update_header
        from confide.protos.stream import stream_digest, stream_tensor_map
        from confide.v1 import coordinator_pb2 as pb

        stage = "anonymous: ring"
        try:
            ring = await self.stub.GetRing(pb.GetRingRequest(job_id=task.job_id,
                                                             round=task.round), timeout=120)
            signers = check_ring(ring, self.ring_key, task.spec.anonymity_set, task.job_id,
                                 task.round)
            stage = "anonymous: challenge"
            challenge = await self.stub.GetChallenge(pb.GetChallengeRequest(), timeout=120)
            header = signed_update_header(self.ring_key, task.job_id, task.round, ring,
                                          signers, challenge.nonce, stream_digest(payload), 10)
            messages = [pb.AnonymousUpdateMessage(header=header)] + [
                pb.AnonymousUpdateMessage(chunk=c)
                for c in stream_tensor_map(payload, header.payload_sha256.hex()[:32])]
            stage = "anonymous: upload"
            await self.stub.SubmitAnonymousUpdate(iter(messages), timeout=300)
            self.stats.anonymous_uploads += 1
        except grpc.aio.AioRpcError as exc:
            self.stats.errors[f"{stage}: {exc.code().name}"] += 1
        except AnonymityError as exc:
            self.stats.errors[f"{stage}: refused ({exc})"] += 1


def _delta_like(value):
    import torch

    from confide.protos.codec import to_dense

    return torch.full_like(to_dense(value), 0.01)


# --------------------------------------------------------------------------------------------
# The run


async def _soak(args: argparse.Namespace, cluster, tls_config, client_tls) -> dict:
    from confide.sdk.client import AsyncClient, job_spec
    from confide.v1 import coordinator_pb2 as pb

    started = time.monotonic()
    deadline = started + args.duration
    pid = cluster.coordinator.pid
    stats = Stats()
    timeline: list[tuple[float, int, float]] = []
    rss_idle = rss_mb(pid)[0]

    async def sample() -> None:
        while True:
            timeline.append((time.monotonic() - started, stats.held, rss_mb(pid)[0]))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    gate = asyncio.Semaphore(max(1, args.connect_parallel))
    nodes = [SimNode(i, cluster.address, tls_config, stats, args.params, args.anonymous)
             for i in range(args.sessions)]
    tasks = [asyncio.create_task(node.run(gate)) for node in nodes]

    # ramp: until every session is held or has failed, within the duration cap
    while time.monotonic() < deadline:
        failed = sum(stats.errors.values())
        if stats.held + failed >= args.sessions:
            break
        await asyncio.sleep(0.2)
    registration_s = (max(stats.connected_at) - started) if stats.connected_at else None
    held_after_ramp = stats.held
    print(f"  {held_after_ramp} of {args.sessions} session(s) held after "
          f"{time.monotonic() - started:.1f}s; errors {dict(stats.errors) or 'none'}",
          flush=True)
    stats.record_heartbeats = True  # from here on: while held idle, and during the job
    await asyncio.sleep(min(args.hold, max(0.0, deadline - time.monotonic())))
    rss_sessions = rss_mb(pid)[0]

    rounds: list[dict] = []
    job_state = "NOT RUN"
    reason = ""
    job_s = None
    fanout: list[float] = []
    if stats.held and time.monotonic() < deadline:
        client = AsyncClient(cluster.address, tls=client_tls, timeout=120)
        try:
            held = stats.held
            spec = job_spec("fedavg-lora", name="soak", rounds=args.rounds, min_nodes=held,
                            base="tiny-bert", num_labels=2, max_length=32,
                            round_timeout_s=max(60.0, args.duration / max(args.rounds, 1)),
                            wait_for_nodes_s=60.0, anonymous=args.anonymous,
                            anonymity_set=args.anonymity_set if args.anonymous else 0)
            job_started = time.monotonic()
            job = await client.submit_job(spec)
            while time.monotonic() < deadline:
                status = await client.get_job(job.job_id)
                if status.state in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
                    break
                await asyncio.sleep(0.5)
            else:
                await client.cancel_job(job.job_id)
                stats.errors["job cut by --duration"] += 1
            status = await client.get_job(job.job_id)
            job_s = time.monotonic() - job_started
            job_state = pb.JobState.Name(status.state)
            reason = status.reason
            for summary in status.rounds:
                rounds.append({"round": summary.round, "state": summary.state,
                               "participants": len(summary.participants),
                               "dropped": len(summary.dropped),
                               "seconds": summary.seconds,
                               "bytes_up": summary.bytes.up, "bytes_down": summary.bytes.down})
                times = stats.task_received.get(summary.round, [])
                if len(times) > 1:
                    fanout.append(max(times) - min(times))
            verification = await _anonymous_verification(client, job.job_id)
            for row in rounds:
                row.update(verification.get(row["round"], {}))
        finally:
            stats.record_heartbeats = False
            await client.close()
    rss_now, rss_peak = rss_mb(pid)
    held_at_end = stats.held
    sampler.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, sampler, return_exceptions=True)
    completed = [r["seconds"] for r in rounds if r["state"] == "completed"]
    return {
        "sessions_requested": args.sessions,
        "sessions_held": held_after_ramp,
        "sessions_held_at_end": held_at_end,
        "registration_s": registration_s,
        "job_state": job_state,
        "job_reason": reason,
        "job_s": job_s,
        "rounds_completed": len(completed),
        "round_s_p50": percentile(completed, 50),
        "round_s_p99": percentile(completed, 99),
        "fanout_s_p50": percentile(fanout, 50),
        "heartbeat_ms_p50": _ms(percentile(stats.heartbeat_rtt, 50)),
        "heartbeat_ms_p99": _ms(percentile(stats.heartbeat_rtt, 99)),
        "heartbeats": len(stats.heartbeat_rtt),
        "coordinator_rss_mb_idle": rss_idle,
        "coordinator_rss_mb_sessions": rss_sessions,
        "coordinator_rss_mb_end": rss_now,
        "coordinator_rss_mb_peak": rss_peak,
        "loadgen_rss_mb_peak": rss_mb(os.getpid())[1],
        "tasks_done": stats.tasks_done,
        "anonymous": bool(args.anonymous),
        "anonymity_set": args.anonymity_set if args.anonymous else None,
        "anonymous_uploads": stats.anonymous_uploads,
        "errors": dict(stats.errors),
        "rounds": rounds,
        "timeline": timeline,
    }


async def _anonymous_verification(client, job_id: str) -> dict[int, dict]:
    """Round -> what the coordinator reported checking its anonymous uploads cost it."""
    found: dict[int, dict] = {}
    async for event in client.watch_job(job_id):
        if event.kind == "round.anonymous":
            found[event.round] = {"anonymous_updates": int(event.metrics["updates"]),
                                  "verify_s": event.metrics["verify_s"],
                                  "verify_cpu_s": event.metrics["verify_cpu_s"]}
    return found


def _anonymous_goal(result: dict) -> dict | None:
    """The issue's goal: one anonymous round of 1,000 nodes, k = 32, verified in < 10 s."""
    if not result["anonymous"]:
        return None
    goal = (f"anonymous round of {GOAL_ANONYMOUS_NODES} nodes, k = {GOAL_ANONYMITY_SET}: "
            f"verified by the coordinator in under {GOAL_VERIFY_S:.0f} s")
    measured = [r for r in result["rounds"] if "verify_s" in r]
    full = [r for r in measured if r["anonymous_updates"] >= GOAL_ANONYMOUS_NODES]
    if (result["anonymity_set"] != GOAL_ANONYMITY_SET or not full):
        updates = max((r["anonymous_updates"] for r in measured), default=0)
        return goal_record(goal, GOAL_VERIFY_S, None, None,
                           f"goal: {goal}: not measured (k = {result['anonymity_set']}, at "
                           f"most {updates} update(s) verified in a round)")
    worst = max(full, key=lambda r: r["verify_s"])
    met = worst["verify_s"] < GOAL_VERIFY_S
    return goal_record(goal, GOAL_VERIFY_S, worst["verify_s"], met,
                       f"goal: {goal}: {'met' if met else 'NOT met'} ({worst['verify_s']:.2f} s "
                       f"for {worst['anonymous_updates']} updates in round {worst['round']}, "
                       f"{worst['verify_cpu_s']:.2f} s of CPU; slowest round)",
                       round=worst["round"], updates=worst["anonymous_updates"],
                       cpu_s=worst["verify_cpu_s"])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run_benchmark(args: argparse.Namespace) -> int:
    from confide.cluster.local import LocalCluster
    from confide.protos.tls import TLSConfig

    fd_limit = raise_fd_limit()
    if fd_limit < args.sessions + 64:
        print(f"warning: the file-descriptor limit is {fd_limit}, below {args.sessions} "
              "sessions (one socket each): raise `ulimit -n` (hard limit) to hold them all")
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    cluster = LocalCluster(workdir, [], mqtt=args.mqtt, heartbeat_interval_s=args.heartbeat,
                           tls_dir=workdir / "pki" if args.soak_tls else None)
    print(f"soak: {args.sessions} simulated node session(s) against one coordinator on "
          f"127.0.0.1 ({'mutual TLS' if args.soak_tls else 'plaintext'}), {args.rounds} FedAvg "
          f"round(s) over all of them, global state {args.params} float32; cap "
          f"{args.duration:.0f}s", flush=True)
    try:
        cluster.start_coordinator()
        tls_config = client_tls = None
        if args.soak_tls:
            tls_config = TLSConfig.from_folder(cluster.tls_folder("sim-node"))
            client_tls = TLSConfig.from_folder(cluster.tls_folder("client"))
        result = asyncio.run(_soak(args, cluster, tls_config, client_tls))
    finally:
        cluster.stop()
    info = soak_hardware()
    _print_table(result)
    goal = _anonymous_goal(result)
    if goal is not None:
        print(goal["text"])
    print("note: a round's latency runs from the first task sent to the round committed, "
          "every node's update included")
    print(f"hardware: {info['platform']}, {info['cpu_count']} CPU(s), load average "
          f"{info['load_average']}, file-descriptor limit {fd_limit}; coordinator and load "
          "generator on the same machine (loopback)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "soak-anonymous" if args.anonymous else "soak"
    _compare_with_previous(out / f"{name}.json", result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"benchmark": "soak", "time": stamp, "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"},
              "result": result}
    if goal is not None:
        report["goal"] = goal
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    _plot(result, out / f"{name}.png", args)
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
    ok = (result["job_state"] == "COMPLETED"
          and result["sessions_held"] == result["sessions_requested"])
    return 0 if ok else 1


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _print_table(r: dict) -> None:
    errors = ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items())) or "none"
    rows = [
        ("sessions requested / held", f"{r['sessions_requested']} / {r['sessions_held']} "
                                      f"(at the end {r['sessions_held_at_end']})"),
        ("registration + handshake, all", _fmt(r["registration_s"], ".1f", " s")),
        ("job", f"{r['job_state']}{' (' + r['job_reason'] + ')' if r['job_reason'] else ''}"
                f" in {_fmt(r['job_s'], '.1f', ' s')}"),
        ("rounds completed", str(r["rounds_completed"])),
        ("round latency p50 / p99", f"{_fmt(r['round_s_p50'], '.2f', ' s')} / "
                                    f"{_fmt(r['round_s_p99'], '.2f', ' s')}"),
        ("task fan-out (first->last node) p50", _fmt(r["fanout_s_p50"], ".2f", " s")),
        ("heartbeat RTT p50 / p99", f"{_fmt(r['heartbeat_ms_p50'], '.1f', ' ms')} / "
                                    f"{_fmt(r['heartbeat_ms_p99'], '.1f', ' ms')} "
                                    f"({r['heartbeats']} beats, idle hold + job)"),
        ("coordinator RSS idle / sessions / peak",
         f"{r['coordinator_rss_mb_idle']:.0f} / {r['coordinator_rss_mb_sessions']:.0f} / "
         f"{r['coordinator_rss_mb_peak']:.0f} MB"),
        ("load generator RSS peak", f"{r['loadgen_rss_mb_peak']:.0f} MB"),
        ("errors", errors),
    ]
    print()
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    if r["rounds"]:
        anonymous = any("verify_s" in row for row in r["rounds"])
        extra = (f"{'anon. updates':>14}{'verify s':>10}{'(CPU s)':>9}" if anonymous else "")
        print(f"\n{'round':>5} {'state':<10}{'participants':>13}{'dropped':>8}{'seconds':>9}"
              f"{'up (KB)':>10}{'down (KB)':>11}{extra}")
        for row in r["rounds"]:
            extra = (f"{row.get('anonymous_updates', 0):>14}{row.get('verify_s', 0):>10.2f}"
                     f"{row.get('verify_cpu_s', 0):>9.2f}" if anonymous else "")
            print(f"{row['round']:>5} {row['state']:<10}{row['participants']:>13}"
                  f"{row['dropped']:>8}{row['seconds']:>9.2f}{row['bytes_up'] / 1e3:>10.1f}"
                  f"{row['bytes_down'] / 1e3:>11.1f}{extra}")
        if anonymous:
            print(f"verify s: the coordinator's time to decode and check every filed anonymous "
                  f"update of the round (k = {r['anonymity_set']}), wall clock; CPU s: the "
                  "same, its event loop thread's CPU time")


def _compare_with_previous(path: Path, result: dict) -> None:
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["result"]
    except (ValueError, KeyError):
        return
    parts = []
    for key, label, spec in [("sessions_held", "sessions held", "d"),
                             ("registration_s", "registration s", ".1f"),
                             ("round_s_p50", "round p50 s", ".2f"),
                             ("round_s_p99", "round p99 s", ".2f"),
                             ("heartbeat_ms_p99", "heartbeat p99 ms", ".1f"),
                             ("coordinator_rss_mb_peak", "coordinator peak MB", ".0f")]:
        before, now = old.get(key), result.get(key)
        if before is not None and now is not None:
            parts.append(f"{label} {before:{spec}} -> {now:{spec}}")
    if parts:
        print("  vs last run: " + ", ".join(parts))


def _plot(result: dict, path: Path, args: argparse.Namespace) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if result["timeline"]:
        t, held, rss = zip(*result["timeline"], strict=True)
        left.plot(t, held, color="tab:blue", label="sessions held")
        left.set_xlabel("seconds since start")
        left.set_ylabel("sessions held", color="tab:blue")
        twin = left.twinx()
        twin.plot(t, rss, color="tab:red", label="coordinator RSS")
        twin.set_ylabel("coordinator RSS (MB)", color="tab:red")
    left.set_title(f"{args.sessions} sessions requested")
    completed = [r for r in result["rounds"] if r["state"] == "completed"]
    numbers = [r["round"] for r in completed]
    if result.get("anonymous"):
        right.bar([n - 0.2 for n in numbers], [r["seconds"] for r in completed], width=0.4,
                  label="round latency")
        right.bar([n + 0.2 for n in numbers], [r.get("verify_s", 0) for r in completed],
                  width=0.4, label="coordinator verifying the uploads")
        right.axhline(GOAL_VERIFY_S, color="red", linestyle=":",
                      label=f"goal: verified in under {GOAL_VERIFY_S:.0f} s")
        right.legend(fontsize="small")
        right.set_ylabel("seconds")
        right.set_title(f"anonymous FedAvg rounds over {result['sessions_held']} sessions, "
                        f"k = {result['anonymity_set']}")
    else:
        right.bar(numbers, [r["seconds"] for r in completed])
        right.set_ylabel("round latency (s)")
        right.set_title(f"FedAvg rounds over {result['sessions_held']} sessions")
    right.set_xlabel("round")
    save_figure(fig, path)
