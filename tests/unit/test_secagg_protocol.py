"""SecAgg+ state machines (privacy.secagg.protocol): the exact sum, dropouts in every phase, the
threshold, the double-reveal rule, forged advertisements, replayed shares, the masked vector's
independence from the input, node cost growing with the neighbour count, and the simulation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from confide.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggProtocolError,
    SecAggRefused,
    SecAggServer,
    default_degree,
    neighbour_graph,
)
from confide.privacy.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    Setup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.privacy.secagg.protocol import codec_of, open_shares, seal_shares
from confide.privacy.secagg.simulate import simulate_round


class Nodes:
    """Registered Ed25519 node keys, the verifier a server and peers use."""

    def __init__(self, n: int) -> None:
        self.ids = [f"n{i:02d}" for i in range(n)]
        self.keys = {i: Ed25519PrivateKey.generate() for i in self.ids}

    def verify(self, node_id: str, payload: bytes, signature: bytes) -> bool:
        try:
            self.keys[node_id].public_key().verify(signature, payload)
        except (InvalidSignature, KeyError):
            return False
        return True

    def client(self, node_id: str) -> SecAggClient:
        return SecAggClient(node_id, self.keys[node_id].sign, self.verify)

    def server(self, round_: int = 1, job: str = "job", **kw) -> SecAggServer:
        kw.setdefault("dim", 50)
        kw.setdefault("clip", 1.0)
        kw.setdefault("max_weight", 100)
        return SecAggServer.new_round(job_id=job, round_=round_, participants=self.ids,
                                      verify=self.verify, **kw)


@dataclasses.dataclass
class Round:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    forwarded: dict[str, ForwardedShares] = dataclasses.field(default_factory=dict)
    request: UnmaskRequest | None = None


def run(nodes: Nodes, values, weights, *, drop: dict[str, set[str]] | None = None,
        round_: int = 1, noise=None, **kw):
    """A whole round over the wire encoding; ``drop[phase]`` nodes stop after that phase."""
    drop = {"advertise": set(), "share_keys": set(), "masked_input": set(), **(drop or {})}
    server = nodes.server(round_, **kw)
    clients = {i: nodes.client(i) for i in nodes.ids}
    state = Round(server, clients)
    setup = Setup.from_bytes(server.setup.to_bytes())
    for i in nodes.ids:
        server.receive_advertisement(AdvertiseKeys.from_bytes(
            clients[i].handle_setup(setup).to_bytes()))
    for i, bundle in server.close_advertising().items():
        if i not in drop["advertise"]:
            server.receive_shares(ShareKeys.from_bytes(clients[i].handle_key_bundle(
                KeyBundle.from_bytes(bundle.to_bytes())).to_bytes()))
    state.forwarded = server.close_sharing()
    for i, message in state.forwarded.items():
        if i not in drop["share_keys"]:
            masked = clients[i].handle_forwarded_shares(
                ForwardedShares.from_bytes(message.to_bytes()), values[i], weights[i], noise)
            server.receive_masked_input(MaskedInput.from_bytes(masked.to_bytes()))
    state.request = server.close_masking()
    for i in state.request.survivors:
        if i not in drop["masked_input"]:
            server.receive_unmask(UnmaskResponse.from_bytes(clients[i].handle_unmask_request(
                UnmaskRequest.from_bytes(state.request.to_bytes())).to_bytes()))
    return server.finish(), state


def inputs(nodes: Nodes, dim: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    values = {i: rng.uniform(-1, 1, dim) for i in nodes.ids}
    weights = {i: int(rng.integers(1, 101)) for i in nodes.ids}
    return values, weights


def expected_ring(server: SecAggServer, values, weights, who) -> np.ndarray:
    codec = codec_of(server.setup)
    total = np.zeros(server.setup.dim + 1, dtype=codec.dtype)
    for i in who:
        total += codec.encode(values[i], weights[i])
    return total


# ---------------------------------------------------------------- the sum


@pytest.mark.parametrize("n, degree", [(3, None), (6, None), (14, 4)])
def test_exact_sum_of_all_nodes(n, degree):
    nodes = Nodes(n)
    values, weights = inputs(nodes)
    result, state = run(nodes, values, weights, degree=degree)
    assert result.survivors == tuple(nodes.ids)
    np.testing.assert_array_equal(result.ring_sum,
                                  expected_ring(state.server, values, weights, nodes.ids))
    plain = sum(weights[i] * values[i] for i in nodes.ids)
    step = 2.0**-state.server.setup.frac_bits
    assert np.max(np.abs(result.weighted_sum - plain)) <= n * step / 2
    assert result.weight_total == sum(weights.values())
    np.testing.assert_allclose(result.mean(), plain / sum(weights.values()), atol=step)


def test_integers_sum_exactly():
    nodes = Nodes(5)
    rng = np.random.default_rng(3)
    values = {i: rng.integers(-1000, 1001, 40).astype(np.float64) for i in nodes.ids}
    weights = dict.fromkeys(nodes.ids, 1)
    result, _ = run(nodes, values, weights, dim=40, clip=1000.0, max_weight=1, frac_bits=0)
    np.testing.assert_array_equal(result.weighted_sum, sum(values.values()))
    assert result.weight_total == 5


# ---------------------------------------------------------------- dropouts and the threshold


@pytest.mark.parametrize("phase", ["advertise", "share_keys", "masked_input"])
@pytest.mark.parametrize("n, degree", [(5, None), (16, 6)])
def test_dropouts_in_each_phase_leave_the_exact_sum_of_the_survivors(phase, n, degree):
    nodes = Nodes(n)
    values, weights = inputs(nodes)
    gone = {nodes.ids[1], nodes.ids[-2]}
    result, state = run(nodes, values, weights, drop={phase: gone}, degree=degree)
    # dropping after the masked input leaves the input in the sum; earlier, it is left out
    in_sum = nodes.ids if phase == "masked_input" else [i for i in nodes.ids if i not in gone]
    assert result.survivors == tuple(in_sum)
    np.testing.assert_array_equal(result.ring_sum,
                                  expected_ring(state.server, values, weights, in_sum))


@pytest.mark.parametrize("phase", ["advertise", "share_keys", "masked_input"])
def test_fewer_than_t_survivors_fail_clearly(phase):
    nodes = Nodes(5)  # complete graph, t = 3
    values, weights = inputs(nodes)
    with pytest.raises(SecAggAbort, match=r"threshold|needed"):
        run(nodes, values, weights, drop={phase: set(nodes.ids[:3])})


def test_a_share_group_short_of_t_aborts_before_unmasking_anything():
    nodes = Nodes(16)
    values, weights = inputs(nodes)
    server = nodes.server(degree=4)  # share groups of 5, t = 3
    victim = nodes.ids[0]
    around = sorted(server.neighbours(victim))[:3]  # the victim keeps 1 neighbour + itself
    # the victim's self-mask seed has 2 shares among the responders: the whole round fails
    with pytest.raises(SecAggAbort, match=f"shares of {victim}"):
        run(nodes, values, weights, drop={"masked_input": set(around)}, degree=4,
            graph_seed=server.setup.graph_seed)


def test_the_server_refuses_to_go_on_below_t_mid_protocol():
    nodes = Nodes(4)
    server = nodes.server()
    clients = {i: nodes.client(i) for i in nodes.ids}
    for i in nodes.ids[:2]:
        server.receive_advertisement(clients[i].handle_setup(server.setup))
    with pytest.raises(SecAggAbort):
        server.close_advertising()
    with pytest.raises(SecAggProtocolError):  # and stays failed
        server.close_sharing()


# ---------------------------------------------------------------- an honest node's refusals


def _through_sharing(nodes: Nodes, server: SecAggServer):
    """Phases 1-2 without the wire encoding: the clients and the server's forwarded shares."""
    clients = {i: nodes.client(i) for i in nodes.ids}
    for i in nodes.ids:
        server.receive_advertisement(clients[i].handle_setup(server.setup))
    for i, bundle in server.close_advertising().items():
        server.receive_shares(clients[i].handle_key_bundle(bundle))
    return clients, server.close_sharing()


