"""``confide bench agora``: Agora agents against an all-natural-language baseline.

The workload is a stream of requests from a few requesting agents to two serving agents
("north" and "south", the demo capabilities of ``node.agent_service``): frequent task kinds
(weather lookups, calendar free slots, additions) and rare ones no agent has a capability for
(poems, trivia, translation). The same stream runs twice on the same model:

- **agora**: requesters use a protocol when one fits (north's published weather routine, PDs
  found in the coordinator's registry), natural language otherwise, and negotiate a PD after
  ``--negotiate-after`` natural-language exchanges about one task kind with one server;
  servers adopt registry PDs that fit their capabilities (south never publishes anything);
- **all-natural**: every request is natural language (the servers still use their tools: the
  model extracts the input, the handler runs, the model phrases the answer).

Reported per run: how requests were handled (routine / protocol / negotiated / natural /
error), model calls and tokens, agent-to-agent bytes (protobuf + gRPC frame), registry bytes,
answers that carry the right fact, seconds. Agents run in this process (their messages are
the real ``AgentEnvelope`` protobufs, sized as on the wire); the registry is a real
coordinator reached over gRPC (``--registry memory`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.bench.common import (
    goal_record,
    hardware,
    legend_outside,
    previous_results,
    pyplot,
    save_figure,
)

# torch and transformers load inside run_benchmark: `confide --help` stays fast

HANDLED = ("routine", "protocol", "negotiated", "natural", "error")
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "New York", "Nairobi",
          "Sydney", "Lima"]
RARE = {
    "poem.write": [("Write a two-line poem about {x}.", None, ["the sea", "autumn", "trains"])],
    "trivia.ask": [("{x}", "question", ["What is the capital of Peru?",
                                        "Who wrote Hamlet?", "How many legs has a spider?"])],
    "translate.text": [("Translate '{x}' into French.", "text", ["good morning", "thank you",
                                                                   "see you tomorrow"])],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=40, help="requests in the stream")
    p.add_argument("--requesters", type=int, default=3, help="requesting agents")
    p.add_argument("--rare", type=float, default=0.2,
                   help="share of requests of rare kinds no agent can serve (default: 0.2)")
    p.add_argument("--model", default="smollm2",
                   help="smollm2, tiny, path:/dir or openai:URL#model (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, 0 = torch's default; 1 is much faster on a CPU that "
                        "other work keeps busy")
    p.add_argument("--negotiate-after", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--extract-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, default=192)
    p.add_argument("--draft-retries", type=int, default=0)
    p.add_argument("--registry", choices=["coordinator", "memory"], default="coordinator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench-agora")
    p.add_argument("--out", default="bench/results",
                   help="where agora.json and agora.png go; the previous JSON there is "
                        "compared with this run (default: %(default)s)")


@dataclass
class Request:
    requester: str
    server: str
    task_kind: str
    body: Any
    text: str
    expected: Any = None     # the handler's answer, for structured replies
    fact: str | None = None  # what a correct natural-language answer must mention


def make_stream(n: int, requesters: int, rare: float, seed: int) -> list[Request]:
    from confide.node.agent_service import calendar_free_slots, math_add, weather_lookup

    rng = random.Random(seed)
    stream = []
    for _ in range(n):
        who = f"agent{rng.randrange(requesters)}"
        if rng.random() < rare:
            kind = rng.choice(sorted(RARE))
            template, key, values = RARE[kind][0]
            x = rng.choice(values)
            body = {key: x, **({"to": "fr"} if kind == "translate.text" else {})} if key \
                else None
            stream.append(Request(who, rng.choice(["north", "south"]), kind, body,
                                  template.format(x=x)))
            continue
        kind = rng.choices(["weather.lookup", "calendar.free_slots", "math.add"],
                           [0.4, 0.3, 0.3])[0]
        if kind == "weather.lookup":
            city = rng.choice(CITIES)
            body = {"city": city}
            expected = weather_lookup(body)
            stream.append(Request(who, rng.choice(["north", "south"]), kind, body,
                                  f"What is the weather in {city} today?", expected,
                                  expected["forecast"]))
        elif kind == "calendar.free_slots":
            day = 6 + rng.randrange(5)   # 2024-05-06 is a Monday: working days
            minutes = rng.choice([30, 60, 90])
            body = {"date": f"2024-05-{day:02d}", "duration_minutes": minutes}
            expected = calendar_free_slots(body)
            first = expected["slots"][0]["start"] if expected["slots"] else None
            stream.append(Request(who, "north", kind, body,
                                  f"When am I free on 2024-05-{day:02d} for {minutes} minutes?",
                                  expected, first))
        else:
            a, b = rng.randrange(1, 100), rng.randrange(1, 100)
            body = {"a": a, "b": b}
            stream.append(Request(who, rng.choice(["north", "south"]), kind, body,
                                  f"What is {a} + {b}?", math_add(body), str(a + b)))
    return stream


class CountingRegistry:
    """A registry wrapper that counts calls and the protobuf bytes they move."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.bytes = 0

    def _count(self, *messages: Any) -> None:
        self.calls += 1
        self.bytes += sum(m.ByteSize() + 5 for m in messages)

    def register(self, document):
        stored = self.inner.register(document)
        self._count(document.to_proto(), stored.to_proto())
        return stored

    def get(self, hash_):
        from confide.v1 import coordinator_pb2 as pb

        found = self.inner.get(hash_)
        self._count(pb.GetProtocolRequest(hash=hash_),
                    found.to_proto() if found else pb.ProtocolDocument())
        return found

    def list(self, task_kind=""):
        from confide.v1 import coordinator_pb2 as pb

        docs = self.inner.list(task_kind)
        self._count(pb.ListProtocolsRequest(task_kind=task_kind),
                    pb.ListProtocolsResponse(protocols=[d.to_proto() for d in docs]))
        return docs

    def record_use(self, hash_, count):
        from confide.v1 import coordinator_pb2 as pb

        self.inner.record_use(hash_, count)
        self._count(pb.RecordProtocolUseRequest(hash=hash_, count=count), pb.ProtocolDocument())


