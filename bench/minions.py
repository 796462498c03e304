"""``confide bench minions``: accuracy and remote tokens of Minion and MinionS against the
remote-only baseline (the remote model reads the document) and local-only (the local model
alone), on long BBC News articles, in process (the protocol code is the daemons' own:
``agents.minions`` with ``LocalWorker``, the class a node runs).

Workload: the longest BBC News articles of 4,500-7,000 characters (~1,100-1,700 tokens), one
per category in turn, and trivia-style questions whose answers are verbatim in the article,
generated deterministically: in a sentence with exactly one number (or one capitalised name
of 2-3 words), the number (name) is the answer and the question asks what fills the blank in
a window of the sentence around it ("In the BBC article "TITLE", what fills the blank in
"... was designed by MGM art director ____ . ..."?"). Up to two numbers and two names per
article, spread over it. The Trivia QA of chatterbot-corpus is not installed here, hence the
generation. Each question is asked over its own article, held by one node (the paper's
setting: one context per question). An answer is correct when it contains the expected
string (case-insensitive).

Remote tokens are what the remote model read and wrote, every attempt included; local tokens
likewise for the local model. Both models default to SmolLM2-135M-Instruct, far below the
paper's GPT-4o / Llama-3B pairing, so accuracy is low and reported as measured: point
``--remote-model openai:URL#model`` at a real API to measure real quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from pathlib import Path

from confide.bench.common import (
    cpu_model,
    goal_record,
    hardware,
    previous_results,
    pyplot,
    save_figure,
)

PAPER = ("the paper (Narayan et al. 2025, GPT-4o remote + Llama-3.2 local): MinionS at 5.7x "
         "lower remote cost than remote-only, at 97.9% of its quality")
MODES = ("remote-only", "local-only", "minion", "minions")
MIN_CHARS, MAX_CHARS = 4500, 7000

_NUMBER = re.compile(r"(?<![\w.,£$€])[£$€]?\d+(?:[.,]\d+)*"
                     r"(?:%|\s?(?:bn|m|million|billion|per cent)\b)?(?![\w,.]\d)")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:[ -][A-Z][a-z]+){1,2}\b")
_NOT_NAMES = {"The", "A", "An", "In", "On", "At", "But", "And", "He", "She", "It", "They",
              "We", "I", "This", "That", "Mr", "Mrs", "Ms", "Dr", "Sir", "If", "As", "For",
              "With", "When", "While", "However", "Last", "Next", "Since", "After", "Before",
              "So", "Its", "His", "Her", "Their", "There", "What", "Some", "Many", "Our"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote-model", default="smollm2",
                   help="remote model: smollm2, tiny, path:DIR, openai:URL#model "
                        "(default: %(default)s)")
    p.add_argument("--local-model", default="smollm2",
                   help="local model, same forms (default: %(default)s)")
    p.add_argument("--docs", type=int, default=6, help="articles (default: %(default)s)")
    p.add_argument("--per-doc", type=int, default=4,
                   help="questions per article, at most (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 articles x 2 questions")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=2,
                   help="MinionS rounds / Minion turns (default: %(default)s)")
    p.add_argument("--max-jobs", type=int, default=2,
                   help="jobs per MinionS round, at most (default: %(default)s)")
    p.add_argument("--retries", type=int, default=0,
                   help="re-asks when the remote model's reply holds no JSON; a 135M remote "
                        "model rarely fixes it, a real API rarely needs it (default: "
                        "%(default)s)")
    p.add_argument("--chunk-chars", type=int, default=2000,
                   help="MinionS chunk size in characters (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, 0 = torch's default (on a machine shared with other "
                        "work, 1 avoids thread thrashing)")
    p.add_argument("--cost-calls", type=int, default=12,
                   help="worker prompts decoded with and without the schema's grammar, for the "
                        "cost of constrained decoding (tokens/s) and the unconstrained valid "
                        "share; 0 skips it (default: %(default)s)")
    p.add_argument("--out", default="bench/results",
                   help="where minions.json and minions.png go; the previous JSON there is "
                        "compared with this run (default: %(default)s)")


# ------------------------------------------------------------------ workload


def _window(sentence: str, start: int, end: int) -> str:
    """The sentence around [start, end) with the span blanked: up to 8 words before, 6 after,
    spacing as in the text."""
    before = sentence[:start]
    cut = [m.start() for m in re.finditer(r"\S+", before)]
    left = before[cut[-8]:] if len(cut) >= 8 else before
    after = sentence[end:]
    ends = [m.end() for m in re.finditer(r"\S+", after)]
    right = after[:ends[5]] if len(ends) >= 6 else after
    return f"{left}____{right}".strip()


def make_questions(text: str, per_kind: int = 2) -> list[dict]:
    """Deterministic cloze questions whose answers are verbatim in ``text``."""
    from confide.agents.minions.text import split_sentences

    title, _, body = text.partition("\n")
    sentences = [s for para in body.split("\n") for s in split_sentences(para)]
    questions, used = [], set()
    for kind, pattern in (("number", _NUMBER), ("name", _NAME)):
        candidates = []
        for sentence in sentences:
            found = [m for m in pattern.finditer(sentence) if m.start() > 0]
            if kind == "name":
                found = [m for m in found if m.group().split()[0] not in _NOT_NAMES]
            else:
                found = [m for m in found if len(m.group().strip()) >= 3]
            if len(found) != 1:
                continue
            match = found[0]
            answer = match.group().strip()
            window = _window(sentence, match.start(), match.end())
            if (len(window.split()) < 6 or answer.lower() in window.lower()
                    or answer.lower() in title.lower() or answer.lower() in used):
                continue
            candidates.append((answer, window))
        step = max(1, len(candidates) // per_kind)
        for answer, window in candidates[::step][:per_kind]:
            used.add(answer.lower())
            questions.append({
                "kind": kind, "answer": answer,
                "question": f'In the BBC article "{title.strip()}", what fills the blank in '
                            f'"... {window} ..."?'})
    return questions


def workload(docs: int, per_doc: int) -> tuple[list[dict], list[dict]]:
    """The articles (longest first within the size range, one category at a time) and their
    questions."""
    from confide.node.data import bbc_news

    examples, labels = bbc_news()
    pool = sorted((e for e in examples if MIN_CHARS <= len(e.text) <= MAX_CHARS),
                  key=lambda e: (-len(e.text), e.text))
    by_label: dict[int, list] = {}
    for e in pool:
        by_label.setdefault(e.label, []).append(e)
    order = sorted(by_label, key=lambda k: -len(by_label[k][0].text))
    picked = []
    while len(picked) < docs and any(by_label.values()):
        for label in order:
            if by_label[label] and len(picked) < docs:
                picked.append(by_label[label].pop(0))
    items = []
    for index, article in enumerate(picked):
        questions = make_questions(article.text, per_kind=max(1, (per_doc + 1) // 2))
        kinds = {"number": [q for q in questions if q["kind"] == "number"],
                 "name": [q for q in questions if q["kind"] == "name"]}
        mixed = [q for pair in zip(kinds["number"], kinds["name"], strict=False) for q in pair]
        mixed += [q for q in questions if q not in mixed]
        items += [{**q, "doc": index, "label": labels[article.label]}
                  for q in mixed[:per_doc]]
    return [{"doc": i, "label": labels[a.label], "chars": len(a.text), "text": a.text}
            for i, a in enumerate(picked)], items


def correct(answer: str, expected: str) -> bool:
    return expected.lower() in answer.lower()


# ------------------------------------------------------------------ run


def run_benchmark(args: argparse.Namespace) -> int:
    import torch

    from confide.agents.backends import backend_from_spec
    from confide.agents.minions.orchestrator import ask, run_remote_only
    from confide.agents.minions.worker import LocalWorker

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
    docs, per_doc = (2, 2) if args.quick else (args.docs, args.per_doc)
    articles, items = workload(docs, per_doc)
    print(f"workload: {len(articles)} BBC News article(s) of "
          f"{min(a['chars'] for a in articles):,}-{max(a['chars'] for a in articles):,} "
          f"characters ({', '.join(a['label'] for a in articles)}), {len(items)} cloze "
          f"question(s) with verbatim answers; remote {args.remote_model}, local "
          f"{args.local_model}; MinionS: chunks of {args.chunk_chars} characters, at most "
          f"{args.max_jobs} job(s) per round, {args.max_rounds} round(s), {args.retries} "
          "re-ask(s); citations allow")

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    remote = backend_from_spec(args.remote_model)
    local = backend_from_spec(args.local_model)
    print(f"models loaded in {time.perf_counter() - started:.1f}s")
    workers = [LocalWorker([a["text"]], model=local, chunk_chars=args.chunk_chars)
               for a in articles]

    records = []
    totals = {m: {"correct": 0, "remote_prompt": 0, "remote_completion": 0,
                  "local_prompt": 0, "local_completion": 0, "seconds": 0.0,
                  "remote_calls": 0, "remote_valid": 0, "local_calls": 0, "local_valid": 0}
              for m in modes}
    for number, item in enumerate(items, start=1):
        worker = workers[item["doc"]]

        def execute(requests, worker=worker):
            return {node: worker.handle(request) for node, request in requests.items()}

        record = {k: item[k] for k in ("doc", "label", "kind", "question", "answer")}
        for mode in modes:
            t0 = time.perf_counter()
            if mode == "remote-only":
                result = run_remote_only(remote, item["question"],
                                         [articles[item["doc"]]["text"]])
            else:
                result = ask(mode, item["question"], ["node"], remote=remote, execute=execute,
                             citations="allow", max_rounds=args.max_rounds,
                             retries=args.retries,
                             **({"max_jobs": args.max_jobs} if mode == "minions" else {}))
            seconds = time.perf_counter() - t0
            ok = correct(result.answer, item["answer"])
            row = totals[mode]
            row["correct"] += ok
            row["remote_prompt"] += result.remote.prompt_tokens
            row["remote_completion"] += result.remote.completion_tokens
            row["local_prompt"] += result.local.prompt_tokens
            row["local_completion"] += result.local.completion_tokens
            row["seconds"] += seconds
            for key, value in result.structured.to_dict().items():
                row[key] += value
            record[mode] = {"answer": result.answer[:300], "correct": ok,
                            "rounds": result.rounds,
                            "remote_tokens": [result.remote.prompt_tokens,
                                              result.remote.completion_tokens],
                            "local_tokens": [result.local.prompt_tokens,
                                             result.local.completion_tokens],
                            "seconds": round(seconds, 2),
                            "structured": result.structured.to_dict(),
                            "trace": [step.message for step in result.steps
                                      if step.kind in ("plan", "round", "error")]}
        records.append(record)
        marks = " ".join(f"{m}={'Y' if record[m]['correct'] else '.'}" for m in modes)
        print(f"  [{number}/{len(items)}] {item['answer']!r}: {marks}", flush=True)

    n = max(len(items), 1)
    rows = []
    for mode in modes:
        t = totals[mode]
        rows.append({"mode": mode, "questions": len(items), "correct": t["correct"],
                     "accuracy": t["correct"] / n,
                     "remote_prompt_tokens": t["remote_prompt"] / n,
                     "remote_completion_tokens": t["remote_completion"] / n,
                     "remote_tokens": (t["remote_prompt"] + t["remote_completion"]) / n,
                     "local_tokens": (t["local_prompt"] + t["local_completion"]) / n,
                     "seconds": t["seconds"] / n,
                     "remote_json_calls": t["remote_calls"], "remote_valid": t["remote_valid"],
                     "local_json_calls": t["local_calls"], "local_valid": t["local_valid"],
                     "remote_valid_share": _share(t["remote_valid"], t["remote_calls"]),
                     "local_valid_share": _share(t["local_valid"], t["local_calls"])})
    base = next((r for r in rows if r["mode"] == "remote-only"), None)
    for row in rows:
        row["remote_cost_reduction"] = (base["remote_tokens"] / row["remote_tokens"]
                                        if base and row["remote_tokens"] else None)
        row["quality_vs_remote_only"] = (row["accuracy"] / base["accuracy"]
                                         if base and base["accuracy"] else None)

    print()
    print(f"{'mode':<13}{'accuracy':>9}{'remote tok/q':>14}{'(prompt+compl.)':>18}"
          f"{'cost vs remote':>16}{'quality vs remote':>19}{'local tok/q':>13}{'s/q':>7}"
          f"{'valid JSON remote':>19}{'valid JSON local':>18}")
    for row in rows:
        cost = (f"{row['remote_cost_reduction']:.1f}x lower" if row["remote_cost_reduction"]
                else ("no remote" if not row["remote_tokens"] else "-"))
        if row["mode"] == "remote-only":
            cost = "baseline"
        quality = (f"{100 * row['quality_vs_remote_only']:.0f}%"
                   if row["quality_vs_remote_only"] is not None else "-")
        print(f"{row['mode']:<13}{row['correct']:>4}/{row['questions']:<4}"
              f"{row['remote_tokens']:>14.0f}"
              f"{row['remote_prompt_tokens']:>11.0f}+{row['remote_completion_tokens']:<6.0f}"
              f"{cost:>16}{quality:>19}{row['local_tokens']:>13.0f}{row['seconds']:>7.1f}"
              f"{_valid_cell(row['remote_valid'], row['remote_json_calls']):>19}"
              f"{_valid_cell(row['local_valid'], row['local_json_calls']):>18}")
    print("valid JSON: structured calls whose answer was, as written, valid against the call's "
          "schema (remote: plans and decisions; local: MinionS jobs; Minion's and local-only's "
          "local replies are prose by design)")
    cost = (constrained_cost(local, workers, items, args.cost_calls) if args.cost_calls
            else None)
    if cost:
        print(f"constrained decoding on {cost['calls']} worker prompts (same prompts, "
              f"alternating order): {cost['tokens_per_s_constrained']:.1f} vs "
              f"{cost['tokens_per_s_free']:.1f} tokens/s unconstrained "
              f"({100 * cost['tokens_per_s_cost']:+.0f}% cost); valid as written "
              f"{cost['valid_constrained']}/{cost['calls']} vs {cost['valid_free']}/"
              f"{cost['calls']} unconstrained; after repair of the unconstrained: "
              f"agents.jsonrepair {cost['repaired_ours']}/{cost['calls']}, json-repair "
              f"{cost['repaired_json_repair']}/{cost['calls']}")
    goals = _goals(rows, cost)
    for g in goals:
        print(f"goal {g['goal']}: "
              f"{'met' if g['met'] else 'MISSED' if g['met'] is False else 'not measured'}"
              f" ({g['text']})")
    print(f"baseline: remote-only (the remote model reads the whole article). {PAPER}.")
    info = hardware() | {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}
    print(f"hardware: {info['cpu']}, {info['cpu_count']} CPU(s), torch {info['torch']} with "
          f"{info['torch_threads']} thread(s), GPU {info['cuda'] or 'none'}; total "
          f"{time.perf_counter() - started:.0f}s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "minions.json", rows)
    report = {"benchmark": "minions", "time": time.strftime("%Y%m%d-%H%M%S"),
              "hardware": info, "paper": PAPER,
              "workload": {k: v for k, v in vars(args).items() if k != "func"}
              | {"articles": [{k: a[k] for k in ("doc", "label", "chars")} for a in articles],
                 "questions": len(items)},
              "baseline": "remote-only", "results": rows, "constrained_cost": cost,
              "goals": goals, "questions": records}
    (out / "minions.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _plot(rows, out / "minions.png", args)
    print(f"wrote {out / 'minions.json'} and {out / 'minions.png'}")
    return 0


def _share(valid: int, calls: int) -> float | None:
    return valid / calls if calls else None


def _valid_cell(valid: int, calls: int) -> str:
    return f"{valid}/{calls} ({100 * valid / calls:.0f}%)" if calls else "-"


def constrained_cost(local, workers: list, items: list[dict], calls: int) -> dict | None:
    """The cost of constrained decoding on this machine: the first ``calls`` (job, chunk)
    worker prompts of the workload (the question as the job, as the default plan does),
    each decoded with and without WORKER_SCHEMA's grammar, in alternating order so that a
    load change hits both alike. Also counts answers valid as written, and, for the
    unconstrained ones, valid after each repair (agents.jsonrepair and json-repair): the
    same corpus for both repairs."""
    from jsonschema import Draft202012Validator

    from confide.agents.jsonrepair import JSONRepairError, extract_json, strictly_valid
    from confide.agents.minions.config import LOCAL_JOB_TOKENS
    from confide.agents.minions.schemas import WORKER_SCHEMA
    from confide.agents.minions.worker import WORKER_EXAMPLES, WORKER_SYSTEM
    from confide.agents.model import supports_schema

    if not supports_schema(local):
        print("constrained decoding cost: the local model cannot be constrained (xgrammar?)")
        return None
    try:
        import json_repair
    except ImportError:
        json_repair = None
    validator = Draft202012Validator(WORKER_SCHEMA)
    prompts = []
    for item in items:
        for chunk in workers[item["doc"]].chunks[0]:
            prompts.append([{"role": "system", "content": WORKER_SYSTEM}, *WORKER_EXAMPLES,
                            {"role": "user", "content": f"Excerpt:\n{chunk}\n\nTask: "
                                                        f"{item['question']}"}])
    prompts = prompts[:calls]
    stats = {"free": [0, 0.0, 0], "constrained": [0, 0.0, 0]}  # tokens, seconds, valid
    ours = theirs = 0
    samples = []
    for index, messages in enumerate(prompts):
        order = ("free", "constrained") if index % 2 == 0 else ("constrained", "free")
        for how in order:
            t0 = time.perf_counter()
            completion = local.chat(messages, max_tokens=LOCAL_JOB_TOKENS,
                                    schema=WORKER_SCHEMA if how == "constrained" else None)
            stats[how][1] += time.perf_counter() - t0
            stats[how][0] += completion.usage.completion_tokens
            stats[how][2] += strictly_valid(completion.text, validator)
            if how == "free":
                with contextlib.suppress(JSONRepairError):
                    ours += validator.is_valid(extract_json(completion.text))
                if json_repair is not None:
                    theirs += validator.is_valid(json_repair.loads(completion.text))
                samples.append(completion.text[:200])
    free = stats["free"][0] / max(stats["free"][1], 1e-9)
    constrained = stats["constrained"][0] / max(stats["constrained"][1], 1e-9)
    return {"calls": len(prompts), "max_tokens": LOCAL_JOB_TOKENS,
            "tokens_free": stats["free"][0], "seconds_free": round(stats["free"][1], 2),
            "tokens_constrained": stats["constrained"][0],
            "seconds_constrained": round(stats["constrained"][1], 2),
            "tokens_per_s_free": free, "tokens_per_s_constrained": constrained,
            "tokens_per_s_cost": 1 - constrained / free if free else None,
            "valid_free": stats["free"][2], "valid_constrained": stats["constrained"][2],
            "repaired_ours": ours,
            "repaired_json_repair": theirs if json_repair is not None else None,
            "unconstrained_samples": samples}


def _goals(rows: list[dict], cost: dict | None) -> list[dict]:
    """The issue's goals, as measured in this run."""
    by_mode = {r["mode"]: r for r in rows}
    goals = []
    for side, what in (("local", "structured local-model calls"),
                       ("remote", "remote plans and decisions")):
        calls = sum(r[f"{side}_json_calls"] for r in rows)
        valid = sum(r[f"{side}_valid"] for r in rows)
        share = _share(valid, calls)
        goals.append(goal_record(
            f"{side}_valid_structured_output", 1.0, share,
            None if share is None else share >= 1.0,
            f"{what} valid as written: {valid}/{calls}", calls=calls, valid=valid))
    base = by_mode.get("remote-only")
    for mode, quality in (("minions", 0.90), ("minion", 0.95)):
        row = by_mode.get(mode)
        if row is None or base is None:
            goals.append(goal_record(f"{mode}_quality_at_5x", quality, None, None,
                                     f"{mode} or remote-only not run"))
            continue
        q, c = row["quality_vs_remote_only"], row["remote_cost_reduction"]
        met = q is not None and c is not None and q >= quality and c >= 5.0
        goals.append(goal_record(
            f"{mode}_quality_at_5x", quality, q, met,
            f"{mode}: {row['correct']}/{row['questions']} vs remote-only "
            f"{base['correct']}/{base['questions']} "
            f"({'-' if q is None else f'{100 * q:.0f}%'} of its accuracy, target "
            f"{100 * quality:.0f}%) at {'-' if c is None else f'{c:.1f}x'} fewer remote tokens "
            "(target 5x)", remote_cost_reduction=c))
    if cost is None:
        goals.append(goal_record("constrained_decoding_cost", 0.15, None, None,
                                 "not measured (--cost-calls 0 or no xgrammar)"))
    else:
        measured = cost["tokens_per_s_cost"]
        goals.append(goal_record(
            "constrained_decoding_cost", 0.15, measured,
            measured is not None and measured <= 0.15,
            f"tokens/s {cost['tokens_per_s_constrained']:.1f} constrained vs "
            f"{cost['tokens_per_s_free']:.1f} free on {cost['calls']} worker prompts "
            "(a loaded, shared CPU: timings are noisy)"))
    return goals


