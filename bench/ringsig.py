"""``confide bench ringsig``: linkable ring signature (privacy.ringsig) sign and verify time
against ring size, next to plain Ed25519 (what an identified submission costs) as the baseline
of the same run. The message and scope are the exact ones of an anonymous update
(``protos.identity``); "verify" is decode + verify, as the coordinator does it.

Two more tables, same run:
- the group operations LSAG spends its time in, timed one by one: a variable-base scalar
  multiplication in ed25519 through PyNaCl (format v1's group: libsodium re-checks subgroup
  membership on every call) and in ristretto255 through rbcl (format v2), fixed-base
  multiplication and addition in both;
- an anonymous round as the coordinator checks it: ``--round-nodes`` ring keys, every node
  signs its update over its anonymity set of ``--anonymity-set`` keys
  (``protos.anonymity_sets``) and the coordinator's inbox verifies them all
  (``AnonymousInbox.verify_and_file``: set lookup, decode, verify, link tag), timed; next to it,
  the same round with every update signed over the whole ring, extrapolated from a few
  whole-ring verifications (it would take minutes to run).

Prints the tables, says whether each goal is met as measured (a ring of 100 signs and
verifies in under 20 ms; a round of 1,000 nodes with k = 32 verified in under 10 s), and
writes JSON and a PNG so a run can be compared with the last one."""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

GOAL_RING_SIZE = 100
GOAL_MS = 20.0
GOAL_ROUND_NODES = 1000
GOAL_ANONYMITY_SET = 32
GOAL_ROUND_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="2,4,8,16,32,64,100,128,256",
                   help="comma-separated ring sizes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed sign+verify runs per size; the median is reported "
                        "(default: %(default)s)")
    p.add_argument("--round-nodes", type=int, default=GOAL_ROUND_NODES,
                   help="nodes of the simulated anonymous round, 0 to skip it "
                        "(default: %(default)s)")
    p.add_argument("--anonymity-set", type=int, default=GOAL_ANONYMITY_SET, metavar="K",
                   help="the round's anonymity set size (default: %(default)s)")
    p.add_argument("--out", default="bench/results",
                   help="where ringsig.json and ringsig.png go; the previous JSON there is "
                        "compared with this run (default: %(default)s)")