def _servers(model, registry, args) -> dict[str, Any]:
    from confide.node.agent_service import NodeAgentService, demo_capabilities

    options = {"answer_tokens": args.answer_tokens, "extract_tokens": args.extract_tokens,
               "draft_tokens": args.draft_tokens, "draft_retries": args.draft_retries}
    north = NodeAgentService.for_agent(
        "north", model, registry=registry,
        capabilities=demo_capabilities(published=("weather.lookup",)), **options).agent
    south = NodeAgentService.for_agent(
        "south", model, registry=registry,
        capabilities=[c for c in demo_capabilities(published=())
                      if c.task_kind != "calendar.free_slots"], **options).agent
    return {"north": north, "south": south}


def _correct(request: Request, exchange: Any) -> bool | None:
    if request.expected is None:
        return None
    if exchange.handled_by in ("routine", "protocol", "negotiated"):
        return exchange.body == request.expected
    if exchange.handled_by == "natural" and request.fact:
        return request.fact.lower() in exchange.text.lower()
    return False


def run_stream(name: str, stream: list[Request], model: Any, registry: Any,
               args: argparse.Namespace, natural_only: bool) -> dict[str, Any]:
    from confide.agents.agora import Agent, Peer
    from confide.agents.backends import CountingChat

    counted = CountingChat(model)
    servers = _servers(counted, registry, args)
    peers = {n: Peer(n, agent.handle) for n, agent in servers.items()}
    requesters: dict[str, Agent] = {}
    tokens, correct, scored, handled_by = [], 0, 0, []
    started = time.perf_counter()
    for index, request in enumerate(stream):
        agent = requesters.setdefault(request.requester, Agent(
            request.requester, None, registry=None if natural_only else registry,
            negotiate_after=args.negotiate_after))
        before = counted.usage.total
        exchange = agent.ask(peers[request.server], request.task_kind,
                             None if natural_only else request.body, request.text)
        tokens.append(counted.usage.total - before)
        handled_by.append(exchange.handled_by)
        ok = _correct(request, exchange)
        if ok is not None:
            scored += 1
            correct += ok
        print(f"  {name} {index + 1:>3}/{len(stream)} {request.requester}->{request.server} "
              f"{request.task_kind:<20} {exchange.mode:<8} -> {exchange.handled_by:<10} "
              f"{tokens[-1]:>5} tokens", flush=True)
    seconds = time.perf_counter() - started
    for agent in servers.values():
        agent.flush_usage()
    handled = {k: sum(a.counters.handled[k] for a in servers.values()) for k in HANDLED}
    quarter = max(1, len(stream) // 4)
    # "after negotiation": the requests after the first one answered under a negotiated PD
    first = next((i for i, h in enumerate(handled_by) if h == "negotiated"), None)
    after = handled_by[first + 1:] if first is not None else []
    structured_calls = sum(a.counters.structured_calls for a in servers.values())
    structured_valid = sum(a.counters.structured_valid for a in servers.values())
    return {
        "run": name,
        "requests": len(stream),
        "handled": handled,
        "handled_share": {k: v / max(1, len(stream)) for k, v in handled.items()},
        "model_calls": counted.calls,
        "prompt_tokens": counted.usage.prompt_tokens,
        "completion_tokens": counted.usage.completion_tokens,
        "tokens_last_quarter_per_request": sum(tokens[-quarter:]) / quarter,
        "agent_bytes": sum(a.counters.bytes_sent + a.counters.bytes_received
                           for a in requesters.values()),
        "registry_bytes": getattr(registry, "bytes", 0),
        "registry_calls": getattr(registry, "calls", 0),
        "correct": correct,
        "scored": scored,
        "negotiations": sum(a.counters.negotiations for a in requesters.values()),
        "negotiations_failed": sum(a.counters.negotiations_failed
                                   for a in requesters.values()),
        "drafts": {k: sum(a.counters.drafts[k] for a in servers.values())
                   for k in ("model", "fallback")},
        "fetches": sum(a.counters.fetches for a in servers.values()),
        "seconds": seconds,
        "accuracy": correct / scored if scored else None,
        "json_calls": structured_calls,
        "json_valid": structured_valid,
        "valid_share": structured_valid / structured_calls if structured_calls else None,
        "requests_after_negotiation": len(after),
        "natural_share_after_negotiation": (after.count("natural") / len(after)
                                            if after else None),
        "tokens_per_request": tokens,
        "handled_by": handled_by,
    }


def agora_hardware() -> dict:
    import torch

    return hardware() | {"threads": torch.get_num_threads(),
                         "load_average": round(os.getloadavg()[0], 1)}


def run_benchmark(args: argparse.Namespace) -> int:
    from confide.agents.agora import ClientRegistry, MemoryRegistry
    from confide.agents.backends import backend_from_spec

    # SIGTERM unwinds like Ctrl-C, so the coordinator this bench started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stream = make_stream(args.requests, args.requesters, args.rare, args.seed)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = backend_from_spec(args.model, device=args.device)
    workdir = Path(args.workdir)
    cluster = client = None
    if args.registry == "coordinator":
        from confide.cluster.local import LocalCluster
        from confide.sdk.client import Client

        if workdir.exists():
            shutil.rmtree(workdir)
        cluster = LocalCluster(workdir, [], mqtt=False)
        cluster.start_coordinator()
        client = Client(cluster.address)
        registry = CountingRegistry(ClientRegistry(client))
    else:
        registry = CountingRegistry(MemoryRegistry())
    try:
        rows = [run_stream("agora", stream, model, registry, args, natural_only=False),
                run_stream("all-natural", stream, model, None, args, natural_only=True)]
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
    kinds: dict[str, int] = {}
    for request in stream:
        kinds[request.task_kind] = kinds.get(request.task_kind, 0) + 1
    print()
    print(f"workload: {len(stream)} requests from {args.requesters} agents to 2 serving agents "
          f"(seed {args.seed}): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print("  north: weather.lookup (published routine), calendar.free_slots and math.add "
          "(unpublished); south: weather.lookup and math.add (unpublished); rare kinds have no "
          "capability anywhere")
    print(f"  model {getattr(model, 'name', args.model)} (greedy; answer <= {args.answer_tokens}, "
          f"extraction <= {args.extract_tokens}, draft <= {args.draft_tokens} tokens); "
          f"negotiate after {args.negotiate_after} natural-language exchanges; registry: "
          f"{args.registry}")
    header = (f"{'run':<12}{'routine':>8}{'proto':>7}{'negot':>7}{'natural':>8}{'error':>6}"
              f"{'calls':>7}{'tokens':>8}{'tok/req end':>12}{'agent KB':>10}{'reg KB':>8}"
              f"{'correct':>9}{'s':>7}{'valid JSON':>14}")
    print(header)
    for row in rows:
        h = row["handled"]
        print(f"{row['run']:<12}{h['routine']:>8}{h['protocol']:>7}{h['negotiated']:>7}"
              f"{h['natural']:>8}{h['error']:>6}{row['model_calls']:>7}"
              f"{row['prompt_tokens'] + row['completion_tokens']:>8}"
              f"{row['tokens_last_quarter_per_request']:>12.1f}"
              f"{row['agent_bytes'] / 1e3:>10.1f}{row['registry_bytes'] / 1e3:>8.1f}"
              f"{row['correct']:>5}/{row['scored']:<3}{row['seconds']:>7.1f}"
              f"{_valid_cell(row['json_valid'], row['json_calls']):>14}")
    agora, base = rows
    change = (agora["prompt_tokens"] + agora["completion_tokens"]) / max(
        1, base["prompt_tokens"] + base["completion_tokens"]) - 1
    print(f"agora: {agora['negotiations']} negotiation(s) ({agora['drafts']['model']} drafted "
          f"by the model, {agora['drafts']['fallback']} from the capability's schemas), "
          f"{agora['negotiations_failed']} refused, {agora['fetches']} registry fetch(es); "
          f"model tokens {change:+.0%} vs all-natural")
    print("valid JSON: the servers' model calls that had to write JSON (tool arguments, PD "
          "drafts) whose answer was, as written, valid against the schema")
    goals = _goals(agora, base)
    for g in goals:
        print(f"goal {g['goal']}: "
              f"{'met' if g['met'] else 'MISSED' if g['met'] is False else 'not measured'}"
              f" ({g['text']})")
    info = agora_hardware()
    print(f"hardware: {info['platform']}, {info['cpu_count']} CPU(s), torch {info['torch']} "
          f"({info['threads']} thread(s)), GPU {info['cuda'] or 'none'}, load average "
          f"{info['load_average']}; baseline: all-natural-language on the same stream and model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "agora.json", rows)
    report = {"benchmark": "agora", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "model": getattr(model, "name", args.model),
              "workload": {k: v for k, v in vars(args).items() if k != "func"},
              "task_kinds": kinds, "results": rows, "goals": goals}
    (out / "agora.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "agora.png")
    print(f"wrote {out / 'agora.json'} and {out / 'agora.png'}")
    return 0 if agora["handled"]["error"] == 0 else 1


def _valid_cell(valid: int, calls: int) -> str:
    return f"{valid}/{calls} ({100 * valid / calls:.0f}%)" if calls else "-"


def _goals(agora: dict, base: dict) -> list[dict]:
    """The issue's goals for Agora, as measured in this run."""
    goals = []
    for row in (agora, base):
        share = row["valid_share"]
        goals.append(goal_record(
            f"valid_structured_output_{row['run']}", 1.0, share,
            None if share is None else share >= 1.0,
            f"{row['run']}: model calls writing JSON valid as written: "
            f"{_valid_cell(row['json_valid'], row['json_calls'])}"))
    share = agora["natural_share_after_negotiation"]
    goals.append(goal_record(
        "natural_share_after_negotiation", 0.25, share,
        None if share is None else share < 0.25,
        f"{'-' if share is None else f'{100 * share:.0f}%'} of the "
        f"{agora['requests_after_negotiation']} requests after the first negotiated exchange "
        f"ended in natural language (target < 25%; overall "
        f"{100 * agora['handled_share']['natural']:.0f}%)"))
    ours, theirs = (agora["tokens_last_quarter_per_request"],
                    base["tokens_last_quarter_per_request"])
    cut = 1 - ours / theirs if theirs else None
    goals.append(goal_record(
        "last_quarter_tokens_cut", 0.5, cut, None if cut is None else cut >= 0.5,
        f"tokens per request in the last quarter {ours:.1f} vs {theirs:.1f} all-natural "
        f"({'-' if cut is None else f'{100 * cut:.0f}%'} lower; target >= 50%)"))
    return goals


def _compare_with_previous(path: Path, rows: list[dict]) -> None:
    found = previous_results(path, lambda r: r["run"])
    if found is None:
        return
    _, previous = found
    for row in rows:
        old = previous.get(row["run"])
        if old is None:
            continue
        print(f"  vs last run: {row['run']}: tokens "
              f"{old['prompt_tokens'] + old['completion_tokens']} -> "
              f"{row['prompt_tokens'] + row['completion_tokens']}, natural "
              f"{old['handled'].get('natural', 0)} -> {row['handled']['natural']}, agent bytes "
              f"{old['agent_bytes']} -> {row['agent_bytes']}, correct "
              f"{old.get('correct')} -> {row['correct']}")


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"routine": "#2a9d8f", "protocol": "#8ab17d", "negotiated": "#e9c46a",
              "natural": "#e76f51", "error": "#6c757d"}
    names = [r["run"] for r in rows]
    bottom = [0.0] * len(rows)
    for kind in HANDLED:
        values = [r["handled_share"][kind] for r in rows]
        left.bar(names, values, bottom=bottom, color=colors[kind], label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.set_ylabel("share of requests")
    left.set_title("How requests were handled")
    legend_outside(left)
    for row in rows:
        cumulative, total = [], 0
        for t in row["tokens_per_request"]:
            total += t
            cumulative.append(total)
        right.plot(range(1, len(cumulative) + 1), cumulative, label=row["run"])
    right.set_xlabel("request")
    right.set_ylabel("cumulative model tokens")
    right.set_title("Model tokens over the stream")
    legend_outside(right)
    save_figure(fig, path)
