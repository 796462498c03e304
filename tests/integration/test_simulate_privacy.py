"""Secure aggregation and anonymous (ring-signed) jobs on virtual nodes, run through the SDK's
``simulate``: a real coordinator process and real node sessions (``--backend local``: the
hosts in this process, the same session code a Ray actor runs, without Ray's start-up cost).

Each privacy run is compared with the plain run of the same nodes on the same seed: SecAgg+
must give the same aggregate (up to its fixed-point step) with the coordinator seeing only the
sum; ring-signed uploads must give the same aggregate with the updates filed under round-scoped
link tags, never node ids. A seeded dropout is injected in every run (the same nodes drop in
each), so SecAgg+ also has to carry on without a node that never masked its input."""

from __future__ import annotations

import pytest

from confide.sdk.simulation import simulate

#: 4 nodes, all selected, 2 rounds; seed 0 drops one node (sim1) in each round
BASE = dict(nodes=4, rounds=2, min_nodes=2, base="tiny-bert", max_steps=2, test_size=20,
            dropout=0.15, backend="local", quiet=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    result = simulate(workdir=tmp_path_factory.mktemp("plain"), **BASE)
    assert result.ok, result.experiment.reason
    return result


def _same_training(plain, other) -> None:
    drops = [len(r["dropped"]) for r in plain.experiment.rounds]
    assert sum(drops) >= 1, "the seed was meant to inject a dropout"
    for ours, theirs in zip(other.experiment.rounds, plain.experiment.rounds, strict=True):
        assert ours["participants"] == theirs["participants"]
        assert len(ours["dropped"]) == len(theirs["dropped"])
        assert all("simulated dropout" in why for why in ours["dropped"].values())
    assert other.experiment.after["loss"] == pytest.approx(plain.experiment.after["loss"],
                                                           abs=1e-4)
    assert other.experiment.after["loss"] != pytest.approx(other.experiment.before["loss"],
                                                           abs=1e-5)


@pytest.mark.timeout(120)
def test_secure_aggregation_on_virtual_nodes_gives_the_plain_aggregate(plain, tmp_path):
    secure = simulate(workdir=tmp_path, secure_aggregation=True, **BASE)
    assert secure.ok, secure.experiment.reason
    for r in secure.experiment.rounds:
        assert r["secure_aggregation"]
        # the survivors are the nodes that masked: a node that dropped never did
        assert r["secagg_survivors"] == r["participants"] == BASE["nodes"] - len(r["dropped"])
    assert not any(r["secure_aggregation"] for r in plain.experiment.rounds)
    _same_training(plain, secure)


@pytest.mark.timeout(120)
def test_anonymous_jobs_on_virtual_nodes_file_updates_under_link_tags(plain, tmp_path):
    anonymous = simulate(workdir=tmp_path, anonymous=True, **BASE)
    assert anonymous.ok, anonymous.experiment.reason
    first, second = (set(r["participant_ids"]) for r in anonymous.experiment.rounds)
    for tags, r in ((first, anonymous.experiment.rounds[0]),
                    (second, anonymous.experiment.rounds[1])):
        assert len(tags) == r["participants"] >= 2
        assert all(tag.startswith("anon-") for tag in tags)
    assert not first & second  # a node's tag does not link it across rounds
    plain_ids = {i for r in plain.experiment.rounds for i in r["participant_ids"]}
    assert not any(i.startswith("anon-") for i in plain_ids)
    _same_training(plain, anonymous)
