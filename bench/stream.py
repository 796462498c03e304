"""``confide bench stream``: tensor transfer at memory speed (issue 27).

Float32 states of 150 MB (MiniLM full), 500 MB and 2 GB move four ways in the same run:

- **memory copy**: ``clone`` of every tensor (allocation and page faults included, as a
  receiver pays them): the ceiling;
- **in-process stream**: ``protos.stream`` end to end in one process (headers, chunks cut from
  the tensors, incremental SHA-256 at both ends, one allocation per received tensor); the old
  path (``TensorMap`` blob + ``chunking``) is timed too where memory allows, for reference;
- **raw gRPC**: a bare ``grpc.aio`` server streams the state's bytes as 1 MiB ``bytes``
  messages to a client that copies them into one buffer: no protobuf, no digest;
- **project gRPC**: the node's own ``NodePeer.FetchModel`` servicer streams the state (from
  memory) to DIMAT's ``fetch_local_model`` client, over 127.0.0.1.

The gRPC sender and receiver each run in their own process, so each reports its own peak RSS
(``ru_maxrss``) over its baseline (``VmRSS`` before the state exists). Goals (issue 27): the
in-process stream >= 50% of the memory copy's MB/s; the project transfer >= 80% of the raw
stream's MB/s; peak RSS over baseline <= 1.25x the state at each end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confide.bench.common import (
    cpu_model,
    goal_record,
    hardware,
    legend_outside,
    previous_results,
    pyplot,
    save_figure,
)

GOAL_INPROC = 0.5
GOAL_GRPC = 0.8
GOAL_RSS = 1.25
TENSOR_BYTES = 16 << 20  # the state is cut into 16 MiB tensors, like a model's layers
OLD_PATH_MAX_BYTES = 600_000_000  # the old path holds ~5 copies: timed only up to here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="150,500,2000",
                   help="state sizes in MB (10^6 bytes) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each measurement; the fastest counts (default: %(default)s)")
    p.add_argument("--out", default="bench/results", help="where the JSON and PNG go")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: a worker role
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- helpers


def _rss_bytes() -> int:
    """The process's resident set now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _state(total: int) -> dict:
    """A float32 state of ``total`` bytes in 16 MiB tensors (random: nothing compresses)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    out, left, i = {}, total // 4, 0
    while left > 0:
        n = min(left, TENSOR_BYTES // 4)
        out[f"layers.{i}.weight"] = torch.rand(n, generator=generator)
        left -= n
        i += 1
    return out


def _best_mbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / min(seconds) / 1e6


# --------------------------------------------------------------------------- child roles


def _child_inproc(total: int, repeats: int) -> dict[str, Any]:
    import torch

    from confide.protos.chunking import assemble, split_payload
    from confide.protos.codec import tensor_map_from_bytes, tensor_map_to_bytes
    from confide.protos.stream import receive_tensor_map, stream_tensor_map

    state = _state(total)
    nbytes = sum(t.numel() * 4 for t in state.values())
    copy_s, stream_s, old_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        copied = {k: v.clone() for k, v in state.items()}
        copy_s.append(time.perf_counter() - started)
        del copied
        started = time.perf_counter()
        received = receive_tensor_map(stream_tensor_map(state, "bench"))
        stream_s.append(time.perf_counter() - started)
        assert all(torch.equal(received[k], state[k]) for k in state)
        del received
    if nbytes <= OLD_PATH_MAX_BYTES:
        started = time.perf_counter()
        old = tensor_map_from_bytes(assemble(split_payload(tensor_map_to_bytes(state), "old")))
        old_s.append(time.perf_counter() - started)
        del old
    return {"bytes": nbytes, "copy_mbps": _best_mbps(nbytes, copy_s),
            "stream_mbps": _best_mbps(nbytes, stream_s),
            "old_path_mbps": _best_mbps(nbytes, old_s) if old_s else None}


class _MemoryModels:
    """The node's ModelStore interface over a state in memory: the servicer is the node's, only
    the disk read is left out (it is not the wire)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def metadata(self, job_id: str, which: str) -> dict[str, str]:
        return {"round": "1"}

    def load(self, job_id: str, which: str) -> dict:
        return self.state


