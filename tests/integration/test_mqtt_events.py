"""Events over MQTT: node presence with a retained last will, and job progress, through the
coordinator's embedded broker. Losing the broker degrades events, never training."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiomqtt

from confide.cluster.local import LocalCluster
from confide.protos.events import BrokerAddress, event_from_json
from confide.sdk.client import AsyncClient, Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes


async def _collect(url: str, topic: str, until, timeout: float = 120.0) -> list:
    address = BrokerAddress.parse(url)
    seen = []
    async with aiomqtt.Client(address.host, address.port,
                              identifier=f"test-{uuid.uuid4().hex}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                # amqtt 0.12 can hand a new connection a retained QoS-1 message that an
                # earlier, already closed subscriber left unacknowledged: keep what we asked for
                if not message.topic.matches(topic):
                    continue
                seen.append((str(message.topic), message.payload))
                if until(seen):
                    return seen
    return seen


def test_presence_and_job_events_reach_mqtt_subscribers(tmp_path, shards):
    with LocalCluster(tmp_path / "cluster", shards(2)) as cluster, \
            Client(cluster.address) as client:
        online = wait_for_nodes(client, 2)
        victim = next(n.node_id for n in online if n.info.name == "node1")

        def both_online(seen):
            return {json.loads(p)["node_id"] for t, p in seen
                    if json.loads(p)["status"] == "online"} >= {n.node_id for n in online}

        # retained presence: a subscriber arriving late still learns who is online
        asyncio.run(_collect(cluster.mqtt_url, "confide/nodes/+/presence", both_online))

        async def run_job_while_subscribed():
            subscriber = asyncio.create_task(_collect(cluster.mqtt_url, "confide/jobs/+/events",
                                                      finished))
            await asyncio.sleep(0.5)  # subscribed before the job exists: nothing is missed
            async with AsyncClient(cluster.address) as sdk:
                job = await sdk.submit_job(tiny_spec(rounds=1, max_steps=2))
            return job, await subscriber

        def finished(seen):
            return any(event_from_json(p).kind == "job.completed" for _, p in seen)

        job, job_events = asyncio.run(run_job_while_subscribed())
        assert client.get_job(job.job_id).state == pb.COMPLETED

        cluster.kill_node(1)  # SIGKILL: only the broker's last will can say it went away

        def victim_offline(seen):
            return any(json.loads(p) == {"node_id": victim, "status": "offline"}
                       for _, p in seen)

        asyncio.run(_collect(cluster.mqtt_url, f"confide/nodes/{victim}/presence",
                             victim_offline, timeout=90))
    kinds = [event_from_json(p).kind for _, p in job_events]
    assert all(t == f"confide/jobs/{job.job_id}/events" for t, _ in job_events)
    assert kinds[0] == "job.submitted"
    assert "round.completed" in kinds and kinds[-1] == "job.completed"


def test_an_unreachable_broker_degrades_events_never_training(tmp_path, shards):
    from confide.coordinator.broker import free_port

    dead_broker = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    with LocalCluster(tmp_path / "cluster", shards(2), mqtt=False,
                      coordinator_args=("--mqtt", dead_broker)) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 2)
        job = client.submit_job(tiny_spec(rounds=2, max_steps=2))
        final = client.wait_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    assert final.rounds_completed == 2
