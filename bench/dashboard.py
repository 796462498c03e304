"""``confide bench dashboard``: how long the coordinator's dashboard takes to show many nodes.

Workload: a real coordinator store (SQLite) holding N registered node records (device, two
datasets, a privacy ledger entry each) and a finished 20-round job, every node with a live
``NodeSession`` in the registry (online, as under the soak), served by the dashboard's own
server (uvicorn, ``coordinator/dashboard``). Headless Chromium (Playwright, the distribution's
build) opens the page: the time is from navigation start to the node table rendered with all
N rows (the page marks it; ``performance.now()``), median over ``--repeats`` fresh pages.
Baseline in the same run: the same page with 10 nodes. Also timed: building the node JSON
on the server (the event stream rebuilds it every 2 s) and its size. Then the same page of a
real coordinator process (``--dashboard``) while ``--soak`` simulated nodes (bench/soak.py's
``SimNode``: real Register, authenticated Session, heartbeats over gRPC) are online: the goal
is judged on that row.

Goal (issue 21): 1,000 nodes online render in under 2 s. Writes bench/results/dashboard.json
and .png."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from confide.bench.common import (
    cpu_model,
    goal_record,
    hardware,
    legend_outside,
    previous_results,
    pyplot,
    save_figure,
)

GOAL_NODES = 1000
GOAL_S = 2.0
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", default="10,100,1000,3000",
                   help="comma-separated node counts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="page loads per count; the median is reported (default: %(default)s)")
    p.add_argument("--chromium", default="",
                   help="the Chromium executable (default: the distribution's)")
    p.add_argument("--soak", type=int, default=GOAL_NODES, metavar="N",
                   help="also measure against a real coordinator process holding N simulated "
                        "node sessions over gRPC (bench/soak.py's nodes), 0 to skip "
                        "(default: %(default)s)")
    p.add_argument("--workdir", default="runs/bench-dashboard",
                   help="the soak coordinator's folder (default: %(default)s)")
    p.add_argument("--out", default="bench/results",
                   help="where dashboard.json and dashboard.png go (default: %(default)s)")


def populate(folder: Path, nodes: int):
    """A store with ``nodes`` node records and a finished job, and a registry in which every
    node has a session: what a coordinator under the soak holds."""
    from confide.coordinator.events import EventLog
    from confide.coordinator.sessions import NodeSession, SessionRegistry
    from confide.coordinator.store import RoundRecord, Store
    from confide.v1 import coordinator_pb2 as pb

    store = Store(folder)
    sessions = SessionRegistry()
    for i in range(nodes):
        node_id = f"{i:016x}"
        info = pb.NodeInfo(name=f"node{i}", device="cpu", roles=["trainer"])
        info.datasets["bbc"] = 200 + i % 50
        info.datasets["trivia"] = 30
        info.privacy.add(dataset="bbc", epsilon_budget=8.0, delta=1e-5,
                         epsilon_spent=(i % 80) / 10)
        store.upsert_node(node_id, os.urandom(32), info)
        sessions.add(NodeSession(node_id))
    events = EventLog(store)
    store.create_job("bench0", pb.JobSpec(name="bench", method="fedavg-lora", rounds=20))
    for r in range(1, 21):
        events.emit("bench0", "round.started", round_number=r)
        store.save_round("bench0", RoundRecord(
            round=r, state="completed", selected=["0" * 16], participants=["0" * 16],
            bytes_up=30_000 * r, bytes_down=300 * r, seconds=1.0,
            metrics={"loss_last": 1.0 / r}))
        events.emit("bench0", "round.completed", round_number=r)
    return store, sessions


class _Served:
    """The dashboard's own server on a loop in a thread (Playwright's sync API needs this
    thread free of an event loop)."""

    def __init__(self, source) -> None:
        from confide.coordinator.dashboard.server import DashboardServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DashboardServer("127.0.0.1:0", source)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _measure(browser, url: str, nodes: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="commit")
        page.wait_for_function(
            f"() => document.body && document.body.dataset.nodesRendered && "
            f"document.querySelectorAll('#nodes tbody tr').length === {nodes}",
            timeout=60_000)
        times.append(float(page.evaluate("document.body.dataset.nodesRendered")) / 1000)
        page.close()
    return times


def _soak_row(browser, sessions: int, repeats: int, workdir: Path) -> dict:
    """The page of a real coordinator process (``--dashboard``) while ``sessions`` simulated
    nodes hold real sessions: register, authenticate, heartbeat (``bench.soak.SimNode``)."""
    import shutil

    from confide.bench.soak import SimNode, Stats, raise_fd_limit
    from confide.cluster.local import LocalCluster
    from confide.coordinator.broker import free_port

    raise_fd_limit()
    if workdir.exists():
        shutil.rmtree(workdir)
    port = free_port()
    cluster = LocalCluster(workdir, [], mqtt=False, heartbeat_interval_s=5.0,
                           coordinator_args=("--dashboard", f"127.0.0.1:{port}"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stats = Stats()
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        gate = asyncio.Semaphore(64)
        tasks.extend(asyncio.create_task(SimNode(i, cluster.address, None, stats, 64).run(gate))
                     for i in range(sessions))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        cluster.start_coordinator()
        asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        deadline = time.monotonic() + 300
        while stats.held + sum(stats.errors.values()) < sessions and time.monotonic() < deadline:
            time.sleep(0.2)
        held = stats.held
        times = _measure(browser, f"http://127.0.0.1:{port}/", sessions, repeats)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        cluster.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return {"nodes": sessions, "soak": True, "sessions_held": held,
            "render_s_median": statistics.median(times), "render_s_max": max(times),
            "render_s_all": times}


def run_benchmark(args: argparse.Namespace) -> int:
    import logging

    from playwright.sync_api import sync_playwright

    from confide.coordinator.dashboard import views

    counts = sorted({int(x) for x in args.nodes.split(",") if x.strip()} | {GOAL_NODES})
    executable = args.chromium or next((p for p in CHROMIUM if Path(p).exists()), "")
    if not executable:
        print("error: no Chromium (apt-get install chromium, or --chromium PATH)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = previous_results(out / "dashboard.json", key=lambda r: r["nodes"])
    load_before = os.getloadavg()[0]
    logging.getLogger("confide.coordinator.events").setLevel(logging.WARNING)  # 40 rows
    rows = []
    print(f"{'nodes':>6} {'render s (median)':>18} {'max s':>7} {'node JSON ms':>13} "
          f"{'JSON KB':>8}")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        chromium_version = browser.version
        try:
            for n in counts:
                store, sessions = populate(Path(tmp) / f"n{n}", n)
                source = views.Source(store, sessions)
                builds = []
                for _ in range(5):  # the first call pays for warming up: the median
                    started = time.perf_counter()
                    body = json.dumps({"nodes": views.node_rows(source)})
                    builds.append((time.perf_counter() - started) * 1000)
                build_ms = statistics.median(builds)
                served = _Served(source)
                try:
                    times = _measure(browser, served.server.url, n, args.repeats)
                finally:
                    served.close()
                    store.close()
                row = {"nodes": n, "render_s_median": statistics.median(times),
                       "render_s_max": max(times), "render_s_all": times,
                       "node_json_ms": build_ms, "node_json_bytes": len(body)}
                rows.append(row)
                line = (f"{n:>6} {row['render_s_median']:>18.3f} {row['render_s_max']:>7.3f} "
                        f"{build_ms:>13.1f} {len(body) / 1e3:>8.0f}")
                if previous and n in previous[1]:
                    line += f"   (last run {previous[1][n]['render_s_median']:.3f} s)"
                print(line)
            soak = (_soak_row(browser, args.soak, args.repeats, Path(args.workdir))
                    if args.soak else None)
            if soak is not None:
                print(f"{soak['nodes']:>6} {soak['render_s_median']:>18.3f} "
                      f"{soak['render_s_max']:>7.3f}   (a real coordinator process holding "
                      f"{soak['sessions_held']} gRPC sessions)")
        finally:
            browser.close()
    at_goal = soak if soak is not None and soak["nodes"] == GOAL_NODES else next(
        r for r in rows if r["nodes"] == GOAL_NODES)
    measured = at_goal["render_s_median"]
    where = (f"a coordinator process holding {at_goal['sessions_held']} simulated nodes' gRPC "
             "sessions (the soak's nodes)" if at_goal.get("soak") else
             "a store of node records with in-process sessions")
    goals = [goal_record(
        "1,000 nodes online render in under 2 s", GOAL_S, measured, measured < GOAL_S,
        f"{GOAL_NODES} online nodes ({where}): the node table is rendered {measured:.2f} s "
        f"(median of {args.repeats}, worst {at_goal['render_s_max']:.2f} s) after navigation "
        "starts, in headless Chromium on this machine", nodes=GOAL_NODES)]
    for g in goals:
        print(f"goal {g['goal']}: {'met' if g['met'] else 'MISSED'} ({g['measured']:.2f} s)")
    info = hardware() | {"cpu": cpu_model(), "load_average_1min_before": load_before,
                         "chromium": chromium_version}
    report = {"benchmark": "dashboard", "time": time.strftime("%Y%m%d-%H%M%S"),
              "workload": "N registered nodes with in-process sessions and a finished "
                          "20-round job in a real store, then a coordinator process holding "
                          "--soak simulated gRPC node sessions; page load to rendered node "
                          "table in headless Chromium; baseline: 10 nodes in the same run",
              "hardware": info, "results": rows, "soak": soak, "goals": goals}
    (out / "dashboard.json").write_text(json.dumps(report, indent=2))
    _chart(rows, soak, out / "dashboard.png")
    print(f"wrote {out / 'dashboard.json'} and {out / 'dashboard.png'}")
    return 0


def _chart(rows: list[dict], soak: dict | None, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = [r["nodes"] for r in rows]
    ax.plot(xs, [r["render_s_median"] for r in rows], "o-", label="page load to rendered "
            "node table (median)")
    ax.plot(xs, [r["render_s_max"] for r in rows], "x:", label="worst of the repeats")
    if soak is not None:
        ax.plot([soak["nodes"]], [soak["render_s_median"]], "s", color="tab:green",
                label=f"{soak['nodes']:,} soak sessions on a coordinator process (median)")
    ax.axhline(GOAL_S, color="tab:red", linestyle="--", label=f"goal: {GOAL_S:.0f} s at "
               f"{GOAL_NODES:,} nodes")
    ax.set_xscale("log")
    ax.set_xlabel("nodes online")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title("Dashboard: node table render time in headless Chromium")
    legend_outside(ax)
    save_figure(fig, path)