def _masked_round(n: int = 5, skip: str | None = None):
    """A round up to the masked inputs (``skip`` never sends its masked input)."""
    nodes = Nodes(n)
    values, weights = inputs(nodes)
    server = nodes.server()
    clients, forwarded = _through_sharing(nodes, server)
    for i, message in forwarded.items():
        if i != skip:
            server.receive_masked_input(
                clients[i].handle_forwarded_shares(message, values[i], weights[i]))
    return nodes, server, clients


def test_double_reveal_is_refused():
    nodes, server, clients = _masked_round()
    me, peer = nodes.ids[0], nodes.ids[1]
    request = server.close_masking()
    first = clients[me].handle_unmask_request(request)
    assert {s.owner: s.kind for s in first.shares}[peer] == 0  # the self-mask seed share
    assert clients[me].handle_unmask_request(request) == first  # asking again: same answer
    lie = UnmaskRequest(request.job_id, request.round,
                        tuple(s for s in request.survivors if s != peer))
    with pytest.raises(SecAggRefused, match="already revealed"):
        clients[me].handle_unmask_request(lie)  # would reveal peer's mask-key share too


def test_a_node_listed_as_dropped_or_too_few_survivors_refuses():
    nodes, _, clients = _masked_round()
    me = nodes.ids[0]
    with pytest.raises(SecAggRefused, match="lies about dropouts"):
        clients[me].handle_unmask_request(UnmaskRequest("job", 1, tuple(nodes.ids[1:])))
    with pytest.raises(SecAggAbort):
        clients[nodes.ids[1]].handle_unmask_request(UnmaskRequest("job", 1, tuple(nodes.ids[:2])))