def _parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--sizes must be positive integers, got {text!r}")
    return sizes


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def run_benchmark(args: argparse.Namespace) -> int:
    import importlib.metadata

    import nacl
    from nacl.signing import SigningKey

    from confide.privacy.ringsig import RingKeyPair, RingSignature, encoded_size, sign, verify
    from confide.protos.identity import anonymous_scope, anonymous_update_message, ring_epoch_id

    sizes = _parse_sizes(args.sizes)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    repeats = max(int(args.repeats), 1)
    keys = [RingKeyPair.generate() for _ in range(sizes[-1])]
    ring_all = [k.public for k in keys]
    scope = anonymous_scope("bench-job", 1)

    rows, all_valid = [], True
    for n in sizes:
        ring, signer = ring_all[:n], keys[n // 2]
        message = anonymous_update_message(os.urandom(32), "bench-job", 1, ring_epoch_id(ring),
                                           0, 240, os.urandom(32))
        verify(message, ring, sign(message, ring, signer, scope), scope)  # warm-up
        sign_s, verify_s, total_s, cpu_s, valid = [], [], [], [], True
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            data = sign(message, ring, signer, scope).encode()
            t1 = time.perf_counter()
            ok = verify(message, ring, RingSignature.decode(data, n), scope)
            t2, c2 = time.perf_counter(), time.process_time()
            valid &= ok
            sign_s.append(t1 - t0)
            verify_s.append(t2 - t1)
            total_s.append(t2 - t0)
            cpu_s.append(c2 - c0)
        rows.append({"ring_size": n, "sign_ms": _ms(sign_s), "verify_ms": _ms(verify_s),
                     "sign_verify_ms": _ms(total_s), "sign_verify_cpu_ms": _ms(cpu_s),
                     "signature_bytes": encoded_size(n),
                     "valid": valid})
        all_valid &= valid

    baseline = _ed25519_baseline(SigningKey, message, repeats)
    operations = _group_operations()
    round_result = (_anonymous_round(args.round_nodes, args.anonymity_set)
                    if args.round_nodes >= 2 else None)

    print()
    print(f"workload: privacy.ringsig (LSAG, ristretto255 via libsodium/rbcl), anonymous-update "
          f"message of {len(message)} bytes, signer in the middle of the ring, median of {repeats} "
          f"runs; verify = decode + verify")
    print(f"{'ring size':>9}{'sign ms':>10}{'verify ms':>11}{'sign+verify ms':>16}"
          f"{'signature bytes':>17}{'(CPU ms)':>10}")
    for row in rows:
        print(f"{row['ring_size']:>9}{row['sign_ms']:>10.2f}{row['verify_ms']:>11.2f}"
              f"{row['sign_verify_ms']:>16.2f}{row['signature_bytes']:>17}"
              f"{row['sign_verify_cpu_ms']:>10.2f}")
    print(f"{'ed25519':>9}{baseline['sign_ms']:>10.3f}{baseline['verify_ms']:>11.3f}"
          f"{baseline['sign_verify_ms']:>16.3f}{baseline['signature_bytes']:>17}{'-':>10}"
          f"   <- baseline: one identified Ed25519 signature (PyNaCl), same message")
    print("ms: wall clock (time.perf_counter); (CPU ms): this process's CPU time for sign+verify, "
          "close to what the wall clock reads on an idle core")
    print(f"\n{'group operation (libsodium)':<44}{'ed25519 (PyNaCl, v1)':>22}"
          f"{'ristretto255 (rbcl, v2)':>25}")
    for name, row in operations.items():
        print(f"{name:<44}{row['ed25519_us']:>19.1f} us{row['ristretto255_us']:>22.1f} us")
    if round_result is not None:
        r = round_result
        print(f"\nanonymous round: {r['nodes']} nodes, k = {r['anonymity_set']}: "
              f"{r['sets']} anonymity sets of {r['set_min']}..{r['set_max']} keys")
        print(f"  nodes signing (each its own set): {r['sign_s']:.2f} s in all, "
              f"{r['sign_ms_per_update']:.2f} ms each")
        print(f"  coordinator verifying all {r['nodes']} updates (AnonymousInbox): "
              f"{r['verify_s']:.2f} s wall, {r['verify_cpu_s']:.2f} s CPU, "
              f"{r['verify_ms_per_update']:.2f} ms each; {r['filed']} filed")
        print(f"  the same round over the whole ring (k = n): "
              f"{r['whole_ring_verify_ms_per_update']:.1f} ms per update -> "
              f"{r['whole_ring_round_s_extrapolated']:.0f} s for the round (extrapolated from "
              f"{r['whole_ring_samples']} whole-ring verifications)")
    info = hardware() | {"cpu": cpu_model(), "pynacl": nacl.__version__,
                         "rbcl": importlib.metadata.version("rbcl"),
                         "load_average_1min": load_before}
    print(f"hardware: {info['cpu']}, {info['cpu_count']} CPU(s), {info['platform']}, "
          f"PyNaCl {info['pynacl']} (single-threaded; GPU not used); 1-min load average "
          f"before the run {load_before if load_before is None else f'{load_before:.2f}'} "
          "(other processes on the machine slow every row)")
    goal = _goal(rows)
    print(goal["text"])
    round_goal = _round_goal(round_result)
    print(round_goal["text"])
    if not all_valid:
        print("ERROR: a signature produced by the benchmark did not verify")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "ringsig.json", rows)
    report = {"benchmark": "ringsig", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"}
              | {"message_bytes": len(message), "scope": scope.decode()},
              "goal": goal, "goals": [goal, round_goal], "baseline": baseline,
              "group_operations": operations, "anonymous_round": round_result,
              "results": rows}
    (out / "ringsig.json").write_text(json.dumps(report, indent=2))
    _plot(rows, baseline, round_result, out / "ringsig.png")
    print(f"wrote {out / 'ringsig.json'} and {out / 'ringsig.png'}")
    return 0 if all_valid else 1


def _ed25519_baseline(signing_key_cls: type, message: bytes, repeats: int) -> dict:
    key = signing_key_cls.generate()
    verify_key = key.verify_key
    verify_key.verify(key.sign(message))  # warm-up
    sign_s, verify_s = [], []
    for _ in range(max(repeats, 100)):  # microseconds each: more runs for a stable median
        t0 = time.perf_counter()
        signed = key.sign(message)
        t1 = time.perf_counter()
        verify_key.verify(signed)
        t2 = time.perf_counter()
        sign_s.append(t1 - t0)
        verify_s.append(t2 - t1)
    return {"scheme": "ed25519", "sign_ms": _ms(sign_s), "verify_ms": _ms(verify_s),
            "sign_verify_ms": _ms([a + b for a, b in zip(sign_s, verify_s, strict=True)]),
            "signature_bytes": 64}


def _per_call_us(call, number: int = 300) -> float:
    """Microseconds per call: the best of three timed batches (the least disturbed by other
    processes)."""
    import timeit

    return min(timeit.repeat(call, number=number, repeat=3)) / number * 1e6