def _child_serve(mode: str, total: int) -> None:
    """Serve the state on a free port (printed as READY PORT), until a line on stdin; then
    print this process's RSS figures as JSON."""
    import asyncio

    import grpc

    from confide.node.peer import NodePeerService  # imported before the baseline
    from confide.protos.chunking import DEFAULT_CHUNK_SIZE
    from confide.v1 import coordinator_pb2 as pb
    from confide.v1 import node_pb2_grpc as node_grpc

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
        baseline = _rss_bytes()
        state = _state(total)
        if mode == "project":
            node_grpc.add_NodePeerServicer_to_server(
                NodePeerService(pb.NodeInfo(name="bench"), _MemoryModels(state)), server)
        else:
            views = [memoryview(t.numpy()).cast("B") for t in state.values()]

            async def stream(request: bytes, context):
                for view in views:
                    for start in range(0, view.nbytes, DEFAULT_CHUNK_SIZE):
                        yield bytes(view[start:start + DEFAULT_CHUNK_SIZE])

            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"READY {port}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await server.stop(0)
        state_bytes = sum(t.numel() * 4 for t in state.values())
        print(json.dumps({"baseline": baseline, "peak": _peak_rss_bytes(),
                          "state_bytes": state_bytes}), flush=True)

    asyncio.run(serve())


def _child_fetch(mode: str, total: int, port: int) -> dict[str, Any]:
    import grpc
    import torch

    from confide.node.merging.fetch import fetch_local_model  # imported before the baseline

    address = f"127.0.0.1:{port}"
    baseline = _rss_bytes()
    started = time.perf_counter()
    if mode == "project":
        state, _up, down = fetch_local_model(address, "bench", 1, timeout_s=900,
                                             max_bytes=total + (1 << 20))
        received = sum(t.numel() * t.element_size() for t in state.values())
        wire = down
    else:
        buffer = torch.empty(total, dtype=torch.uint8)
        view = memoryview(buffer.numpy()).cast("B")
        received = wire = 0
        options = [("grpc.max_receive_message_length", 8 << 20)]
        with grpc.insecure_channel(address, options) as channel:
            call = channel.unary_stream("/bench.Raw/Stream")(b"", timeout=900)
            for data in call:
                view[received:received + len(data)] = data
                received += len(data)
                wire += len(data) + 5
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "received": received, "wire_bytes": wire,
            "baseline": baseline, "peak": _peak_rss_bytes()}


def _run_child(args: argparse.Namespace) -> int:
    if args.child == "inproc":
        print(json.dumps(_child_inproc(args.bytes, args.repeats)), flush=True)
    elif args.child == "serve":
        _child_serve(args.mode, args.bytes)
    elif args.child == "fetch":
        print(json.dumps(_child_fetch(args.mode, args.bytes, args.port)), flush=True)
    return 0


# --------------------------------------------------------------------------- orchestration


def _command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "confide.cli.main", "bench", "stream", *extra]