def test_no_answer_for_another_job_or_round():
    nodes, server, clients = _masked_round()
    me = clients[nodes.ids[0]]
    survivors = tuple(nodes.ids)
    for job, rnd in (("job", 2), ("other", 1)):
        with pytest.raises(SecAggRefused, match="joined job"):
            me.handle_unmask_request(UnmaskRequest(job, rnd, survivors))
    with pytest.raises(SecAggRefused):
        me.handle_setup(dataclasses.replace(server.setup, round=2))
    # the refusals changed nothing: the real request is still answered
    assert me.handle_unmask_request(UnmaskRequest("job", 1, survivors)).sender == nodes.ids[0]


def test_a_weak_threshold_or_foreign_setup_is_refused():
    nodes = Nodes(6)
    server = nodes.server()
    weak = dataclasses.replace(server.setup, threshold=3)  # group of 6: a majority is 4
    with pytest.raises(SecAggProtocolError, match="majority"):
        nodes.client(nodes.ids[0]).handle_setup(weak)
    with pytest.raises(SecAggProtocolError, match="not a participant"):
        SecAggClient("stranger", nodes.keys[nodes.ids[0]].sign, nodes.verify).handle_setup(
            server.setup)
    odd = dataclasses.replace(server.setup, degree=3)
    with pytest.raises(SecAggProtocolError, match="even"):
        nodes.client(nodes.ids[0]).handle_setup(odd)


# ---------------------------------------------------------------- forgeries and replays


def test_a_forged_key_advertisement_is_refused_by_server_and_peers():
    nodes = Nodes(4)
    server = nodes.server()
    clients = {i: nodes.client(i) for i in nodes.ids}
    ads = {i: clients[i].handle_setup(server.setup) for i in nodes.ids}
    mallory_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    forged = dataclasses.replace(ads[nodes.ids[1]], c_pk=mallory_key)  # signature kept
    with pytest.raises(SecAggProtocolError, match="forged"):
        server.receive_advertisement(forged)
    impostor = Ed25519PrivateKey.generate()  # a key that is not n01's registered one
    resigned = dataclasses.replace(forged, signature=impostor.sign(b"anything"))
    with pytest.raises(SecAggProtocolError, match="forged"):
        server.receive_advertisement(resigned)
    # a server that forwards the forged key anyway: the peer checks the signature itself
    bundle = KeyBundle("job", 1, nodes.ids[0],
                       tuple(forged if a.sender == nodes.ids[1] else a
                             for i, a in ads.items() if i != nodes.ids[0]))
    with pytest.raises(SecAggProtocolError, match="forged"):
        clients[nodes.ids[0]].handle_key_bundle(bundle)