def _group_operations() -> dict[str, dict]:
    """One call of each operation, in both groups, with the same scalars."""
    import rbcl
    from nacl import bindings as sodium

    x = rbcl.crypto_core_ristretto255_scalar_reduce(os.urandom(64))
    y = rbcl.crypto_core_ristretto255_scalar_reduce(os.urandom(64))
    ed_p, ed_q = (sodium.crypto_scalarmult_ed25519_base_noclamp(x),
                  sodium.crypto_scalarmult_ed25519_base_noclamp(y))
    ri_p, ri_q = (rbcl.crypto_scalarmult_ristretto255_base(x),
                  rbcl.crypto_scalarmult_ristretto255_base(y))
    pairs = {
        "variable-base multiplication": (
            lambda: sodium.crypto_scalarmult_ed25519_noclamp(x, ed_p),
            lambda: rbcl.crypto_scalarmult_ristretto255(x, ri_p)),
        "fixed-base multiplication": (
            lambda: sodium.crypto_scalarmult_ed25519_base_noclamp(x),
            lambda: rbcl.crypto_scalarmult_ristretto255_base(x)),
        "addition": (lambda: sodium.crypto_core_ed25519_add(ed_p, ed_q),
                     lambda: rbcl.crypto_core_ristretto255_add(ri_p, ri_q)),
        "point validation": (lambda: sodium.crypto_core_ed25519_is_valid_point(ed_p),
                             lambda: rbcl.crypto_core_ristretto255_is_valid_point(ri_p)),
    }
    return {name: {"ed25519_us": _per_call_us(ed), "ristretto255_us": _per_call_us(ri)}
            for name, (ed, ri) in pairs.items()}


