"""The dashboard's JSON endpoints over a real coordinator store (SQLite, event log): what they
show, what they leave out (keys, anonymous contributions), and 4xx on hostile input."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from confide.coordinator.dashboard.app import create_app
from confide.coordinator.dashboard.server import DashboardRefused, dashboard_token
from confide.coordinator.dashboard.views import Source, progress_row
from confide.coordinator.events import EventLog
from confide.coordinator.store import RoundRecord, Store
from confide.v1 import coordinator_pb2 as pb

PUBLIC_KEY = bytes(range(32))
RING_KEY = bytes(range(100, 132))


def _node(store: Store, node_id: str, spent: float) -> None:
    info = pb.NodeInfo(name=node_id, device="cpu", ring_public_key=RING_KEY,
                       peer_address="10.1.2.3:7000")
    info.datasets["bbc"] = 240
    info.privacy.add(dataset="bbc", epsilon_budget=8.0, delta=1e-5, epsilon_spent=spent)
    store.upsert_node(node_id, PUBLIC_KEY, info)


def _job(store: Store, events: EventLog, job_id: str, *, anonymous: bool) -> None:
    spec = pb.JobSpec(name=job_id, method="fedavg-lora", rounds=3, anonymous=anonymous,
                      budget=5.0)
    store.create_job(job_id, spec)
    events.emit(job_id, "job.submitted", message="fedavg-lora", state=pb.PENDING)
    for r in (1, 2):
        events.emit(job_id, "round.started", round_number=r)
        events.emit(job_id, "node.done", round_number=r, node_id="node-a",
                    metrics={"loss_last": 0.5}, bytes_up=1000)
        store.save_round(job_id, RoundRecord(
            round=r, state="completed", selected=["node-a", "node-b"], participants=["node-a"],
            dropped={"node-b": "round timeout"}, bytes_up=1000 * r, bytes_down=50_000,
            seconds=2.5, metrics={"loss_last": 1.0 / r, "epsilon": 0.5 * r,
                                  "nan_metric": float("nan")}))
        store.record_payments(job_id, r, [pb.Payment(node_id="node-a", reported_cost=1.0,
                                                     value=240, payment=1.5)])
        events.emit(job_id, "round.completed", round_number=r, bytes_up=1000 * r)
    # the submitter's held-out figure of round 2 (ReportEvaluation)
    events.emit(job_id, "round.evaluated", round_number=2, metrics={"accuracy": 0.9})


@pytest.fixture
def client(tmp_path):
    store = Store(tmp_path / "coordinator")
    events = EventLog(store)
    _node(store, "node-a", 1.25)
    _node(store, "node-b", 0.0)
    _job(store, events, "open1", anonymous=False)
    _job(store, events, "anon1", anonymous=True)
    with TestClient(create_app(Source(store))) as test_client:
        yield test_client
    store.close()


def test_nodes_show_what_operators_share_and_no_keys(client):
    response = client.get("/api/nodes")
    assert response.status_code == 200
    nodes = {n["id"]: n for n in response.json()["nodes"]}
    assert set(nodes) == {"node-a", "node-b"}
    assert nodes["node-a"]["datasets"] == {"bbc": 240}
    assert nodes["node-a"]["device"] == "cpu"
    assert nodes["node-a"]["epsilon_spent"] == 1.25
    assert nodes["node-a"]["privacy"][0]["epsilon_budget"] == 8.0
    assert nodes["node-a"]["online"] is False  # no live session in this store
    text = response.text
    assert "10.1.2.3" not in text  # no peer address
    for key in (PUBLIC_KEY, RING_KEY):  # no key, in any of the usual encodings
        assert key.hex() not in text
        assert json.dumps(list(key))[1:-1] not in text


def test_job_detail_has_the_rounds_for_the_charts_and_the_ledger(client):
    jobs = client.get("/api/jobs").json()["jobs"]
    assert {j["id"] for j in jobs} == {"open1", "anon1"}
    job = client.get("/api/jobs/open1").json()
    assert job["method"] == "fedavg-lora" and job["rounds"] == 3
    assert job["rounds_completed"] == 2
    rounds = job["round_list"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["loss"] for r in rounds] == [1.0, 0.5]
    assert [r["epsilon"] for r in rounds] == [0.5, 1.0]
    assert [r["accuracy"] for r in rounds] == [None, 0.9]  # reported by the submitter
    assert [r["bytes_up"] for r in rounds] == [1000, 2000]
    assert rounds[0]["metrics"]["nan_metric"] is None  # JSON has no NaN
    assert rounds[0]["dropped"] == [{"node": "node-b", "reason": "round timeout"}]
    assert [p["node"] for p in job["payments"]] == ["node-a", "node-a"]


def test_an_anonymous_job_shows_no_per_node_contribution(client):
    job = client.get("/api/jobs/anon1").json()
    assert job["anonymous"] is True
    assert job["round_list"][0]["dropped"] == [{"node": "", "reason": "round timeout"}]
    assert job["payments"] == [{"round": 1, "node": "", "payment": 1.5},
                               {"round": 2, "node": "", "payment": 1.5}]
    events = client.get("/api/jobs/anon1/events").json()["events"]
    done = [e for e in events if e["kind"] == "node.done"]
    assert done and all(e["node"] == "" and e["metrics"] == {} and e["bytes_up"] == 0
                        for e in done)
    assert "node-a" not in client.get("/api/jobs/anon1").text
    recent = client.get("/api/events").json()["events"]
    assert all(e["node"] == "" for e in recent if e["job"] == "anon1")
    assert any(e["node"] == "node-a" for e in recent if e["job"] == "open1")


def test_events_replay_like_watchjob(client):
    events = client.get("/api/jobs/open1/events").json()["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    later = client.get("/api/jobs/open1/events?after=3").json()["events"]
    assert [e["seq"] for e in later] == [e["seq"] for e in events[3:]]
    recent = client.get("/api/events?count=500").json()
    assert recent["cursor"] == len(recent["events"]) == 2 * len(events)


def test_the_page_and_the_vendored_chart_library_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "dashboard.js" in page.text
    chart = client.get("/static/vendor/chart.umd.min.js")
    assert chart.status_code == 200 and "Chart.js v4" in chart.text[:200]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN


@pytest.mark.parametrize(("path", "status"), [
    ("/api/jobs/nope", 404),
    ("/api/jobs/..%2F..%2Fetc", 404),
    ("/api/jobs/bad%20id%3B", 400),
    ("/api/jobs/" + "a" * 65, 400),
    ("/api/jobs/open1/events?after=-1", 400),
    ("/api/jobs/open1/events?after=x", 400),
    ("/api/events?count=1e9", 400),
    ("/api/stream?after=abc", 400),
    ("/api/nodes?" + "x" * 5000, 414),
    ("/static/../views.py", 404),
    ("/nothing", 404),
])
def test_hostile_requests_get_a_4xx(client, path, status):
    assert client.get(path).status_code == status


def test_the_page_loads_only_its_own_files(client):
    headers = client.get("/").headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


def test_training_progress_is_forwarded_only_as_step_and_loss():
    event = pb.Event(job_id="j", kind="node.progress", round=2, node_id="node-a")
    event.metrics.update({"step": 3, "total_steps": 8, "loss": 0.5})
    assert progress_row(event) == {"job": "j", "round": 2, "node": "node-a", "step": 3,
                                   "total": 8, "loss": 0.5}
    assert progress_row(pb.Event(job_id="j", kind="round.started")) is None


def test_writes_are_not_allowed(client):
    assert client.post("/api/jobs").status_code == 405
    assert client.delete("/api/jobs/open1").status_code == 405


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text(min_size=1, max_size=300), after=st.text(max_size=40))
def test_any_job_id_or_cursor_is_answered_without_a_5xx(client, job_id, after):
    quoted = quote(job_id, safe="")  # any text at all reaches the server, percent-encoded
    for path in (f"/api/jobs/{quoted}", f"/api/jobs/{quoted}/events"):
        response = client.get(path, params={"after": after})
        assert response.status_code < 500, (path, response.text)
    assert client.get("/api/nodes").status_code == 200  # still serving


def test_the_token_is_required_when_set(tmp_path):
    store = Store(tmp_path / "c")
    with TestClient(create_app(Source(store), token="s3cret"),
                    follow_redirects=False) as test_client:
        assert test_client.get("/api/nodes").status_code == 401
        assert test_client.get("/").status_code == 401
        assert test_client.get("/api/nodes",
                               headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert test_client.get("/api/nodes",
                               headers={"Authorization": "Bearer s3cret"}).status_code == 200
        login = test_client.get("/?token=s3cret")
        assert login.status_code == 303 and login.headers["location"] == "/"
        assert "httponly" in login.headers["set-cookie"].lower()
        assert test_client.get("/api/nodes").status_code == 200  # the cookie now
    store.close()


def test_beyond_loopback_needs_a_token():
    assert dashboard_token("127.0.0.1:8080", "t") == ""
    assert dashboard_token("0.0.0.0:8080", "t") == "t"
    with pytest.raises(DashboardRefused, match="beyond loopback"):
        dashboard_token("0.0.0.0:8080", "")
    with pytest.raises(ValueError, match="HOST:PORT"):
        dashboard_token("8080", "")


def test_the_stream_carries_new_events_and_live_progress(tmp_path):
    store = Store(tmp_path / "c")
    events = EventLog(store)
    _node(store, "node-a", 0.0)
    store.create_job("j1", pb.JobSpec(method="fedavg-lora", rounds=1))
    events.emit("j1", "job.submitted")
    seen: list[str] = []
    with TestClient(create_app(Source(store, events=events))) as test_client, \
            test_client.stream("GET", "/api/stream?after=0") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            seen.append(line)
            if line == "event: event":  # the stored event replayed: now a live tick
                events.emit_transient("j1", "node.progress", round_number=1,
                                      node_id="node-a",
                                      metrics={"step": 1, "total_steps": 4, "loss": 2.0})
            if ("event: jobs" in seen and "event: progress" in seen
                    and seen.index("event: progress") + 1 < len(seen)):  # its data line too
                break
    assert "event: nodes" in seen and "event: jobs" in seen
    data = seen[seen.index("event: progress") + 1]
    assert json.loads(data.removeprefix("data: "))[0]["step"] == 1
    store.close()


def test_a_page_that_stops_reading_never_breaks_the_event_log(tmp_path):
    """Progress ticks go to every open page's queue from inside the coordinator's event log:
    a full queue drops them instead of raising into the node's session handler."""
    from confide.coordinator.dashboard.app import _DroppingQueue

    store = Store(tmp_path / "c")
    events = EventLog(store)
    queue = _DroppingQueue(maxsize=2)
    events.transient_listeners.add(queue)
    for step in range(5):
        events.emit_transient("j1", "node.progress", node_id="n", metrics={"step": step})
    assert queue.qsize() == 2
    store.close()
