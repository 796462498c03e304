"""``confide bench private``: AERO softmax-only models vs the LayerNorm + GELU baseline, trained
on BBC News and run under CrypTen two-party computation through a real node daemon.

1. Train small decoders of equal width and depth (``node.aero``) on BBC News text (offline) and
   report held-out perplexity: the baseline (LayerNorm + GELU FFN), LN-free (GELU kept, scaled
   residual branches), softmax-only (no LayerNorm, no GELU: a linear FFN), and AERO
   (softmax-only + entropy regularization). Each is saved as safetensors into the node's
   ``private/`` folder (``node.private_inference.publish_model``).
2. Start a node daemon (``confide node serve``) and, for each measured variant and sequence
   length, run one private forward through the product path (``sdk.private_inference``:
   ``OpenPrivateInference`` over gRPC, the node's party and the data owner's party as separate
   processes over gloo on 127.0.0.1). Per forward: bytes and rounds (per party, as CrypTen
   counts them), seconds of the 2PC forward, the plaintext forward's seconds, and the largest
   absolute logit difference from plaintext.
3. Print the table and the baseline / AERO ratios next to the paper's (4.23x less
   communication, 1.94x lower latency), write ``private.json`` and ``private.png``, and compare
   with the previous JSON.

The vocabulary is compact by default (``--vocab 4096``: the most frequent MiniLM WordPiece
tokens of the training articles, the rest mapped to [UNK]); the one-hot input and the
embedding/output matrices travel masked once per forward each, so with MiniLM's full 30,522
tokens (``--vocab 0``) the vocabulary dominates the bytes of both variants alike.

The training recipe (``node.aero_training``) is the one ``confide aero train`` uses to train
one variant and publish it into a node's data folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import time
from pathlib import Path

from confide.bench.common import (
    cpu_model,
    hardware,
    legend_outside,
    previous_results,
    pyplot,
    save_figure,
)
from confide.node.aero_training import (
    DESCRIPTIONS,
    VARIANTS,
    add_model_arguments,
    bbc_split,
    train_variant,
)

PAPER = {"communication": 4.23, "latency": 1.94}
"""AERO (Jha & Reagen 2024): the softmax-only model vs the baseline, as the paper reports."""

MEASURE_DEFAULT = "baseline,ln-free,aero"  # softmax-only has aero's architecture: same cost


# --------------------------------------------------------------------------------------------
# Arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="variants to train (default: %(default)s)")
    p.add_argument("--measure", default=MEASURE_DEFAULT,
                   help="variants to run under 2PC (default: %(default)s)")
    p.add_argument("--seq-lens", default="32,64,128",
                   help="sequence lengths under 2PC (default: %(default)s)")
    p.add_argument("--provider", default="TFP", choices=["TFP", "TTP"],
                   help="Beaver-triple provider of the main rows (default: %(default)s)")
    p.add_argument("--ttp-seq-lens", default="32",
                   help="also run these lengths under TTP, for baseline and aero; '' = none "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per communication step (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 40 steps, lengths 32,64, 40 held-out articles, no TTP")
    p.add_argument("--workdir", default="runs/bench-private")
    p.add_argument("--out", default="bench/results",
                   help="where private.json and private.png go; the previous JSON there is "
                        "compared with this run (default: %(default)s)")
    add_model_arguments(p)


# --------------------------------------------------------------------------------------------
# The benchmark


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: use {', '.join(VARIANTS)}")
    return names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_node(address: str, timeout: float = 90.0) -> None:
    from confide.sdk.private_inference import PrivateInferenceError, list_private_models

    deadline = time.monotonic() + timeout
    while True:
        try:
            list_private_models(address, timeout=5)
            return
        except PrivateInferenceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _plain_forward(model, ids: list[int], repeats: int = 5):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, like each MPC party
    try:
        x = torch.tensor(ids)
        times = []
        with torch.no_grad():
            logits = model(x)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return logits, statistics.median(times)


def run_benchmark(args: argparse.Namespace) -> int:
    from confide.cluster.local import LocalCluster
    from confide.node.private_inference import publish_model
    from confide.sdk.private_inference import private_infer

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.quick:
        args.steps, args.seq_lens, args.eval_articles, args.ttp_seq_lens = 40, "32,64", 40, ""
    trained_names, measured = _names(args.variants), _names(args.measure)
    seq_lens, ttp_lens = _ints(args.seq_lens), _ints(args.ttp_seq_lens)
    if not seq_lens or max(seq_lens) > args.max_len:
        raise SystemExit(f"--seq-lens must be in [1, --max-len={args.max_len}]")
    missing = [m for m in measured if m not in trained_names]
    if missing:
        raise SystemExit(f"--measure {missing} must also be in --variants")
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    node_dir = workdir / "node0"
    bench_start = time.perf_counter()

    print(f"tokenizing BBC News (vocabulary {args.vocab or 'full MiniLM'}) ...", flush=True)
    train, test, spec, vocab_size, coverage = bbc_split(args.vocab, args.seed)
    models, trained = {}, []
    for name in trained_names:
        print(f"training {name} ({DESCRIPTIONS[name]}): {args.steps} steps ...", flush=True)
        model, record = train_variant(name, train, test, vocab_size, args)
        publish_model(model, node_dir, name, spec)
        models[name] = model
        trained.append(record)
        print(f"  held-out perplexity {record['perplexity']:.1f}, {record['train_s']:.0f}s",
              flush=True)

    flat = [t for s in test for t in s]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    cluster = LocalCluster(workdir / "cluster", [node_dir], mqtt=False, threads_per_node=1)
    rows = []
    runs = [(name, t, args.provider) for name in measured for t in seq_lens]
    if args.provider != "TTP":
        runs += [(name, t, "TTP") for t in ttp_lens for name in measured
                 if name in ("baseline", "aero")]
    try:
        cluster.start_coordinator()
        cluster.start_node(0, "--listen", address)
        _wait_for_node(address)
        for name, t, provider in runs:
            ids = flat[:t]
            print(f"2PC forward: {name}, T={t}, {provider} ...", flush=True)
            result = private_infer(address, name, ids, provider=provider,
                                   timeout_s=args.timeout)
            plain, plain_s = _plain_forward(models[name], ids)
            error = (result.logits - plain).abs().max().item()
            agree = (result.logits.argmax(-1) == plain.argmax(-1)).float().mean().item()
            rows.append({"variant": name, "seq_len": t, "provider": provider,
                         "bytes": result.stats.bytes, "rounds": result.stats.rounds,
                         "comm_s": result.stats.seconds, "mpc_s": result.forward_s,
                         "session_s": result.total_s, "plain_s": plain_s,
                         "max_abs_error": error, "max_abs_logit": plain.abs().max().item(),
                         "top1_agreement": agree})
    finally:
        cluster.stop()

    ratios = _ratios(rows, args.provider)
    info = hardware() | {"cpu": cpu_model(), "load_average_1min": load_before}
    _print_report(args, rows, trained, ratios, info, vocab_size, coverage, len(train),
                  len(test))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "private.json", rows, trained)
    report = {"benchmark": "private", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"}
              | {"vocab_size": vocab_size, "vocab_coverage": coverage,
                 "train_articles": len(train), "held_out_articles": len(test)},
              "paper": PAPER, "perplexity": trained, "results": rows, "ratios": ratios,
              "seconds_total": time.perf_counter() - bench_start}
    (out / "private.json").write_text(json.dumps(report, indent=2))
    _plot(rows, trained, ratios, out / "private.png", args.provider)
    print(f"wrote {out / 'private.json'} and {out / 'private.png'} "
          f"({time.perf_counter() - bench_start:.0f}s in all)")
    return 0


def _ratios(rows: list[dict], provider: str) -> list[dict]:
    by = {(r["variant"], r["seq_len"], r["provider"]): r for r in rows}
    out = []
    for (variant, t, prov), base in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if variant != "baseline":
            continue
        aero = by.get(("aero", t, prov))
        if aero is None:
            continue
        out.append({"seq_len": t, "provider": prov,
                    "communication": base["bytes"] / aero["bytes"],
                    "rounds": base["rounds"] / aero["rounds"],
                    "latency": base["mpc_s"] / aero["mpc_s"]})
    return out


def _print_report(args, rows, trained, ratios, info, vocab_size, coverage, n_train,
                  n_test) -> None:
    print()
    print(f"workload: decoders of width {args.d_model}, depth {args.layers}, {args.heads} heads, "
          f"FFN {args.d_ff}, {args.max_len} positions, vocabulary {vocab_size} "
          f"({coverage:.1%} of training tokens; the rest [UNK]); trained {args.steps} steps x "
          f"{args.batch_size} x {args.max_len} tokens of BBC News ({n_train} articles), "
          f"perplexity on {min(args.eval_articles or n_test, n_test)} held-out articles")
    print(f"{'variant':<14}{'architecture':<44}{'params':>10}{'train s':>9}{'loss':>7}"
          f"{'perplexity':>12}")
    for r in trained:
        print(f"{r['variant']:<14}{r['description']:<44}{r['parameters']:>10,}"
              f"{r['train_s']:>9.0f}{r['train_loss_last20']:>7.2f}{r['perplexity']:>12.1f}")
    print()
    print("2PC: one forward per row through a node daemon (OpenPrivateInference) and the data "
          "owner's client, separate processes over gloo on 127.0.0.1, 1 thread each; bytes and "
          "rounds per party (sent + received, as CrypTen counts); 'plain' = the same model in "
          "plaintext torch, 1 thread")
    print(f"{'variant':<14}{'T':>4}{'prov':>5}{'MB/party':>10}{'rounds':>8}{'2PC s':>8}"
          f"{'comm s':>8}{'plain ms':>10}{'max|err|':>10}{'max|logit|':>11}{'top1':>6}"
          f"{'session s':>11}")
    for r in rows:
        print(f"{r['variant']:<14}{r['seq_len']:>4}{r['provider']:>5}{r['bytes'] / 1e6:>10.1f}"
              f"{r['rounds']:>8}{r['mpc_s']:>8.2f}{r['comm_s']:>8.2f}{r['plain_s'] * 1e3:>10.2f}"
              f"{r['max_abs_error']:>10.2e}{r['max_abs_logit']:>11.2f}"
              f"{r['top1_agreement']:>6.2f}{r['session_s']:>11.1f}")
    print("2PC s: the data owner's party, private forward only; comm s: of which inside "
          "communication calls; session s: the whole client call (RPC, both parties' process "
          "start-up, forward); top1: positions whose argmax equals plaintext's")
    print()
    print(f"baseline / aero (same width and depth), as measured here; the paper reports "
          f"{PAPER['communication']}x less communication and {PAPER['latency']}x lower latency:")
    for r in ratios:
        print(f"  T={r['seq_len']:<4} {r['provider']}: communication {r['communication']:.2f}x "
              f"(paper {PAPER['communication']}x), rounds {r['rounds']:.2f}x, latency "
              f"{r['latency']:.2f}x (paper {PAPER['latency']}x)")
    load = info.get("load_average_1min")
    print(f"hardware: {info['cpu']}, {info['cpu_count']} CPU(s), {info['platform']}, torch "
          f"{info['torch']}, GPU not used; both parties on this machine (no network delay: "
          f"latency here is computation plus local transfers); 1-min load average before the "
          f"run {'?' if load is None else f'{load:.2f}'}")
    print("baseline: the LayerNorm + GELU decoder of the same width, depth and vocabulary, "
          "trained and measured in this run")


def _compare_with_previous(path: Path, rows: list[dict], trained: list[dict]) -> None:
    found = previous_results(path, lambda r: (r["variant"], r["seq_len"], r["provider"]))
    if found is None:
        return
    previous, old_rows = found
    old_ppl = {r["variant"]: r["perplexity"] for r in previous.get("perplexity", [])}
    print(f"  vs last run ({previous.get('time', '?')}):")
    for r in trained:
        if r["variant"] in old_ppl:
            print(f"    {r['variant']:<14} perplexity {old_ppl[r['variant']]:.1f} -> "
                  f"{r['perplexity']:.1f}")
    for r in rows:
        old = old_rows.get((r["variant"], r["seq_len"], r["provider"]))
        if old is None:
            continue
        print(f"    {r['variant']:<14} T={r['seq_len']:<4} {r['provider']}: "
              f"{old['bytes'] / 1e6:.1f} -> {r['bytes'] / 1e6:.1f} MB, "
              f"{old['mpc_s']:.2f} -> {r['mpc_s']:.2f} s, error "
              f"{old['max_abs_error']:.1e} -> {r['max_abs_error']:.1e}")


def _plot(rows, trained, ratios, path: Path, provider: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    main = [r for r in rows if r["provider"] == provider]
    for index, variant in enumerate(dict.fromkeys(r["variant"] for r in main)):
        mine = [r for r in main if r["variant"] == variant]
        ts = [r["seq_len"] for r in mine]
        color = f"C{index}"
        axes[0].plot(ts, [r["bytes"] / 1e6 for r in mine], marker="o", color=color,
                     label=variant)
        axes[1].plot(ts, [r["mpc_s"] for r in mine], marker="o", color=color,
                     label=f"{variant} (2PC)")
        axes[1].plot(ts, [r["plain_s"] for r in mine], marker="x", linestyle=":", color=color,
                     label=f"{variant} (plaintext)")
    for ax, title, unit in ((axes[0], "communication per forward", "MB per party"),
                            (axes[1], "latency per forward", "seconds (log)")):
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} ({provider})")
        legend_outside(ax)
    axes[1].set_yscale("log")
    names = [r["variant"] for r in trained]
    bars = axes[2].bar(names, [r["perplexity"] for r in trained], color="tab:gray")
    for bar, r in zip(bars, trained, strict=True):
        axes[2].annotate(f"{r['perplexity']:.0f}", (bar.get_x() + bar.get_width() / 2,
                                                    bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    axes[2].set_ylabel("held-out perplexity (BBC News)")
    text = "; ".join(f"T={r['seq_len']}: {r['communication']:.2f}x comm, "
                     f"{r['latency']:.2f}x latency" for r in ratios if r["provider"] == provider)
    axes[2].set_title("perplexity (lower is better)")
    fig.suptitle(f"AERO vs baseline under CrypTen 2PC - baseline/aero: {text} "
                 f"(paper: {PAPER['communication']}x, {PAPER['latency']}x)", fontsize=9)
    save_figure(fig, path)