def test_sealed_shares_are_bound_to_job_round_and_pair():
    agreement = bytes(range(32))
    sealed = seal_shares(agreement, "job", 1, "a", "b", b"x" * 66)
    assert open_shares(agreement, "job", 1, "a", "b", sealed) == b"x" * 66
    for job, rnd, sender, receiver in (("job", 2, "a", "b"), ("other", 1, "a", "b"),
                                       ("job", 1, "b", "a"), ("job", 1, "a", "c")):
        with pytest.raises(SecAggProtocolError, match="replayed or forged"):
            open_shares(agreement, job, rnd, sender, receiver, sealed)
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(SecAggProtocolError):
        open_shares(agreement, "job", 1, "a", "b", tampered)


def test_a_share_replayed_from_another_round_is_refused():
    nodes = Nodes(4)
    values, weights = inputs(nodes)
    _, round1 = run(nodes, values, weights, round_=1)
    old = round1.forwarded[nodes.ids[0]]
    clients, forwarded = _through_sharing(nodes, nodes.server(round_=2))
    fresh = forwarded[nodes.ids[0]]
    replay = dataclasses.replace(fresh, shares=(old.shares[0], *fresh.shares[1:]))
    me = clients[nodes.ids[0]]
    with pytest.raises(SecAggProtocolError, match="replayed or forged"):
        me.handle_forwarded_shares(replay, values[nodes.ids[0]], 1)
    with pytest.raises(SecAggRefused):  # the old message as it was: the wrong round
        me.handle_forwarded_shares(old, values[nodes.ids[0]], 1)
    # the genuine message still works afterwards
    assert me.handle_forwarded_shares(fresh, values[nodes.ids[0]], 1).round == 2


def test_the_server_rejects_out_of_place_messages():
    nodes, server, clients = _masked_round(4)
    with pytest.raises(SecAggProtocolError, match="phase"):
        server.receive_shares(ShareKeys("job", 1, nodes.ids[0], ()))
    with pytest.raises(SecAggProtocolError, match="already sent"):
        server.receive_masked_input(MaskedInput("job", 1, nodes.ids[0], bytes(51 * 4)))
    fresh = nodes.server()
    fresh_clients = {i: nodes.client(i) for i in nodes.ids}
    for i in nodes.ids:
        fresh.receive_advertisement(fresh_clients[i].handle_setup(fresh.setup))
    bundles = fresh.close_advertising()
    partial = fresh_clients["n00"].handle_key_bundle(bundles["n00"])
    with pytest.raises(SecAggProtocolError, match="each advertised neighbour"):
        fresh.receive_shares(dataclasses.replace(partial, shares=partial.shares[1:]))
    fresh.receive_shares(partial)
    for i in nodes.ids[1:]:
        fresh.receive_shares(fresh_clients[i].handle_key_bundle(bundles[i]))
    fresh.close_sharing()
    with pytest.raises(SecAggProtocolError, match="bytes, expected"):
        fresh.receive_masked_input(MaskedInput("job", 1, "n00", bytes(50 * 4)))
    request = server.close_masking()
    response = clients[nodes.ids[0]].handle_unmask_request(request)
    server.receive_unmask(response)
    with pytest.raises(SecAggProtocolError, match="already sent"):
        server.receive_unmask(response)
    lying = UnmaskResponse("job", 1, nodes.ids[1],
                           (RevealedShare(nodes.ids[2], 1, 5),))  # a mask key of a survivor
    with pytest.raises(SecAggProtocolError, match="wrong kind"):
        server.receive_unmask(lying)
    with pytest.raises(SecAggProtocolError, match="job"):
        server.receive_unmask(dataclasses.replace(response, round=9, sender=nodes.ids[1]))


def test_a_wrong_mask_key_share_aborts_instead_of_a_wrong_sum():
    _, server, clients = _masked_round(5, skip="n04")
    dropped = "n04"
    request = server.close_masking()
    for i in request.survivors:
        response = clients[i].handle_unmask_request(request)
        if i == request.survivors[0]:
            shares = tuple(dataclasses.replace(s, value=(s.value + 1))
                           if s.owner == dropped else s for s in response.shares)
            response = dataclasses.replace(response, shares=shares)
        server.receive_unmask(response)
    with pytest.raises(SecAggAbort):
        server.finish()


# ---------------------------------------------------------------- what the server sees


