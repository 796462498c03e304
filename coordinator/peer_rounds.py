"""Peer (decentralized) rounds: models travel between nodes only (DIMAT).

Per round every member trains its own model (TRAIN), then, once all have, merges with its
neighbours (MERGE) peer to peer. The coordinator is the barrier between the phases and
publishes the topology; it receives metrics, never a weight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from confide.coordinator.job import JobFailed, RunningJob, weighted_metrics
from confide.coordinator.node_pool import NodePool
from confide.coordinator.sessions import NodeSession, TaskOutcome
from confide.coordinator.store import RoundRecord
from confide.node.methods.topology import mixing_weights, neighbours
from confide.v1 import coordinator_pb2 as pb


class PeerRounds:
    def __init__(self, job: RunningJob, pool: NodePool) -> None:
        self.job = job
        self.spec = job.spec
        self.pool = pool

    async def run(self, rounds_completed: int) -> None:
        """Every round after the last completed one to the job's last."""
        for round_number in range(rounds_completed + 1, self.spec.rounds + 1):
            await self.run_round(round_number)

    async def members(self) -> list[str]:
        """A decentralized job's nodes, fixed by its first round (the topology is over
        them): the idle trainers online with a reachable peer service."""
        first = next((r for r in self.job.store.rounds(self.job.job_id) if r.round == 1), None)
        if first is not None:
            return list(first.selected)
        online = await self.pool.wait_for_trainers(self.spec.min_nodes)
        infos = self.pool.infos()
        members = sorted(s.node_id for s in online if infos[s.node_id].peer_address)
        if len(members) < max(2, self.spec.min_nodes):
            raise JobFailed(f"method {self.spec.method!r} merges models peer to peer: it needs "
                            f"at least {max(2, self.spec.min_nodes)} nodes with a peer service "
                            f"(--listen), {len(members)} online")
        return members

    async def _phase(self, sessions: Sequence[NodeSession], kind: int, round_number: int,
                     peers: dict[str, tuple[list[pb.Peer], float]] | None = None,
                     ) -> list[TaskOutcome]:
        async def one(session: NodeSession) -> TaskOutcome:
            task = self.job.new_task(kind, round_number, has_global=False)
            if peers is not None:
                neighbours, self_weight = peers[session.node_id]
                task.peers.extend(neighbours)
                task.self_weight = self_weight
            return await session.run_task(task, None, self.spec.round_timeout_s,
                                          expects_payload=False)

        return list(await asyncio.gather(*(one(s) for s in sessions)))

    async def run_round(self, round_number: int) -> None:
        job = self.job
        started = time.monotonic()
        members = await self.members()
        sessions = await self.pool.wait_for_members(members)
        record = RoundRecord(round=round_number, state="running", selected=members)
        job.store.save_round(job.job_id, record)
        job.events.emit(job.job_id, "round.started", round_number=round_number,
                        message=f"{len(sessions)} of {len(members)} node(s) train, then merge")
        trained = await self._phase(sessions, pb.TRAIN, round_number)
        ok = {o.node_id for o in trained if o.ok}
        infos = self.pool.infos()
        adjacency = neighbours(job.config, members)
        peers: dict[str, tuple[list[pb.Peer], float]] = {}
        for node in ok:
            self_weight, row = mixing_weights(adjacency, node)
            # a neighbour that did not train gets no address: the node treats it as
            # unreachable, by the job's policy
            peers[node] = ([pb.Peer(node_id=j, role="neighbour", weight=w,
                                    address=infos[j].peer_address if j in ok else "")
                            for j, w in sorted(row.items())], self_weight)
        merging = [s for s in sessions if s.node_id in ok]
        merged = await self._phase(merging, pb.MERGE, round_number, peers)
        for outcome in [*trained, *merged]:
            record.bytes_up += outcome.bytes_up
            record.bytes_down += outcome.bytes_down
            if not outcome.ok:
                job.drop(record, outcome.node_id, outcome.reason, refused=outcome.refused)
        accepted = [o for o in trained if o.ok]
        for outcome in accepted:
            job.events.emit(job.job_id, "node.done", round_number=round_number,
                            node_id=outcome.node_id, metrics=outcome.metrics,
                            message=f"{outcome.num_examples} examples trained",
                            bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down)
        done = [o for o in merged if o.ok]
        record.participants = sorted(o.node_id for o in done)
        record.metrics = weighted_metrics(accepted)
        if done:
            # what travelled between peers (the coordinator saw none of it)
            record.metrics["peer_bytes_down_per_node"] = sum(
                o.metrics.get("peer_bytes_down", 0.0) for o in done) / len(done)
            record.metrics["neighbours_merged"] = sum(
                o.metrics.get("neighbours_merged", 0.0) for o in done) / len(done)
        record.seconds = time.monotonic() - started
        if len(done) < self.spec.min_nodes:
            job.fail_round(record, f"{len(done)} of {len(members)} node(s) trained and merged")
        record.state = "completed"
        job.store.save_round(job.job_id, record)
        job.events.emit(job.job_id, "round.completed", round_number=round_number,
                        message=f"{len(done)} node(s) merged with their neighbours in "
                                f"{record.seconds:.1f}s",
                        metrics=record.metrics, bytes_up=record.bytes_up,
                        bytes_down=record.bytes_down)
