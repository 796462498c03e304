"""``confide bench ringsig``: linkable ring signature (privacy.ringsig) sign and verify time
against ring size, next to plain Ed25519 (what an identified submission costs) as the baseline
of the same run. The message and scope are the exact ones of an anonymous update
(``protos.identity``); "verify" is decode + verify, as the coordinator does it. Prints a table,
says whether the goal (a ring of 100 signs and verifies in under 20 ms) is met as measured, and
writes JSON and a PNG (time vs ring size) so a run can be compared with the last one."""

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="2,4,8,16,32,64,100,128,256",
                   help="comma-separated ring sizes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed sign+verify runs per size; the median is reported "
                        "(default: %(default)s)")
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
                                           240, os.urandom(32))
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

    print()
    print(f"workload: privacy.ringsig (LSAG, ed25519 via libsodium), anonymous-update message "
          f"of {len(message)} bytes, signer in the middle of the ring, median of {repeats} "
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
    info = hardware() | {"cpu": cpu_model(), "pynacl": nacl.__version__,
                         "load_average_1min": load_before}
    print(f"hardware: {info['cpu']}, {info['cpu_count']} CPU(s), {info['platform']}, "
          f"PyNaCl {info['pynacl']} (single-threaded; GPU not used); 1-min load average "
          f"before the run {load_before if load_before is None else f'{load_before:.2f}'} "
          "(other processes on the machine slow every row)")
    goal = _goal(rows)
    print(goal["text"])
    if not all_valid:
        print("ERROR: a signature produced by the benchmark did not verify")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "ringsig.json", rows)
    report = {"benchmark": "ringsig", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"}
              | {"message_bytes": len(message), "scope": scope.decode()},
              "goal": goal, "baseline": baseline, "results": rows}
    (out / "ringsig.json").write_text(json.dumps(report, indent=2))
    _plot(rows, baseline, out / "ringsig.png")
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


def _plot(rows: list[dict], baseline: dict, path: Path) -> None:
    plt = pyplot()

    sizes = [r["ring_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    ax.set_title("Linkable ring signature (LSAG over ed25519, libsodium)")
    legend_outside(ax)
    save_figure(fig, path)
