"""Training AERO models (``node.aero``) on BBC News: the recipe behind ``confide aero train``
and ``confide bench private``, so the product command and the benchmark train alike.

    1. tokenize BBC News with MiniLM's tokenizer; every 10th article is held out
    2. compact vocabulary (optional): the most frequent training tokens, the rest -> [UNK];
       the mapping travels as the model's public TokenizerSpec
    3. build the variant (VARIANTS: baseline, ln-free, softmax-only, aero) at equal width
       and depth, train it (``train_aero``), measure held-out perplexity
    4. publish it into a node's ``private/`` folder (``publish_model``) or write the same
       servable file elsewhere (``export_model``, ``--out``); an AERO model's score bound
       (``node.aero_bound``) is measured on held-out text, checked and stored in either
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"layernorm": True, "activation": "gelu", "ffn": True, "normalization": "none"},
    "ln-free": {"layernorm": False, "activation": "gelu", "ffn": True,
                "normalization": "scaled"},
    "softmax-only": {"layernorm": False, "activation": "none", "ffn": True,
                     "normalization": "scaled"},
    "aero": {"layernorm": False, "activation": "none", "ffn": True, "normalization": "scaled",
             "entropy_reg": {"enabled": True}},
}
DESCRIPTIONS = {
    "baseline": "LayerNorm + GELU FFN (GPT-2-like)",
    "ln-free": "no LayerNorm, GELU FFN, scaled branches",
    "softmax-only": "no LayerNorm, no GELU (linear FFN), scaled",
    "aero": "softmax-only + entropy regularization",
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training (equal for every variant)")
    g.add_argument("--d-model", type=int, default=128, help="width (default: %(default)s)")
    g.add_argument("--layers", type=int, default=2, help="depth (default: %(default)s)")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ff", type=int, default=512, help="FFN width (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=128, help="positions (default: %(default)s)")
    g.add_argument("--vocab", type=int, default=4096,
                   help="compact vocabulary: the most frequent MiniLM tokens of the training "
                        "articles (the rest -> [UNK]); 0 = MiniLM's full 30,522 "
                        "(default: %(default)s)")
    g.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--eval-articles", type=int, default=100,
                   help="held-out articles for perplexity (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)



def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="aero", choices=list(VARIANTS),
                   help="architecture (default: %(default)s): " + "; ".join(
                       f"{k}: {v}" for k, v in DESCRIPTIONS.items()))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--node-data", help="publish into this node data folder's private/")
    where.add_argument("--out", help="write this .safetensors file instead")
    p.add_argument("--name", default="", help="model name on the node (default: the variant)")
    add_model_arguments(p)



def bbc_split(vocab: int, seed: int = 0):
    """BBC News token sequences (train, held-out: every 10th article) in a model vocabulary,
    with the public tokenizer spec that maps MiniLM ids to it."""
    from confide.node.aero import bbc_token_sequences, default_tokenizer
    from confide.node.private_inference import TokenizerSpec

    tokenizer = default_tokenizer()
    sequences = bbc_token_sequences(tokenizer)
    train = [s for i, s in enumerate(sequences) if i % 10 != 9]
    test = [s for i, s in enumerate(sequences) if i % 10 == 9]
    if not vocab:
        return train, test, TokenizerSpec("minilm"), len(tokenizer), 1.0
    counts = collections.Counter(t for s in train for t in s)
    unk = tokenizer.unk_token_id
    frequent = [t for t, _ in counts.most_common(vocab) if t != unk]
    keep = [unk, *frequent[: vocab - 1]]
    index = {t: i for i, t in enumerate(keep)}
    coverage = sum(c for t, c in counts.items() if t in index) / sum(counts.values())

    def remap(seqs):
        return [[index.get(t, 0) for t in s] for s in seqs]

    return remap(train), remap(test), TokenizerSpec("minilm", tuple(keep), 0), len(keep), \
        coverage


def variant_config(variant: str, vocab_size: int, args: argparse.Namespace):
    from confide.node.aero import AeroConfig

    return AeroConfig(vocab_size=vocab_size, max_len=args.max_len, d_model=args.d_model,
                      n_heads=args.heads, n_layers=args.layers, d_ff=args.d_ff, seed=args.seed,
                      **VARIANTS[variant])


def train_variant(variant: str, train, test, vocab_size: int, args: argparse.Namespace):
    """Train one variant with the shared recipe; returns (model, record)."""
    import torch

    from confide.node.aero import AeroModel, perplexity, train_aero

    model = AeroModel(variant_config(variant, vocab_size, args))
    start = time.perf_counter()
    history = train_aero(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    train_s = time.perf_counter() - start
    held_out = test[: args.eval_articles or None]
    ppl = perplexity(model, held_out)
    tail = history[-min(20, len(history)):]
    with torch.no_grad():
        entropy = None
        if model.config.entropy_reg.enabled:
            entropy = model.entropy_thresholds().mean().item()
    bound = None
    if model.config.entropy_reg.enabled:  # its scores are kept bounded: the max-free softmax
        from confide.node.aero_bound import measure_score_bound

        bound = measure_score_bound(model, held_out)
        model.softmax_bound = bound
    record = {
        "variant": variant, "description": DESCRIPTIONS[variant],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps, "train_s": train_s,
        "train_loss_last20": statistics.mean(h["ce"] for h in tail),
        "perplexity": ppl, "held_out_articles": len(held_out),
        "held_out_tokens": sum(len(s) for s in held_out),
        "entropy_threshold_mean": entropy,
        "softmax_bound": None if bound is None else bound.bound,
        "max_abs_score": None if bound is None else bound.max_abs_score,
    }
    return model, record


def train_command(args: argparse.Namespace) -> int:
    """``confide aero train``: train one variant on BBC News and publish it for a node."""
    print(f"tokenizing BBC News (vocabulary {args.vocab or 'full MiniLM'}) ...", flush=True)
    train, test, spec, vocab_size, coverage = bbc_split(args.vocab, args.seed)
    print(f"{len(train)} training / {len(test)} held-out articles, vocabulary {vocab_size} "
          f"({coverage:.1%} of training tokens covered); training {args.variant} "
          f"({DESCRIPTIONS[args.variant]}) for {args.steps} steps ...", flush=True)
    model, record = train_variant(args.variant, train, test, vocab_size, args)
    from confide.node.aero_bound import ScoreBoundError

    try:
        path = write_trained(model, spec, test, node_data=args.node_data,
                             name=args.name or args.variant, out=args.out)
    except ScoreBoundError as exc:
        print(f"error: {exc}. The bound was measured on the first {args.eval_articles} "
              "held-out articles and checked on all of them; --eval-articles 0 measures it on "
              "all (the model was not written)", file=sys.stderr)
        return 1
    bound = record["softmax_bound"]
    print(f"held-out perplexity {record['perplexity']:.1f} ({record['held_out_tokens']} tokens),"
          f" {record['parameters']:,} parameters, trained in {record['train_s']:.0f}s; "
          + (f"softmax bound {bound:g} (max |score| {record['max_abs_score']:.3f}) stored; "
             if bound is not None else "")
          + f"wrote {path}")
    return 0


def write_trained(model: Any, spec: Any, test: Any, *, node_data: str | None = None,
                  name: str = "", out: str | None = None) -> Path:
    """Publish a trained model into ``node_data``'s ``private/`` folder, or write it to ``out``:
    the same servable file either way (tokenizer spec, and the score bound ``train_variant``
    measured, checked on all of ``test``: it was measured on the first --eval-articles), so a
    copied ``--out`` file runs the max-free softmax under ``confide infer --private`` too."""
    from confide.node.private_inference import export_model, publish_model

    bound = getattr(model, "softmax_bound", None)
    calibration = test if bound is not None else None
    if node_data:
        return publish_model(model, node_data, name, spec, softmax_bound=bound,
                             calibration=calibration)
    if not out:
        raise ValueError("give node_data or out")
    return export_model(model, out, spec, softmax_bound=bound, calibration=calibration)