def _compare_with_previous(path: Path, rows: list[dict]) -> None:
    found = previous_results(path, lambda r: r["mode"])
    if found is None:
        return
    previous, old = found
    work = previous.get("workload", {})
    print(f"  vs last run ({previous.get('time', '?')}, {work.get('questions', '?')} "
          f"questions, remote {work.get('remote_model', '?')}, local "
          f"{work.get('local_model', '?')}):")
    for row in rows:
        before = old.get(row["mode"])
        if before is None:
            continue
        print(f"    {row['mode']:<12} accuracy {before['accuracy']:.2f} -> {row['accuracy']:.2f}"
              f", remote tokens/q {before['remote_tokens']:.0f} -> {row['remote_tokens']:.0f}")


def _plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2),
                                 gridspec_kw={"width_ratios": [3, 2]})
    shown = [r for r in rows if r["remote_json_calls"] or r["local_json_calls"]]
    for offset, side in ((-0.2, "remote"), (0.2, "local")):
        values = [r[f"{side}_valid_share"] or 0.0 for r in shown]
        bx.bar([i + offset for i in range(len(shown))], values, width=0.4,
               label=f"{side} JSON calls")
    bx.set_xticks(range(len(shown)), [r["mode"] for r in shown])
    bx.set_ylim(0, 1.05)
    bx.set_ylabel("valid as written (share of calls)")
    bx.set_title("structured output", fontsize=10)
    bx.legend(fontsize=8)
    for i, row in enumerate(rows):
        x = max(row["remote_tokens"], 1.0)
        ax.scatter([x], [row["accuracy"]], s=80)
        ax.annotate(f"{row['mode']} ({row['correct']}/{row['questions']})",
                    (x, row["accuracy"]), textcoords="offset points",
                    xytext=(6, 8 if i % 2 == 0 else -16))
    ax.set_xscale("log")
    ax.set_xlim(0.5, max(max(r["remote_tokens"] for r in rows), 1.0) * 6)
    ax.set_xlabel("remote tokens per question (log; local-only plotted at 1)")
    ax.set_ylabel("accuracy (answer contains the expected string)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Minions on BBC News: remote {args.remote_model}, local {args.local_model}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
