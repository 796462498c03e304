"""The nodes a job draws on: waiting until enough are online and idle, choosing a round's
nodes (a seeded sample, or a budget-feasible auction with its payments), the anonymity
rings of an anonymous job, and the split-server a split-learning round pairs its devices
with. Every wait is one ``SessionRegistry.wait_until``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from confide.coordinator.incentives import Bid, proportional_share
from confide.coordinator.job import JobFailed, RunningJob
from confide.coordinator.sessions import NodeSession
from confide.protos.anonymity_sets import anonymity_sets, set_size
from confide.protos.identity import ring_key_of
from confide.v1 import coordinator_pb2 as pb


def has_role(info: pb.NodeInfo | None, role: str) -> bool:
    """Nodes that declare no role are trainers (the default role)."""
    roles = list(info.roles) if info is not None else []
    return role in roles or (role == "trainer" and not roles)


class NodePool:
    def __init__(self, job: RunningJob) -> None:
        self.job = job
        self.spec = job.spec

    def infos(self) -> dict[str, pb.NodeInfo]:
        """Every registered node's info (read once per round: the registry can hold
        thousands)."""
        return {n.node_id: n.info for n in self.job.store.nodes()}

    # ------------------------------------------------------------------ waiting

    def _idle_trainers(self) -> list[NodeSession]:
        ring = set(self.job.store.ring(self.job.job_id)) if self.spec.anonymous else None
        infos = self.infos()
        return [s for s in self.job.sessions.online()
                if not s.busy and has_role(infos.get(s.node_id), "trainer")
                and (ring is None or (s.node_id in infos
                                      and ring_key_of(infos[s.node_id]) in ring))]

    async def wait_for_trainers(self, count: int) -> list[NodeSession]:
        """Idle online nodes with the trainer role, at least ``count`` of them; for an
        anonymous job only members of its ring (another node could not sign its upload)."""
        def enough() -> list[NodeSession] | None:
            online = self._idle_trainers()
            return online if len(online) >= count else None

        online = await self.job.sessions.wait_until(enough, self.spec.wait_for_nodes_s)
        if online is not None:
            return online
        why = (" (an anonymous round needs at least 2: its ring is its nodes, and a "
               "ring of one hides nobody)" if self.spec.anonymous else "")
        raise JobFailed(
            f"only {len(self._idle_trainers())} idle trainer node(s) online, the job needs "
            f"{count}{why} (waited {self.spec.wait_for_nodes_s:.0f}s); start more nodes or "
            "lower min_nodes"
        )

    async def wait_for_members(self, members: list[str]) -> list[NodeSession]:
        """The members' sessions once all are online and idle, or, at the deadline, those
        that are (if at least min_nodes)."""
        def ready() -> list[NodeSession]:
            sessions = (self.job.sessions.get(m) for m in members)
            return [s for s in sessions if s is not None and not s.closed and not s.busy]

        def all_ready() -> list[NodeSession] | None:
            sessions = ready()
            return sessions if len(sessions) == len(members) else None

        found = await self.job.sessions.wait_until(all_ready, self.spec.wait_for_nodes_s)
        if found is not None:
            return found
        found = ready()
        if len(found) >= self.spec.min_nodes:
            return found
        raise JobFailed(f"{len(found)} of the job's {len(members)} nodes are online, "
                        f"min_nodes is {self.spec.min_nodes}")

    async def split_server(self) -> pb.Peer:
        """SFPrompt pairs its devices with a split-server: an online node with that role and
        a reachable peer service (the first by node id, so a job keeps the same one)."""
        def first_server() -> pb.Peer | None:
            infos = self.infos()
            online = {s.node_id for s in self.job.sessions.online()}
            servers = sorted(node_id for node_id, info in infos.items()
                             if node_id in online and info.peer_address
                             and has_role(info, "split-server"))
            if not servers:
                return None
            return pb.Peer(node_id=servers[0], address=infos[servers[0]].peer_address,
                           role="split-server", name=infos[servers[0]].name)

        server = await self.job.sessions.wait_until(first_server, self.spec.wait_for_nodes_s)
        if server is None:
            raise JobFailed(f"method {self.spec.method!r} needs an online node with the "
                            "split-server role and a peer address (start one with "
                            "`confide node serve --role split-server`); none came within "
                            f"{self.spec.wait_for_nodes_s:.0f}s")
        return server

    # ------------------------------------------------------------------ selection

    def select(self, online: list[NodeSession], round_number: int) -> list[NodeSession]:
        """A sample seeded by the job's seed and the round: a rerun draws the same nodes."""
        online = sorted(online, key=lambda s: s.node_id)
        count = self.spec.nodes_per_round or len(online)
        rng = random.Random(f"{self.spec.seed}/{round_number}")
        return rng.sample(online, min(count, len(online)))

    async def choose(self, round_number: int
                     ) -> tuple[list[NodeSession], list[pb.Payment], int]:
        """This round's nodes: a seeded sample, or, with a budget, the winners of the
        truthful budget-feasible auction (and what each will be paid); and the population
        they were drawn from, for privacy accounting (the nodes that could have been
        selected: an auction's choice is deterministic, so its population is the winners)."""
        # an anonymous round's ring is its selected nodes: one alone would hide nobody
        least = max(2, self.spec.min_nodes) if self.spec.anonymous else self.spec.min_nodes
        online = await self.wait_for_trainers(least)
        if self.spec.budget <= 0:
            return self.select(online, round_number), [], len(online)
        infos = self.infos()
        bids = await asyncio.gather(*(self._bid(s, round_number, infos) for s in online))
        valid = [b for b in bids if b is not None]
        allocation = proportional_share(valid, self.spec.budget)
        by_id = {s.node_id: s for s in online}
        winners = [by_id[node_id] for node_id in allocation.winners]
        payments = [pb.Payment(job_id=self.job.job_id, round=round_number, node_id=b.node_id,
                               reported_cost=b.cost, value=b.value,
                               payment=allocation.payments[b.node_id])
                    for b in valid if b.node_id in allocation.payments]
        self.job.events.emit(self.job.job_id, "round.auction", round_number=round_number,
                             message=f"{len(winners)} of {len(valid)} bidder(s) selected "
                                     f"under a budget of {self.spec.budget:g}",
                             metrics={"payments": sum(p.payment for p in payments),
                                      "bidders": len(valid)})
        if len(winners) < self.spec.min_nodes:
            raise JobFailed(f"round {round_number}: the budget of {self.spec.budget:g} selects "
                            f"{len(winners)} node(s) at the reported costs, min_nodes is "
                            f"{self.spec.min_nodes}; raise the budget or lower min_nodes")
        return winners, payments, len(winners)

    async def _bid(self, session: NodeSession, round_number: int,
                   infos: dict[str, pb.NodeInfo]) -> Bid | None:
        cost = await session.ask_cost(self.job.job_id, round_number, timeout=10.0)
        if cost is None:
            return None
        info = infos.get(session.node_id)
        value = float(info.datasets.get(self.spec.train.dataset, 0)) if info else 0.0
        if value <= 0:
            return None  # nothing to contribute to this job's dataset
        return Bid(session.node_id, cost, value)

    def pay(self, round_number: int, payments: list[pb.Payment], delivered: set[str],
            used: set[str]) -> None:
        """Record the payments of winners whose update was aggregated. In an anonymous job
        the coordinator cannot tell whose update it used: it pays the winners that said
        "done" only if at least as many valid anonymous updates arrived (else nobody: one
        winner claimed work it did not upload), and says so."""
        if self.spec.anonymous:
            paid = delivered if len(used) >= len(delivered) else set()
            if not paid and delivered:
                self.job.events.emit(
                    self.job.job_id, "round.unpaid", round_number=round_number,
                    message=f"{len(delivered)} winner(s) said done but {len(used)} valid "
                            "anonymous update(s) arrived: no payment")
        else:
            paid = used
        self.job.store.record_payments(self.job.job_id, round_number,
                                       [p for p in payments if p.node_id in paid])

    # ------------------------------------------------------------------ rings

    def fix_ring(self) -> None:
        """The ring is every registered node's ring key when the job starts (sorted); a node
        of an older version (a v1 ed25519 ring key) is not in it (``ring_key_of``)."""
        store, job_id = self.job.store, self.job.job_id
        if store.ring(job_id):
            return
        keys = sorted({key for n in store.nodes() if (key := ring_key_of(n.info)) is not None})
        if len(keys) < max(2, self.spec.min_nodes):
            raise JobFailed(f"an anonymous job needs a ring of at least "
                            f"{max(2, self.spec.min_nodes)} registered nodes with ring keys; "
                            f"{len(keys)} registered")
        store.save_ring(job_id, keys)
        self.job.events.emit(job_id, "job.ring", message=f"ring of {len(keys)} keys fixed")

    def fix_round_ring(self, round_number: int, selected: Sequence[NodeSession],
                       infos: dict[str, pb.NodeInfo]) -> None:
        """An update of this round is signed over the ring keys of the nodes selected for it:
        a member that was not asked cannot file one in a selected node's place, and the
        anonymity set loses nothing by it (who was asked is no secret)."""
        keys = sorted({key for s in selected
                       if s.node_id in infos and (key := ring_key_of(infos[s.node_id]))})
        if len(keys) < 2:
            raise JobFailed(f"round {round_number}: {len(keys)} selected node(s) with a ring "
                            "key; an anonymous round needs at least 2 (a ring of one hides "
                            "nobody)")
        self.job.store.save_round_ring(self.job.job_id, round_number, keys)
        k = set_size(self.spec.anonymity_set)
        sets = anonymity_sets(keys, k, self.job.job_id, round_number)
        self.job.events.emit(self.job.job_id, "round.ring", round_number=round_number,
                             message=f"updates of this round are signed over {len(sets)} "
                                     f"anonymity set(s) of {min(len(s) for s in sets)}.."
                                     f"{max(len(s) for s in sets)} of the {len(keys)} selected "
                                     f"nodes' keys (k = {k})")
