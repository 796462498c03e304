"""What an honest-but-curious split-server recovers of a device's text from the activations.

The attacker holds only public things: the base model's weights (so the public word- and
position-embedding tables and the public, untrained head), the job's parameters (prompt count
and seed, head layers, the defence and its scale, not the device's noise seed or private
adapter), and public text disjoint from the victim's. It sees the hidden states (B, P+T, H)
and the mask that cross the seam. Attacks:

- ``nearest_embedding``: subtract what the server knows was added (BERT: the position and
  token-type embeddings of each position), then take the row of the public word-embedding
  table nearest by cosine. No training, no knowledge of the text.
- ``LearnedInverse``: an MLP the server trains on public text run through its best guess of
  the head (the public head, with the job's public defence applied with the server's own
  noise): hidden state -> a vector scored by cosine against the public embedding table (so
  tokens absent from the public text are still reachable).

Metric (``recovery``): the share of the device's tokens recovered exactly (special tokens and
padding excluded), and the share of label-bearing tokens (those of words that start with a
capital letter or hold a digit in the original text: names, places, numbers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Captured", "LearnedInverse", "capture", "label_bearing", "nearest_embedding",
           "recovery"]

Defence = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Captured:
    """Activations as the server sees them, with the truth the attack is scored against.

    ``hidden`` (N, P+T, H) float32; ``ids`` (N, T); ``scored`` (N, T) bool: real tokens (not
    padding or special tokens); ``labelled`` (N, T) bool: tokens of label-bearing words."""

    hidden: torch.Tensor
    ids: torch.Tensor
    scored: torch.Tensor
    labelled: torch.Tensor
    num_prompts: int


def label_bearing(text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: does it belong to a word (whitespace-separated) that starts with a capital
    letter or contains a digit? Special tokens (empty spans) are not."""
    out = []
    for start, end in offsets:
        if end <= start:
            out.append(False)
            continue
        left = text.rfind(" ", 0, start) + 1
        right = text.find(" ", end)
        word = text[left:right if right >= 0 else len(text)].strip("\"'([{")
        out.append(bool(word) and (word[0].isupper() or any(c.isdigit() for c in word)))
    return out


@torch.no_grad()
def capture(head: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int,
            batch_size: int = 8, defence: Defence | None = None) -> Captured:
    """Run ``texts`` through ``head`` (eval mode) and apply ``defence`` as the device would
    before sending; keeps what the server receives and the truth to score against."""
    hidden_parts, ids_parts, scored_parts, labelled_parts = [], [], [], []
    was_training = head.training
    head.eval()
    try:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tokenizer(chunk, truncation=True, max_length=max_length, padding="max_length",
                            return_tensors="pt", return_offsets_mapping=True,
                            return_special_tokens_mask=True)
            hidden = head(enc["input_ids"], enc["attention_mask"]).float()
            if defence is not None:
                hidden = defence(hidden)
            hidden_parts.append(hidden)
            ids_parts.append(enc["input_ids"])
            scored_parts.append((enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0))
            labelled_parts.append(torch.tensor(
                [label_bearing(t, o.tolist()) for t, o in zip(chunk, enc["offset_mapping"],
                                                             strict=True)], dtype=torch.bool))
    finally:
        head.train(was_training)
    scored = torch.cat(scored_parts)
    return Captured(torch.cat(hidden_parts), torch.cat(ids_parts), scored,
                    torch.cat(labelled_parts) & scored, int(head.num_prompts))


def _public_offsets(head: nn.Module, length: int) -> torch.Tensor | None:
    """What the embedding layer adds per position, known to the server (BERT: position +
    token-type 0 embeddings, (length, H)); None for rotary models (nothing is added)."""
    if head.family != "bert":
        return None
    emb = head.embeddings
    positions = emb.position_embeddings.weight[:length]
    return positions + emb.token_type_embeddings.weight[0]


@torch.no_grad()
def nearest_embedding(captured: Captured, head: nn.Module, chunk: int = 4096) -> torch.Tensor:
    """(N, T) token guesses: each token position's hidden state, less the public position
    embedding, matched by cosine to the public word-embedding table."""
    table = nn.functional.normalize(head.word_embeddings().weight.detach().float(), dim=-1)
    p = captured.num_prompts
    hidden = captured.hidden
    offsets = _public_offsets(head, hidden.shape[1])
    if offsets is not None:
        hidden = hidden - offsets.float().unsqueeze(0)
    tokens = nn.functional.normalize(hidden[:, p:], dim=-1).reshape(-1, hidden.shape[-1])
    guesses = torch.cat([(tokens[i:i + chunk] @ table.t()).argmax(-1)
                         for i in range(0, tokens.shape[0], chunk)])
    return guesses.view(captured.ids.shape)


class LearnedInverse(nn.Module):
    """hidden state -> token, an MLP into embedding space scored by cosine against the public
    table (temperature learned), trained by the server on public text."""

    def __init__(self, hidden_size: int, table: torch.Tensor, width: int = 1024) -> None:
        super().__init__()
        self.register_buffer("table", nn.functional.normalize(table.detach().float(), dim=-1))
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width),
                                 nn.GELU(), nn.Linear(width, table.shape[1]))
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the table (or over its ``rows`` only)."""
        out = nn.functional.normalize(self.net(hidden), dim=-1)
        table = self.table if rows is None else self.table[rows]
        return self.log_scale.exp() * out @ table.t()

    def fit(self, public: Captured, *, steps: int = 300, batch_size: int = 256,
            negatives: int = 2048, lr: float = 2e-3, seed: int = 0) -> float:
        """Train on the public capture's scored token positions with a sampled softmax (the
        batch's targets plus ``negatives`` random rows of the table: a full softmax over the
        vocabulary costs minutes per model on a CPU); returns the last loss."""
        p = public.num_prompts
        x = public.hidden[:, p:][public.scored]
        y = public.ids[public.scored]
        if x.shape[0] == 0:
            raise ValueError("no public tokens to train the inverse on")
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr)
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        vocab = self.table.shape[0]
        loss = torch.tensor(float("nan"))
        self.train()
        for _ in range(steps):
            index = torch.tensor([rng.randrange(x.shape[0]) for _ in range(batch_size)])
            drawn = torch.randint(0, vocab, (negatives,), generator=generator)
            rows, target = torch.unique(torch.cat([y[index], drawn]), return_inverse=True)
            loss = nn.functional.cross_entropy(self(x[index], rows), target[:batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def guess(self, captured: Captured, chunk: int = 4096) -> torch.Tensor:
        self.eval()
        p = captured.num_prompts
        tokens = captured.hidden[:, p:].reshape(-1, captured.hidden.shape[-1])
        guesses = torch.cat([self(tokens[i:i + chunk]).argmax(-1)
                             for i in range(0, tokens.shape[0], chunk)])
        return guesses.view(captured.ids.shape)


def recovery(guesses: torch.Tensor, captured: Captured) -> dict[str, float]:
    """Share of tokens recovered exactly, overall and of label-bearing words."""
    hit = guesses == captured.ids
    tokens = int(captured.scored.sum())
    labelled = int(captured.labelled.sum())
    return {
        "tokens": float(hit[captured.scored].sum()) / max(tokens, 1),
        "label_tokens": float(hit[captured.labelled].sum()) / max(labelled, 1),
        "num_tokens": tokens,
        "num_label_tokens": labelled,
    }