def _last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def _grpc_pair(mode: str, total: int, repeats: int) -> dict[str, Any]:
    """One sender process, ``repeats`` receiver processes (each its own RSS)."""
    server = subprocess.Popen(_command("--child", "serve", "--mode", mode, "--bytes",
                                       str(total)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"the {mode} sender did not start: {line!r}")
        port = line.split()[1]
        fetches = []
        for _ in range(repeats):
            done = subprocess.run(_command("--child", "fetch", "--mode", mode, "--bytes",
                                           str(total), "--port", port),
                                  capture_output=True, text=True, timeout=1800, check=True)
            fetches.append(_last_json(done.stdout))
        server.stdin.write("\n")
        server.stdin.flush()
        sender = _last_json(server.stdout.read())
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    state = sender["state_bytes"]
    for fetch in fetches:
        if fetch["received"] != state:
            raise RuntimeError(f"{mode}: received {fetch['received']} of {state} bytes")
    best = min(fetches, key=lambda f: f["seconds"])
    return {
        "mbps": state / best["seconds"] / 1e6,
        "seconds": [f["seconds"] for f in fetches],
        "wire_bytes": best["wire_bytes"],
        "sender_rss_over_state": (sender["peak"] - sender["baseline"]) / state,
        "receiver_rss_over_state": max((f["peak"] - f["baseline"]) / state for f in fetches),
        "sender_baseline_mb": sender["baseline"] / 1e6,
        "receiver_baseline_mb": max(f["baseline"] for f in fetches) / 1e6,
    }


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    if args.child:
        return _run_child(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",") if s.strip()]
    load_before = os.getloadavg()[0]
    rows, skipped = [], []
    print(f"{'MB':>6}{'copy':>8}{'stream':>8}{'old':>7}{'raw gRPC':>10}{'project':>9}"
          f"{'in/copy':>9}{'prj/raw':>9}{'RSS send':>10}{'RSS recv':>10}   (MB/s; RSS: x state)")
    for total in sizes:
        need = 3.5 * total  # the in-process run holds the state, a copy and the received one
        if _available_bytes() < need + (2 << 30):
            skipped.append({"mb": total / 1e6, "reason": f"{_available_bytes() / 1e9:.1f} GB "
                            f"available, {need / 1e9:.1f} GB (+2 GB margin) needed"})
            print(f"{total / 1e6:>6.0f}  skipped: {skipped[-1]['reason']}")
            continue
        inproc = _last_json(subprocess.run(
            _command("--child", "inproc", "--bytes", str(total), "--repeats",
                     str(args.repeats)), capture_output=True, text=True, check=True,
            timeout=3600).stdout)
        raw = _grpc_pair("raw", total, args.repeats)
        project = _grpc_pair("project", total, args.repeats)
        row = {"mb": total / 1e6, **{f"inproc_{k}": v for k, v in inproc.items()},
               "raw": raw, "project": project,
               "inproc_vs_copy": inproc["stream_mbps"] / inproc["copy_mbps"],
               "project_vs_raw": project["mbps"] / raw["mbps"]}
        rows.append(row)
        old = inproc["old_path_mbps"]
        print(f"{row['mb']:>6.0f}{inproc['copy_mbps']:>8.0f}{inproc['stream_mbps']:>8.0f}"
              f"{old if old is not None else float('nan'):>7.0f}{raw['mbps']:>10.0f}"
              f"{project['mbps']:>9.0f}{row['inproc_vs_copy']:>9.2f}{row['project_vs_raw']:>9.2f}"
              f"{project['sender_rss_over_state']:>10.2f}{project['receiver_rss_over_state']:>10.2f}")
    goals = _goals(rows, skipped)
    for goal in goals:
        print(f"  [{'met' if goal['met'] else 'MISSED' if goal['met'] is False else 'n/a'}] "
              f"{goal['text']}")
    report = {
        "benchmark": "stream",
        "hardware": {**hardware(), "cpu": cpu_model(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0]},
        "note": "MB/s are 10^6 bytes per second of state moved; the machine is shared (2 "
                "cores, other jobs running): absolute speeds are inflated by load, the "
                "ratios within one size are measured back to back",
        "chunk_bytes": 1 << 20,
        "results": rows,
        "skipped": skipped,
        "goals": goals,
    }
    path = out_dir / "stream.json"
    previous = previous_results(path, key=lambda r: r["mb"])
    if previous is not None:
        for row in rows:
            before = previous[1].get(row["mb"])
            if before is not None:
                print(f"  {row['mb']:.0f} MB: project gRPC {before['project']['mbps']:.0f} -> "
                      f"{row['project']['mbps']:.0f} MB/s")
    path.write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, out_dir / "stream.png")
    print(f"wrote {path} and {out_dir / 'stream.png'}")
    return 0


