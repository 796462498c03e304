"""The dashboard in a real browser: headless Chromium (Playwright) against a real coordinator
and two real node daemons. Both nodes show up online, a submitted job's round chart gains
points and the event log grows with no reload, a reload loses nothing, and a dashboard beyond
loopback refuses to start without a token and refuses requests without it. Screenshots go to
the test's tmp folder (``screenshots/``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from confide.cluster.local import LocalCluster
from confide.coordinator.broker import free_port
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.browser import chromium_path
from tests.integration.helpers import tiny_spec, wait_for_nodes


@pytest.fixture
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def _count(page, selector: str) -> int:
    return page.eval_on_selector_all(selector, "nodes => nodes.length")


def test_the_page_follows_nodes_and_a_job_live(tmp_path, shards, browser):
    port = free_port()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    cluster = LocalCluster(tmp_path / "cluster", shards(2),
                           coordinator_args=("--dashboard", f"127.0.0.1:{port}"))
    with cluster, Client(cluster.address) as client:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []  # a script error, a CSP violation, a failed request
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{port}/")
        # both daemons come online on the page by themselves (the stream, no reload)
        page.wait_for_function(
            "() => document.querySelectorAll('#nodes tbody tr[data-online=\"1\"]').length === 2",
            timeout=90_000)
        wait_for_nodes(client, 2)
        names = page.eval_on_selector_all("#nodes tbody tr td:nth-child(2)",
                                          "cells => cells.map(c => c.textContent).sort()")
        assert names == ["node0", "node1"]
        assert "2 online of 2" in page.inner_text("#nodes-summary")
        page.evaluate("window.__notReloaded = true")
        events_before = _count(page, "#events li")

        job = client.submit_job(tiny_spec(rounds=3, min_nodes=2))
        page.wait_for_function(
            "() => Number(document.getElementById('job').dataset.rounds || 0) >= 1",
            timeout=120_000)
        assert page.evaluate("window.dashboard.selected") == job.job_id
        points = page.evaluate("window.dashboard.charts.bytes.data.labels.length")
        assert points >= 1
        assert _count(page, "#events li") > events_before
        assert page.evaluate("window.__notReloaded === true")
        page.screenshot(path=str(shots / "first-round.png"), full_page=True)

        final = client.wait_job(job.job_id)
        assert final.state == pb.COMPLETED, final.reason
        page.wait_for_function(
            "() => document.getElementById('job-state').textContent === 'COMPLETED'",
            timeout=30_000)
        assert page.evaluate("window.__notReloaded === true")
        # the chart gained a point per round, live
        assert page.evaluate("window.dashboard.charts.bytes.data.labels") == [1, 2, 3]
        assert page.evaluate("window.dashboard.charts.quality.data.datasets[1].data"
                             ".every(v => v !== null)")  # a loss per round
        kinds = page.eval_on_selector_all("#events li", "items => items.map(i => i.dataset.kind)")
        assert kinds.count("round.completed") == 3 and "job.completed" in kinds
        page.locator("#nodes-section").screenshot(path=str(shots / "nodes.png"))
        page.locator("#job").screenshot(path=str(shots / "job.png"))
        page.screenshot(path=str(shots / "finished.png"), full_page=True)
        logged = _count(page, "#events li")

        page.reload()  # a reload loses nothing: everything comes back from the store
        page.wait_for_function(
            "() => Number(document.getElementById('job').dataset.rounds || 0) === 3",
            timeout=30_000)
        assert page.evaluate("window.dashboard.selected") == job.job_id
        assert _count(page, "#events li") == logged
        assert _count(page, "#nodes tbody tr") == 2
        assert errors == []
        page.close()


def test_beyond_loopback_the_dashboard_needs_the_token(tmp_path, browser):
    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "confide.cli.main", "coordinator", "serve", "--data",
         str(tmp_path / "open"), "--mqtt", "none", "--listen", f"127.0.0.1:{free_port()}",
         "--dashboard", f"0.0.0.0:{port}"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "CONFIDE_TOKEN"})
    assert refused.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0" in refused.stderr
    assert "--token" in refused.stderr

    cluster = LocalCluster(tmp_path / "cluster", [], mqtt=False,
                           coordinator_args=("--dashboard", f"0.0.0.0:{port}",
                                             "--token", "tok-123"))
    with cluster:
        page = browser.new_page()
        response = page.goto(f"http://127.0.0.1:{port}/")
        assert response.status == 401
        assert "client token" in page.inner_text("body")
        assert page.request.get(f"http://127.0.0.1:{port}/api/nodes").status == 401
        page.goto(f"http://127.0.0.1:{port}/?token=tok-123")
        assert page.url == f"http://127.0.0.1:{port}/"  # the token left the address bar
        page.wait_for_function(
            "() => document.getElementById('nodes-summary').textContent.includes('0 online')",
            timeout=30_000)
        deadline = time.monotonic() + 10
        while page.inner_text("#live") != "live" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert page.inner_text("#live") == "live"  # the event stream is let through too
        page.screenshot(path=str(tmp_path / "token.png"))
        # hostile requests to the real process: each gets a 4xx, the coordinator stays up
        auth = {"Authorization": "Bearer tok-123"}
        for path in ("/api/jobs/%00%ff", "/api/jobs/" + "x" * 10_000,
                     "/api/jobs/zz/events?after=-5", "/api/nodes?" + "q=1&" * 30_000,
                     "/api/stream?after=1e99"):
            status = _status(f"http://127.0.0.1:{port}{path}", auth)
            assert 400 <= status < 500, (path[:60], status)
        assert cluster.coordinator is not None and cluster.coordinator.poll() is None
        assert _status(f"http://127.0.0.1:{port}/api/nodes", auth) == 200
        page.close()


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
