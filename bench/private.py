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

Three more parts (``--parts``; ``daemon`` is the above):

* ``cost``: per-operation accounting (``privacy.op_ledger``) of one 2PC forward of GPT-2-small
  shaped decoders (12 layers, width 768, 12 heads, FFN 3072, T=128, GPT-2's 50,257-token
  vocabulary; random weights: cost does not depend on them) for the baseline (LN + GELU),
  LN-free, softmax-only and AERO (softmax-only, the max-free softmax, FFN only in the first
  half of the blocks), plus AERO with the data owner embedding its tokens locally (a public
  embedding table). By default each configuration runs one direct 12-block forward;
  ``--cost-layers N`` < 12 measures N blocks and extrapolates the per-block costs linearly to
  12 (every block of a kind has the same shapes, so bytes and rounds extrapolate exactly;
  seconds approximately); the JSON says which. ``--cost-configs`` runs some configurations
  only (one at a time: the others' rows of the same kind come from the previous JSON, saying
  from which run); direct figures take ``cost`` and the goals, the latest extrapolated ones
  stay beside them as ``cost_extrapolated``. Each row records the 1-minute load average
  before and after its run: seconds move with the load, bytes and rounds do not.
* ``accuracy``: the trained AERO model with its measured score bound: the max-free softmax's
  error against the exact softmax over every held-out position (fixed point emulated in
  plaintext), and ``--accuracy-windows`` held-out windows through real 2PC: top-1 agreement
  of the logits with plaintext, over all their positions.
* the goals of issue 19 (``goal_record``): AERO vs the baseline at the GPT-2-small shape,
  >= 4x fewer bytes and >= 2x lower latency; top-1 agreement >= 99%.
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
    goal_record,
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
PARTS = ("daemon", "accuracy", "cost")
GPT2_SMALL = {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_ff": 3072, "seq_len": 128,
              "vocab_size": 50257}
GOALS = {"bytes": 4.0, "latency": 2.0, "top1": 0.99}
COST_CONFIGS = ("baseline", "ln-free", "softmax-only", "aero", "aero-local-emb")


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
    p.add_argument("--parts", default=",".join(PARTS),
                   help="what to run: daemon (trained models through a node daemon), accuracy "
                        "(the max-free softmax's error, 2PC top-1 agreement), cost (GPT-2-small "
                        "shapes, per-operation accounting) (default: %(default)s)")
    p.add_argument("--cost-layers", type=int, default=12,
                   help="blocks measured per cost configuration; fewer than 12 are "
                        "extrapolated linearly to 12 (default: %(default)s)")
    p.add_argument("--cost-configs", default=",".join(COST_CONFIGS),
                   help="cost configurations to run, e.g. one at a time for 12 blocks: rows of "
                        "the previous JSON with the same shape and blocks measured are kept "
                        "for the others (default: %(default)s)")
    p.add_argument("--cost-vocab", type=int, default=GPT2_SMALL["vocab_size"],
                   help="vocabulary of the cost configurations (default: GPT-2's %(default)s)")
    p.add_argument("--cost-bound", type=float, default=0.0,
                   help="softmax bound of the AERO cost configuration; 0 = the trained AERO "
                        "model's (else 8) (default: %(default)s)")
    p.add_argument("--accuracy-model", default="",
                   help="a trained AERO safetensors file (confide aero train --out, same "
                        "--vocab) for the accuracy part instead of training one here")
    p.add_argument("--accuracy-windows", type=int, default=8,
                   help="held-out windows of max_len tokens run under 2PC (default: "
                        "%(default)s)")
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


def _names(text: str, allowed=VARIANTS, what: str = "variant") -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}: use {', '.join(allowed)}")
    return names