def _goals(rows: list[dict], skipped: list[dict]) -> list[dict]:
    if not rows:
        return [goal_record(g, t, None, None, f"{g}: not measured (every size skipped)")
                for g, t in (("inproc_vs_copy", GOAL_INPROC), ("grpc_vs_raw", GOAL_GRPC),
                             ("peak_rss", GOAL_RSS))]
    sizes = ", ".join(f"{r['mb']:.0f}" for r in rows)
    gone = f"; not run: {', '.join(str(int(s['mb'])) for s in skipped)} MB" if skipped else ""
    inproc = min(r["inproc_vs_copy"] for r in rows)
    grpc_ratio = min(r["project_vs_raw"] for r in rows)
    rss = max(max(r["project"]["sender_rss_over_state"], r["project"]["receiver_rss_over_state"])
              for r in rows)
    return [
        goal_record("inproc_vs_copy", GOAL_INPROC, inproc, inproc >= GOAL_INPROC,
                    f"in-process stream at {inproc:.0%} of a memory copy's MB/s at worst "
                    f"(goal >= {GOAL_INPROC:.0%}; sizes {sizes} MB{gone})"),
        goal_record("grpc_vs_raw", GOAL_GRPC, grpc_ratio, grpc_ratio >= GOAL_GRPC,
                    f"FetchModel over gRPC at {grpc_ratio:.0%} of a raw gRPC byte stream's "
                    f"MB/s at worst (goal >= {GOAL_GRPC:.0%}; sizes {sizes} MB{gone})"),
        goal_record("peak_rss", GOAL_RSS, rss, rss <= GOAL_RSS,
                    f"peak RSS over baseline at most {rss:.2f}x the state at either end of "
                    f"FetchModel (goal <= {GOAL_RSS}x; sizes {sizes} MB{gone})"),
    ]


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['mb']:.0f} MB" for r in rows]
    xs = range(len(rows))
    series = [("memory copy", [r["inproc_copy_mbps"] for r in rows]),
              ("stream, in process", [r["inproc_stream_mbps"] for r in rows]),
              ("old blob path, in process", [r["inproc_old_path_mbps"] or 0 for r in rows]),
              ("raw gRPC stream", [r["raw"]["mbps"] for r in rows]),
              ("FetchModel over gRPC", [r["project"]["mbps"] for r in rows])]
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        speed.bar([x + i * width for x in xs], values, width, label=name)
    speed.set_xticks([x + 0.4 - width / 2 for x in xs], labels)
    speed.set_ylabel("MB/s (higher is better)")
    speed.set_title("transfer speed (goals: stream >= 50% of copy, FetchModel >= 80% of raw)",
                    fontsize=9)
    legend_outside(speed)
    rss = [("sender, FetchModel", [r["project"]["sender_rss_over_state"] for r in rows]),
           ("receiver, FetchModel", [r["project"]["receiver_rss_over_state"] for r in rows]),
           ("sender, raw", [r["raw"]["sender_rss_over_state"] for r in rows]),
           ("receiver, raw", [r["raw"]["receiver_rss_over_state"] for r in rows])]
    width = 0.8 / len(rss)
    for i, (name, values) in enumerate(rss):
        memory.bar([x + i * width for x in xs], values, width, label=name)
    memory.axhline(GOAL_RSS, color="red", linestyle="--", label=f"goal {GOAL_RSS}x")
    memory.set_xticks([x + 0.4 - width / 2 for x in xs], labels)
    memory.set_ylabel("peak RSS over baseline / state size")
    memory.set_title("memory at each end", fontsize=9)
    legend_outside(memory)
    save_figure(fig, path)