def test_the_masked_vector_is_independent_of_the_input():
    dim = 20_000
    nodes = Nodes(3)
    rng = np.random.default_rng(7)
    target = nodes.ids[0]
    seen, truths = [], []
    updates = (rng.uniform(-1, 1, dim), np.linspace(-0.9, 0.9, dim))
    for update in updates:
        values = {i: rng.uniform(-1, 1, dim) for i in nodes.ids}
        values[target] = update
        weights = dict.fromkeys(nodes.ids, 7)
        server = nodes.server(dim=dim)
        clients, forwarded = _through_sharing(nodes, server)
        for i, message in forwarded.items():
            masked = clients[i].handle_forwarded_shares(message, values[i], weights[i])
            if i == target:
                seen.append(np.frombuffer(masked.vector, dtype="<u4")[:-1].astype(np.float64))
                truths.append(codec_of(server.setup).encode(update, 7)[:-1].view("<i4"))
    bound = 6 / np.sqrt(dim)  # 6 standard errors of a correlation under independence
    for masked, update in zip(seen, updates, strict=True):
        assert abs(np.corrcoef(masked, update)[0, 1]) < bound
        assert stats.kstest(masked / 2**32, "uniform").pvalue > 1e-6
    assert stats.ks_2samp(seen[0], seen[1]).pvalue > 1e-6
    # control: the same statistics see the input when it is encoded but not masked
    for truth, update in zip(truths, updates, strict=True):
        assert np.corrcoef(truth.astype(np.float64), update)[0, 1] > 0.99
        assert stats.kstest(truth.view("<u4") / 2**32, "uniform").pvalue < 1e-6


# ---------------------------------------------------------------- SecAgg+ scaling


def test_node_cost_grows_with_the_neighbour_count_not_n():
    costs = {}
    for n, degree in ((12, 4), (40, 4), (40, 8)):
        nodes = Nodes(n)
        values, weights = inputs(nodes, dim=8)
        _, state = run(nodes, values, weights, degree=degree, dim=8)
        costs[n, degree] = {(c.counters.key_agreements, c.counters.prg_expansions,
                             c.counters.aead_operations) for c in state.clients.values()}
    # one c agreement and one s agreement per neighbour, one PRG per neighbour + the self mask,
    # one AEAD seal and one open per neighbour: independent of n
    assert costs[12, 4] == costs[40, 4] == {(8, 5, 8)}
    assert costs[40, 8] == {(16, 9, 16)}


def test_the_neighbour_graph():
    ids = [f"n{i}" for i in range(30)]
    graph = neighbour_graph(ids, 6, b"\x01" * 32)
    assert all(len(v) == 6 and p not in v for p, v in graph.items())
    assert all(p in graph[q] for p, v in graph.items() for q in v)  # symmetric
    assert graph == neighbour_graph(list(reversed(ids)), 6, b"\x01" * 32)
    assert graph != neighbour_graph(ids, 6, b"\x02" * 32)
    assert all(len(v) == 29 for v in neighbour_graph(ids, 29, bytes(32)).values())
    assert default_degree(10) == 9 and default_degree(100) == 20 and default_degree(2) == 1


def test_the_default_degree_grows_with_the_expected_dropout():
    degrees = [default_degree(100, d) for d in (0.0, 0.1, 0.2, 0.3)]
    assert degrees == sorted(degrees) and degrees[0] == 20 and degrees[-1] == 99
    # the promise, checked with scipy's binomial: at 20% dropout, 100 share groups of the chosen
    # degree all keep a majority with probability >= 1 - 1e-3, and two neighbours fewer do not
    def failure(k: int) -> float:
        return 100 * stats.binom.cdf((k + 1) // 2, k + 1, 0.8)  # P(survivors < t = (k+1)//2+1)

    assert failure(degrees[2]) <= 1e-3 < failure(degrees[2] - 2)


def test_simulate_round_reports_phases_and_checks_the_sum():
    report = simulate_round(8, 300, 0.25, "after_share_keys", degree=4)
    assert report.exact and report.survivors == 6
    assert report.max_abs_error <= report.survivors * report.step / 2
    assert set(report.node_seconds_mean) == set(report.bytes_up_per_node) == {
        "advertise", "share_keys", "masked_input", "unmask"}
    assert report.bytes_up_per_node["masked_input"] > 301 * 4  # the vector and its framing
    assert report.node_key_agreements_max == 8