def cost_config_names(text: str) -> list[str]:
    """``--cost-configs``: some of COST_CONFIGS, at least one."""
    names = _names(text, COST_CONFIGS, "cost configuration")
    if not names:
        raise SystemExit(f"--cost-configs must name some of {', '.join(COST_CONFIGS)}")
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
    import torch

    from confide.node.private_inference import publish_model

    torch.set_num_threads(1)  # on shared, loaded cores one thread is several times faster
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.quick:
        args.steps, args.seq_lens, args.eval_articles, args.ttp_seq_lens = 40, "32,64", 40, ""
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts must name some of {', '.join(PARTS)}")
    trained_names, measured = _names(args.variants), _names(args.measure)
    seq_lens, ttp_lens = _ints(args.seq_lens), _ints(args.ttp_seq_lens)
    if not seq_lens or max(seq_lens) > args.max_len:
        raise SystemExit(f"--seq-lens must be in [1, --max-len={args.max_len}]")
    missing = [m for m in measured if m not in trained_names]
    if "daemon" in parts and missing:
        raise SystemExit(f"--measure {missing} must also be in --variants")
    if "accuracy" in parts and "aero" not in trained_names:
        raise SystemExit("--parts accuracy needs the aero variant in --variants")
    if not 2 <= args.cost_layers <= GPT2_SMALL["n_layers"]:
        raise SystemExit(f"--cost-layers must be in [2, {GPT2_SMALL['n_layers']}] (AERO's "
                         "blocks with and without an FFN are both measured)")
    cost_config_names(args.cost_configs)  # a typo fails now, not after the other parts
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    node_dir = workdir / "node0"
    bench_start = time.perf_counter()

    models, trained, test, spec = {}, [], [], None
    vocab_size = coverage = n_train = None
    if {"daemon", "accuracy"} & set(parts):
        print(f"tokenizing BBC News (vocabulary {args.vocab or 'full MiniLM'}) ...", flush=True)
        train, test, spec, vocab_size, coverage = bbc_split(args.vocab, args.seed)
        n_train = len(train)
        for name in trained_names:
            if name == "aero" and args.accuracy_model and "daemon" not in parts:
                model, record = _load_trained(args.accuracy_model, test, args)
            else:
                print(f"training {name} ({DESCRIPTIONS[name]}): {args.steps} steps ...",
                      flush=True)
                model, record = train_variant(name, train, test, vocab_size, args)
            bound = getattr(model, "softmax_bound", None)
            # the daemon rows compare architectures with CrypTen's softmax: no bound there
            publish_model(model, node_dir, name, spec)
            if bound is not None:
                publish_model(model, node_dir, f"{name}-maxfree", spec, softmax_bound=bound,
                              calibration=test)
            models[name] = model
            trained.append(record)
            print(f"  held-out perplexity {record['perplexity']:.1f}, {record['train_s']:.0f}s"
                  + (f", softmax bound {bound.bound:g} (max |score| {bound.max_abs_score:.3f})"
                     if bound is not None else ""), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, ratios = [], []
    if "daemon" in parts:
        rows = _daemon_part(args, models, test, node_dir, measured, seq_lens, ttp_lens, workdir)
        ratios = _ratios(rows, args.provider)
    accuracy = _accuracy_part(args, models["aero"], test, node_dir, workdir) \
        if "accuracy" in parts else None
    bound = args.cost_bound or (accuracy["softmax_bound"] if accuracy else 8.0)
    cost = _cost_part(args, bound, workdir) if "cost" in parts else None
    previous = _read_previous(out / "private.json")  # read now: parts may run side by side
    if accuracy is None and previous and previous.get("accuracy"):
        accuracy = previous["accuracy"] | {"from_run": previous["accuracy"].get("from_run")
                                           or previous.get("time")}
    # rows not run here come from the previous JSON, saying when; direct 12-block figures
    # take the "cost" slot, the extrapolated ones are kept beside them for comparison
    cost, cost_extrapolated = combine_costs(cost, previous)
    goals = _goals(cost, accuracy, cost_extrapolated)

    info = hardware() | {"cpu": cpu_model(), "load_average_1min": load_before}
    if rows:
        _print_report(args, rows, trained, ratios, info, vocab_size, coverage, n_train,
                      len(test))
        _compare_with_previous(out / "private.json", rows, trained)
    if accuracy:
        _print_accuracy(accuracy)
    if cost:
        _print_cost(cost, cost_extrapolated)
    for g in goals:
        measured_text = "-" if g["measured"] is None else f"{g['measured']:.3f}"
        verdict = {True: "MET", False: "missed", None: "not measured"}[g["met"]]
        print(f"goal {g['goal']}: target {g['target']}, measured {measured_text} -> {verdict}: "
              f"{g['text']}")
    report = {"benchmark": "private", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"}
              | {"vocab_size": vocab_size, "vocab_coverage": coverage,
                 "train_articles": n_train, "held_out_articles": len(test)},
              "paper": PAPER, "perplexity": trained, "results": rows, "ratios": ratios,
              "accuracy": accuracy, "cost": cost, "cost_extrapolated": cost_extrapolated,
              "goals": goals,
              "seconds_total": time.perf_counter() - bench_start}
    if "daemon" not in parts and previous:
        # this run did not repeat the daemon rows: keep the last run's, saying so
        report |= {"perplexity": trained or previous.get("perplexity", []),
                   "results": previous.get("results", []),
                   "ratios": previous.get("ratios", []),
                   "results_from": previous.get("results_from") or previous.get("time")}
    (out / "private.json").write_text(json.dumps(report, indent=2))
    _plot_costs(cost, accuracy, out / "private.png", cost_extrapolated)
    if rows:
        _plot(rows, trained, ratios, out / "private_daemon.png", args.provider)
    print(f"wrote {out / 'private.json'} and {out / 'private.png'} "
          f"({time.perf_counter() - bench_start:.0f}s in all)")
    return 0


def _load_trained(path: str, test, args) -> tuple:
    """A model ``confide aero train --out`` wrote, with its bound measured as training does."""
    from confide.node.aero import load_aero, perplexity
    from confide.node.aero_bound import measure_score_bound

    model = load_aero(path)
    held_out = test[: args.eval_articles or None]
    model.softmax_bound = measure_score_bound(model, held_out)
    record = {"variant": "aero", "description": DESCRIPTIONS["aero"], "from_file": path,
              "parameters": sum(p.numel() for p in model.parameters()),
              "steps": None, "train_s": 0.0, "train_loss_last20": None,
              "perplexity": perplexity(model, held_out), "held_out_articles": len(held_out),
              "softmax_bound": model.softmax_bound.bound,
              "max_abs_score": model.softmax_bound.max_abs_score}
    return model, record


def _read_previous(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _daemon_part(args, models, test, node_dir, measured, seq_lens, ttp_lens,
                 workdir) -> list[dict]:
    from confide.cluster.local import LocalCluster
    from confide.sdk.private_inference import private_infer

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
    return rows


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


# --------------------------------------------------------------------------------------------
# Accuracy of the max-free softmax on the trained AERO model


def _windows(test, length: int) -> list[list[int]]:
    flat = [t for s in test for t in s]
    return [flat[i:i + length] for i in range(0, len(flat) - length + 1, length)]


def _accuracy_part(args, model, test, node_dir: Path, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from confide.node.aero_bound import attention_scores
    from confide.privacy import aero_2pc
    from confide.privacy.local_parties import run_local

    bound = model.softmax_bound
    t = args.max_len
    windows = _windows(test, t)
    config = model.config.to_dict() | {"softmax_bound": bound.bound}
    max_free = aero_2pc.MaxFreeSoftmax.tune(bound.bound, t)
    state = model.state_dict()
    mask = torch.tril(torch.ones(t, t, dtype=torch.float64))
    prob_err = 0.0
    rows_same = rows_all = logit_same = positions = 0
    print(f"accuracy: the max-free softmax (bound {bound.bound:g}) over {len(windows)} held-out "
          f"windows of {t} tokens, fixed point emulated ...", flush=True)
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor(window)
            for scores in attention_scores(model, ids):
                s = scores[0].double()
                exact = s.masked_fill(mask == 0, float("-inf")).softmax(-1)
                approx = max_free.softmax(s, mask, q=aero_2pc.fixed_point_round)
                prob_err = max(prob_err, (approx - exact).abs().max().item())
                rows_same += int((approx.argmax(-1) == exact.argmax(-1)).sum())
                rows_all += exact.shape[0] * exact.shape[1]
            emulated = aero_2pc.reference_forward(state, config, ids, emulate_max_free=True)
            logit_same += int((emulated.argmax(-1) == model(ids).argmax(-1)).sum())
            positions += t
    chosen = windows[:: max(1, len(windows) // max(1, args.accuracy_windows))]
    chosen = chosen[: args.accuracy_windows]
    path = str(node_dir / "private" / "aero-maxfree.safetensors")
    jobs = [{"name": "aero-maxfree", "config": config, "seq_len": t,
             "weights": {"file": path}, "windows": chosen},
            {"name": "aero-maxfree-local-emb", "config": config, "seq_len": t,
             "weights": {"file": path}, "windows": chosen[:1],
             "public_embedding": {"file": path}},
            {"name": "aero-crypten-softmax", "config": model.config.to_dict(), "seq_len": t,
             "weights": {"file": path}, "windows": chosen[:1]}]
    print(f"accuracy: {len(chosen)} window(s) of {t} tokens under 2PC (local parties) ...",
          flush=True)
    start = time.perf_counter()
    data_owner, _ = run_local(jobs, workdir / "accuracy", timeout_s=args.timeout)
    wall = time.perf_counter() - start
    same = total = 0
    err = 0.0
    for k, window in enumerate(chosen):
        logits = load_file(str(workdir / "accuracy" / f"aero-maxfree.{k}.safetensors"))["logits"]
        with torch.no_grad():
            plain = model(torch.tensor(window))
        same += int((logits.argmax(-1) == plain.argmax(-1)).sum())
        total += t
        err = max(err, (logits - plain).abs().max().item())

    def first(name):
        f = data_owner[name]["forwards"][0]
        return {"bytes": f["stats"]["bytes"], "rounds": f["stats"]["rounds"],
                "seconds": f["seconds"], "by_op": f["ledger"]["by_op"]}

    return {"softmax_bound": bound.bound, "max_abs_score": bound.max_abs_score,
            "bound_tokens": bound.tokens, "bound_margin": bound.margin,
            "max_free": {"exp_iters": max_free.exp_iters, "nr_iters": max_free.nr_iters,
                         "nr_init": max_free.nr_init},
            "emulated": {"windows": len(windows), "positions": positions,
                         "attention_rows": rows_all,
                         "softmax_max_abs_error": prob_err,
                         "attention_row_argmax_agreement": rows_same / max(1, rows_all),
                         "logits_top1_agreement": logit_same / max(1, positions)},
            "mpc": {"windows": len(chosen), "positions": total, "top1_agreement": same / total,
                    "max_abs_logit_error": err, "wall_s": wall,
                    "max_free": first("aero-maxfree"),
                    "max_free_local_embedding": first("aero-maxfree-local-emb"),
                    "crypten_softmax": first("aero-crypten-softmax")}}


def _print_accuracy(acc: dict) -> None:
    e, m = acc["emulated"], acc["mpc"]
    print()
    print(f"max-free softmax on the trained AERO model: bound {acc['softmax_bound']:g} "
          f"(= {acc['bound_margin']:g} x max |score| {acc['max_abs_score']:.3f} on "
          f"{acc['bound_tokens']} held-out tokens); exp {acc['max_free']['exp_iters']} "
          f"squarings, reciprocal {acc['max_free']['nr_iters']} Newton steps")
    print(f"  emulated fixed point, all {e['positions']} held-out positions: softmax max |err| "
          f"{e['softmax_max_abs_error']:.2e}, attention-row argmax agreement "
          f"{e['attention_row_argmax_agreement']:.4f}, logits top-1 agreement "
          f"{e['logits_top1_agreement']:.4f}")
    print(f"  2PC, {m['windows']} window(s), {m['positions']} positions: top-1 agreement "
          f"{m['top1_agreement']:.4f}, max |logit err| {m['max_abs_logit_error']:.3f}")
    for name, label in (("crypten_softmax", "CrypTen softmax (row max)"),
                        ("max_free", "max-free softmax"),
                        ("max_free_local_embedding", "max-free + local embedding")):
        r = m[name]
        print(f"  {label:<28} {r['bytes'] / 1e6:8.1f} MB/party {r['rounds']:6d} rounds "
              f"{r['seconds']:7.2f} s")


# --------------------------------------------------------------------------------------------
# Cost at the GPT-2-small shape: per-operation accounting, extrapolated by block


def cost_configs(vocab: int, bound: float, layers: int) -> list[dict]:
    """The cost configurations: GPT-2-small shaped, ``layers`` blocks (AERO keeps the FFN in
    the first half of them)."""
    base = {"vocab_size": vocab, "max_len": GPT2_SMALL["seq_len"],
            "d_model": GPT2_SMALL["d_model"], "n_heads": GPT2_SMALL["n_heads"],
            "n_layers": layers, "d_ff": GPT2_SMALL["d_ff"], "tie_embeddings": True,
            "ln_eps": 1e-5, "ffn": True}
    half = (layers + 1) // 2
    aero = base | {"layernorm": False, "activation": "none", "normalization": "scaled",
                   "softmax_bound": bound, "ffn_layers": half}
    return [
        {"name": "baseline", "text": "LayerNorm + GELU (GPT-2-like)",
         "config": base | {"layernorm": True, "activation": "gelu", "normalization": "none"}},
        {"name": "ln-free", "text": "no LayerNorm, GELU",
         "config": base | {"layernorm": False, "activation": "gelu", "normalization": "scaled"}},
        {"name": "softmax-only", "text": "no LayerNorm, no GELU, CrypTen softmax",
         "config": base | {"layernorm": False, "activation": "none",
                           "normalization": "scaled"}},
        {"name": "aero", "text": "softmax-only, max-free softmax, FFN in the first half",
         "config": aero},
        {"name": "aero-local-emb", "text": "aero, tokens embedded by the data owner",
         "config": aero, "public_embedding": True},
    ]


def extrapolate(by_layer: dict[tuple[str, int], dict], full_layers: int,
                full_ffn_layers: int, measured_ffn_layers: int) -> dict[str, dict]:
    """Per-op totals of a ``full_layers`` model from a measured one: steps outside the blocks
    once, each block's steps as the mean of the measured blocks of its kind (with or without
    FFN) times the number of such blocks in the full model."""
    out: dict[str, dict] = {}
    layers = sorted({layer for _, layer in by_layer if layer >= 0})
    kinds = {True: [i for i in layers if i < measured_ffn_layers],
             False: [i for i in layers if i >= measured_ffn_layers]}
    counts = {True: full_ffn_layers, False: full_layers - full_ffn_layers}
    if any(counts[kind] and not kinds[kind] for kind in (True, False)):
        raise ValueError("the measured model lacks a block kind the full model has")
    for (op, layer), entry in by_layer.items():
        if layer < 0:
            scale = 1.0
        else:
            kind = layer < measured_ffn_layers
            if not kinds[kind]:
                continue
            scale = counts[kind] / len(kinds[kind])
        acc = out.setdefault(op, {"bytes": 0.0, "rounds": 0.0, "seconds": 0.0})
        for key in acc:
            acc[key] += entry[key] * scale
    return out


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cost_part(args, bound: float, workdir: Path) -> dict:
    from confide.privacy.local_parties import run_local

    full, t = GPT2_SMALL["n_layers"], GPT2_SMALL["seq_len"]
    names = cost_config_names(args.cost_configs)
    configs = [c for c in cost_configs(args.cost_vocab, bound, args.cost_layers)
               if c["name"] in names]
    ids = [[(7 * i + 3) % args.cost_vocab for i in range(t)]]
    jobs = [{"name": c["name"], "config": c["config"], "seq_len": t,
             "weights": {"random": args.seed}, "windows": ids}
            | ({"public_embedding": {"random": args.seed}} if c.get("public_embedding") else {})
            for c in configs]
    how = ("direct forwards" if args.cost_layers == full
           else f"{args.cost_layers} of {full} blocks measured")
    print(f"cost: {', '.join(c['name'] for c in configs)}, GPT-2-small shape (width "
          f"{GPT2_SMALL['d_model']}, {GPT2_SMALL['n_heads']} heads, T={t}, vocabulary "
          f"{args.cost_vocab}), {how}, random weights ...", flush=True)
    start, load_before = time.perf_counter(), _load()
    data_owner, model_owner = run_local(jobs, workdir / "cost", timeout_s=max(args.timeout, 600),
                                        limit_s=4 * 3600)
    load = {"before": load_before, "after": _load()}
    rows = []
    for c in configs:
        f = data_owner[c["name"]]["forwards"][0]
        by_layer = {(e["op"], e["layer"]): e for e in f["ledger"]["entries"]}
        cfg = c["config"]
        measured_ffn = cfg.get("ffn_layers", cfg["n_layers"])
        full_ffn = full if measured_ffn == cfg["n_layers"] else full // 2
        by_op = extrapolate(by_layer, full, full_ffn, measured_ffn)
        rows.append({"config": c["name"], "description": c["text"],
                     "layers": full, "ffn_layers": full_ffn,
                     "layers_measured": cfg["n_layers"],
                     "extrapolated": cfg["n_layers"] != full,
                     "bytes": sum(v["bytes"] for v in by_op.values()),
                     "rounds": sum(v["rounds"] for v in by_op.values()),
                     "seconds": sum(v["seconds"] for v in by_op.values()),
                     "by_op": by_op,
                     "measured": {"bytes": f["stats"]["bytes"], "rounds": f["stats"]["rounds"],
                                  "seconds": f["seconds"],
                                  "unaccounted": f["ledger"]["unaccounted"],
                                  "model_owner_bytes": model_owner[c["name"]]["forwards"][0]
                                  ["stats"]["bytes"]},
                     "softmax_bound": cfg.get("softmax_bound"),
                     "load_average_1min": f.get("load_average_1min", load)})
    return {"shape": GPT2_SMALL | {"vocab_size": args.cost_vocab}, "rows": rows,
            "layers_measured": args.cost_layers,
            "extrapolation": None if args.cost_layers == full else (
                f"{args.cost_layers} block(s) measured per configuration, per-block costs "
                f"extrapolated linearly to {full} (bytes and rounds exactly, every block of a "
                "kind having the same shapes; seconds approximately)"),
            "wall_s": time.perf_counter() - start}


def combine_costs(new: dict | None, previous: dict | None) -> tuple[dict | None, dict | None]:
    """The report's (cost, cost_extrapolated): this run's cost rows merged with the previous
    JSON's rows of the same shape and blocks measured (configurations run one at a time; a
    carried row says ``from_run``). Direct forwards (all blocks measured) take ``cost`` and the
    goals; the latest extrapolated figures stay beside them for comparison, and are ``cost``
    only while no direct run exists."""
    previous = previous or {}
    slots: dict[bool, dict | None] = {True: None, False: None}  # extrapolated?
    for old in (previous.get("cost"), previous.get("cost_extrapolated")):
        if old and slots[bool(old["extrapolation"])] is None:
            slots[bool(old["extrapolation"])] = _carried(old, previous.get("time"))
    if new is not None:
        kind = bool(new["extrapolation"])
        old = slots[kind]
        same = old is not None and old["shape"] == new["shape"] \
            and old["layers_measured"] == new["layers_measured"]
        if same:
            fresh = {r["config"] for r in new["rows"]}
            rows = new["rows"] + [r for r in old["rows"] if r["config"] not in fresh]
            new = new | {"rows": sorted(rows, key=lambda r: COST_CONFIGS.index(r["config"]))}
        slots[kind] = new
    if slots[False] is not None:
        return slots[False], slots[True]
    return slots[True], None


def _carried(cost: dict, run: str | None) -> dict:
    """A previous run's cost, each row stamped with the run it was measured in."""
    rows = [r | {"from_run": r.get("from_run") or cost.get("from_run") or run}
            for r in cost["rows"]]
    return {k: v for k, v in cost.items() if k != "from_run"} | {"rows": rows}


def _print_cost(cost: dict, extrapolated: dict | None = None) -> None:
    from confide.privacy.op_ledger import OPS

    rows = cost["rows"]
    shape = cost["shape"]
    print()
    print(f"cost of one 2PC forward, GPT-2-small shape ({shape['n_layers']} blocks, width "
          f"{shape['d_model']}, {shape['n_heads']} heads, FFN {shape['d_ff']}, T="
          f"{shape['seq_len']}, vocabulary {shape['vocab_size']}), random weights, per party "
          "(MB sent + received / rounds)")
    print(f"  NOTE: {cost['extrapolation']}" if cost["extrapolation"] else
          f"  direct: every configuration ran all {shape['n_layers']} blocks in one forward")
    for r in rows:
        if r.get("from_run"):
            print(f"  {r['config']}: from the run of {r['from_run']}")
    print(f"{'operation':<20}" + "".join(f"{r['config']:>22}" for r in rows))
    for op in OPS:
        cells = []
        for r in rows:
            v = r["by_op"].get(op)
            cells.append(f"{v['bytes'] / 1e6:>13.1f}/{v['rounds']:>8.0f}" if v else f"{'-':>22}")
        print(f"{op:<20}" + "".join(cells))
    print(f"{'total':<20}" + "".join(f"{r['bytes'] / 1e6:>13.1f}/{r['rounds']:>8.0f}"
                                     for r in rows))
    print(f"{'seconds':<20}" + "".join(f"{r['seconds']:>22.1f}" for r in rows))
    print(f"{'load (1 min)':<20}" + "".join(f"{_load_text(r):>22}" for r in rows))
    base = next((r for r in rows if r["config"] == "baseline"), None)
    if base:
        print("baseline / configuration: " + ", ".join(
            f"{r['config']} {base['bytes'] / r['bytes']:.2f}x bytes, "
            f"{base['seconds'] / r['seconds']:.2f}x latency" for r in rows if r is not base))
    if extrapolated:
        old = {r["config"]: r for r in extrapolated["rows"]}
        print(f"direct vs extrapolated from {extrapolated['layers_measured']} block(s) (run of "
              f"{extrapolated['rows'][0].get('from_run', '?')}): " + ", ".join(
                  f"{r['config']} {r['bytes'] / 1e6:.0f} vs {old[r['config']]['bytes'] / 1e6:.0f}"
                  f" MB, {r['seconds']:.0f} vs {old[r['config']]['seconds']:.0f} s"
                  for r in rows if r["config"] in old))


def _load_text(row: dict) -> str:
    load = row.get("load_average_1min") or {}
    if load.get("before") is None:
        return "-"
    return f"{load['before']:.1f}->{load['after']:.1f}"


def _has_pair(cost: dict | None) -> bool:
    return bool(cost) and {"baseline", "aero"} <= {r["config"] for r in cost["rows"]}


def _ratios_text(cost: dict | None) -> str:
    if not _has_pair(cost):
        return ""
    rows = {r["config"]: r for r in cost["rows"]}
    base, aero = rows["baseline"], rows["aero"]
    return (f"; extrapolated from {cost['layers_measured']} block(s): "
            f"{base['bytes'] / aero['bytes']:.2f}x bytes, "
            f"{base['seconds'] / aero['seconds']:.2f}x latency")


def _goals(cost: dict | None, accuracy: dict | None,
           extrapolated: dict | None = None) -> list[dict]:
    goals = []
    if not _has_pair(cost) and _has_pair(extrapolated):  # direct rows not all run yet
        cost, extrapolated = extrapolated, None
    rows = {r["config"]: r for r in cost["rows"]} if cost else {}
    base, aero = rows.get("baseline"), rows.get("aero")
    note = (f" ({cost['extrapolation']})" if cost["extrapolation"]
            else " (direct 12-block forwards" + _ratios_text(extrapolated) + ")") if cost else ""
    if base and aero:
        ratio = base["bytes"] / aero["bytes"]
        goals.append(goal_record(
            "aero_vs_baseline_bytes_gpt2_small_T128", GOALS["bytes"], ratio,
            ratio >= GOALS["bytes"],
            f"baseline (LN+GELU) {base['bytes'] / 1e9:.2f} GB vs AERO {aero['bytes'] / 1e9:.2f} "
            f"GB per party per forward: {ratio:.2f}x fewer bytes{note}"))
        ratio = base["seconds"] / aero["seconds"]
        goals.append(goal_record(
            "aero_vs_baseline_latency_gpt2_small_T128", GOALS["latency"], ratio,
            ratio >= GOALS["latency"],
            f"{base['seconds']:.0f} s vs {aero['seconds']:.0f} s per forward on 2 shared, loaded "
            f"cores (1-min load {_load_text(base)} vs {_load_text(aero)}), both parties on one "
            f"machine: {ratio:.2f}x{note}"))
    else:
        goals += [goal_record(g, GOALS[k], None, None, "baseline and aero cost rows not both "
                              "measured")
                  for g, k in (("aero_vs_baseline_bytes_gpt2_small_T128", "bytes"),
                               ("aero_vs_baseline_latency_gpt2_small_T128", "latency"))]
    if accuracy:
        m = accuracy["mpc"]
        goals.append(goal_record(
            "top1_agreement_trained_small_model", GOALS["top1"], m["top1_agreement"],
            m["top1_agreement"] >= GOALS["top1"],
            f"2PC with the max-free softmax vs plaintext over all {m['positions']} positions of "
            f"{m['windows']} held-out windows; emulated over all "
            f"{accuracy['emulated']['positions']} held-out positions: "
            f"{accuracy['emulated']['logits_top1_agreement']:.4f}"))
    else:
        goals.append(goal_record("top1_agreement_trained_small_model", GOALS["top1"], None,
                                 None, "accuracy part not run"))
    return goals


def _plot_costs(cost: dict | None, accuracy: dict | None, path: Path,
                extrapolated: dict | None = None) -> None:
    from confide.privacy.op_ledger import OPS

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    if cost:
        rows = cost["rows"]
        names = [r["config"] for r in rows]
        for ax, key, unit in ((axes[0], "bytes", "GB per party"), (axes[1], "rounds", "rounds")):
            bottom = [0.0] * len(rows)
            for index, op in enumerate(OPS):
                values = [r["by_op"].get(op, {}).get(key, 0.0) / (1e9 if key == "bytes" else 1)
                          for r in rows]
                if not any(values):
                    continue
                ax.bar(names, values, bottom=bottom, label=op, color=f"C{index % 10}",
                       hatch="//" if index >= 10 else None)
                bottom = [b + v for b, v in zip(bottom, values, strict=True)]
            ax.set_ylabel(unit)
            ax.set_title(f"{key} per forward, by operation")
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        legend_outside(axes[1])
        old = {r["config"]: r for r in extrapolated["rows"]} if extrapolated else {}
        x = list(range(len(rows)))
        width = 0.4 if old else 0.8
        axes[2].bar([i - (width / 2 if old else 0) for i in x], [r["seconds"] for r in rows],
                    width, color="tab:gray", label="measured" if cost["extrapolation"] else
                    f"direct {cost['shape']['n_layers']}-block forward")
        if old:
            axes[2].bar([i + width / 2 for i in x],
                        [old[r["config"]]["seconds"] if r["config"] in old else 0 for r in rows],
                        width, color="tab:gray", alpha=0.45, hatch="//",
                        label=f"extrapolated from {extrapolated['layers_measured']} block(s)")
            axes[2].legend(fontsize=7)
        axes[2].set_xticks(x, names)
        axes[2].set_ylabel("seconds (2 shared cores, loaded)")
        axes[2].set_title("latency per forward")
        axes[2].tick_params(axis="x", labelrotation=20, labelsize=8)
        shape = cost["shape"]
        extra = (" - extrapolated from " + f"{cost['layers_measured']} block(s)"
                 if cost["extrapolation"] else " - direct forwards")
        title = (f"CrypTen 2PC, GPT-2-small shape ({shape['n_layers']} blocks, width "
                 f"{shape['d_model']}, T={shape['seq_len']}, vocabulary "
                 f"{shape['vocab_size']}){extra}")
    else:
        title = "cost part not run"
    if accuracy:
        e = accuracy["emulated"]
        title += (f"; max-free softmax (bound {accuracy['softmax_bound']:g}): max |err| "
                  f"{e['softmax_max_abs_error']:.1e}, 2PC top-1 "
                  f"{accuracy['mpc']['top1_agreement']:.3f}")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