def _anonymous_round(nodes: int, k: int) -> dict:
    """Every node of a round signs its update over its anonymity set; the coordinator's inbox
    verifies them all, as SubmitAnonymousUpdate does (without the network)."""
    import torch
    from tqdm import tqdm

    from confide.coordinator.anonymous import AnonymousInbox, ChallengeBook
    from confide.node.anonymous import check_ring, signed_update_header
    from confide.privacy.ringsig import RingKeyPair, RingSignature, sign, verify
    from confide.protos.anonymity_sets import anonymity_sets
    from confide.protos.identity import anonymous_scope, ring_epoch_id
    from confide.protos.stream import stream_digest
    from confide.v1 import coordinator_pb2 as pb

    job = "bench-round"
    members = [RingKeyPair.generate() for _ in range(nodes)]
    keys = sorted(m.public for m in members)
    ring = pb.Ring(job_id=job, round=1, epoch_id=ring_epoch_id(keys), public_keys=keys,
                   anonymity_set=k)
    sets = anonymity_sets(keys, k, job, 1)
    for indices in sets:
        ring.sets.add(members=indices)
    book, inbox = ChallengeBook(), AnonymousInbox()
    inbox.open_round(job, 1, nodes)
    payload = os.urandom(256)
    # the update as the wire carries it: a tensor map, its digest what the stream ended with
    update = {"u": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    digest = stream_digest(update)
    headers = []
    started = time.perf_counter()
    for member in tqdm(members, desc=f"{nodes} nodes sign (k = {k})", leave=False):
        signers = check_ring(ring, member, k, job, 1)
        headers.append(signed_update_header(member, job, 1, ring, signers, book.issue().nonce,
                                            digest, 10))
    sign_s = time.perf_counter() - started
    started, started_cpu = time.perf_counter(), time.process_time()
    for header in tqdm(headers, desc="coordinator verifies", leave=False):
        inbox.verify_and_file(header, update, keys, book, set_size=k,
                              payload_sha256=digest)
    verify_s, verify_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    # the old way: every update over the whole ring (a few, then extrapolated)
    samples, scope, whole = 3, anonymous_scope(job, 1), []
    for member in members[:samples]:
        signature = sign(payload, keys, member, scope).encode()
        t0 = time.perf_counter()
        verify(payload, keys, RingSignature.decode(signature, nodes), scope)
        whole.append(time.perf_counter() - t0)
    whole_ms = statistics.median(whole) * 1e3
    return {"nodes": nodes, "anonymity_set": k, "sets": len(sets),
            "set_min": min(map(len, sets)), "set_max": max(map(len, sets)),
            "sign_s": sign_s, "sign_ms_per_update": sign_s / nodes * 1e3,
            "verify_s": verify_s, "verify_cpu_s": verify_cpu_s,
            "verify_ms_per_update": verify_s / nodes * 1e3, "filed": inbox.count(job, 1),
            "whole_ring_verify_ms_per_update": whole_ms,
            "whole_ring_round_s_extrapolated": whole_ms * nodes / 1e3,
            "whole_ring_samples": samples}


def _round_goal(result: dict | None) -> dict:
    goal = (f"anonymous round of {GOAL_ROUND_NODES} nodes, k = {GOAL_ANONYMITY_SET}: verified "
            f"by the coordinator in under {GOAL_ROUND_S:.0f} s")
    if (result is None or result["nodes"] < GOAL_ROUND_NODES
            or result["anonymity_set"] != GOAL_ANONYMITY_SET):
        return goal_record(goal, GOAL_ROUND_S, None, None,
                           f"goal: {goal}: not measured (run with --round-nodes "
                           f"{GOAL_ROUND_NODES} --anonymity-set {GOAL_ANONYMITY_SET})")
    ok = result["verify_s"] < GOAL_ROUND_S and result["filed"] == result["nodes"]
    return goal_record(goal, GOAL_ROUND_S, result["verify_s"], ok,
                       f"goal: {goal}: {'met' if ok else 'NOT met'} ({result['verify_s']:.2f} s "
                       f"wall, {result['verify_cpu_s']:.2f} s CPU, {result['filed']} of "
                       f"{result['nodes']} filed; in process: `confide bench soak --anonymous` "
                       "measures it behind the real coordinator)",
                       cpu_s=result["verify_cpu_s"], nodes=result["nodes"])


def _goal(rows: list[dict]) -> dict:
    goal = f"ring of {GOAL_RING_SIZE}, sign+verify under {GOAL_MS:.0f} ms"
    row = next((r for r in rows if r["ring_size"] == GOAL_RING_SIZE), None)
    if row is None:
        return goal_record(goal, GOAL_MS, None, None, f"goal: {goal}: not measured (add "
                           f"{GOAL_RING_SIZE} to --sizes)", ring_size=GOAL_RING_SIZE)
    met = row["sign_verify_ms"] < GOAL_MS
    return goal_record(goal, GOAL_MS, row["sign_verify_ms"], met,
                       f"goal: {goal}: {'met' if met else 'NOT met'} "
                       f"({row['sign_verify_ms']:.1f} ms measured, "
                       f"{row['sign_verify_cpu_ms']:.1f} ms of CPU)",
                       ring_size=GOAL_RING_SIZE, cpu_ms=row["sign_verify_cpu_ms"])


def _compare_with_previous(path: Path, rows: list[dict]) -> None:
    """Print how this run differs from the last one written to ``path``."""
    found = previous_results(path, lambda r: r["ring_size"])
    if found is None:
        return
    previous, old = found
    print(f"  vs last run ({previous.get('time', '?')}, "
          f"{previous.get('hardware', {}).get('cpu', '?')}):")
    for row in rows:
        before = old.get(row["ring_size"])
        if before is None:
            continue
        change = (row["sign_verify_ms"] / before["sign_verify_ms"] - 1) * 100
        print(f"    ring {row['ring_size']:>4}: sign+verify {before['sign_verify_ms']:.2f} -> "
              f"{row['sign_verify_ms']:.2f} ms ({change:+.0f}%)")


def _plot(rows: list[dict], baseline: dict, round_result: dict | None, path: Path) -> None:
    plt = pyplot()

    sizes = [r["ring_size"] for r in rows]
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4))
    if round_result is not None:
        r = round_result
        labels = [f"sets of k = {r['anonymity_set']}\n(measured)",
                  f"whole ring, k = {r['nodes']}\n(extrapolated)"]
        values = [r["verify_s"], r["whole_ring_round_s_extrapolated"]]
        right.bar(labels, values, color=["tab:green", "tab:grey"])
        right.axhline(GOAL_ROUND_S, color="red", linestyle=":",
                      label=f"goal: under {GOAL_ROUND_S:.0f} s")
        right.set_yscale("log")
        right.set_ylabel("coordinator time to verify the round (s)")
        right.set_title(f"anonymous round of {r['nodes']} nodes")
        legend_outside(right)
    for key, label in (("sign_ms", "sign"), ("verify_ms", "decode + verify"),
                       ("sign_verify_ms", "sign + verify")):
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.plot(sizes, [r["sign_verify_cpu_ms"] for r in rows], linestyle="--", color="green",
            label="sign + verify, CPU time")
    ax.axhline(baseline["sign_verify_ms"], color="grey", linestyle=":",
               label=f"ed25519 sign + verify ({baseline['sign_verify_ms']:.3f} ms)")
    ax.plot([GOAL_RING_SIZE], [GOAL_MS], marker="*", markersize=14, color="red", linestyle="",
            label=f"goal: ring {GOAL_RING_SIZE} under {GOAL_MS:.0f} ms")
    ax.set_xlabel("ring size (keys)")
    ax.set_ylabel("time (ms, median)")
    ax.set_title("Linkable ring signature (LSAG over ristretto255, libsodium)")
    legend_outside(ax)
    save_figure(fig, path)
