"""AERO: small decoder-only language models built for private inference.

After Jha & Reagen, "AERO: Softmax-Only LLMs for Efficient Private Inference" (2024) and
"Entropy-Guided Attention for Private LLMs" (2025). Under secure two-party computation every
nonlinearity costs rounds and bytes (comparisons, exponentials, reciprocals, square roots), while
linear layers are cheap. AERO removes LayerNorm and GELU so that the softmax inside attention is
the only nonlinearity, and keeps training stable with PI-friendly normalization (weight
normalization, or learnable scalars on the residual branches and attention logits) and an
entropy regularizer that stops attention heads from collapsing or saturating ("entropic
overload").

One configurable model gives both ends of the comparison:

* :meth:`AeroConfig.baseline`: LayerNorm + GELU + FFN, a GPT-2-like decoder;
* :meth:`AeroConfig.softmax_only`: no LayerNorm, no activation (a linear FFN, which the private
  forward merges into one matrix), learnable scalar scaling and entropy regularization.

The layer math is kept simple enough for ``privacy.aero_2pc`` to mirror it exactly:
linear layers, learned absolute positions (no RoPE), causal softmax attention, optional
LayerNorm, and GELU computed as ``x * sigmoid(1.702 x)`` (the sigmoid form, the same formula the
private forward uses; CrypTen has no GELU and its erf diverges for |x| > ~2). A test compares the
two forwards, so the plaintext baseline and the private run compute the same function.

Entropy regularization (training only): for every layer and head, the mean Shannon entropy of
each attention row is kept near ``threshold[layer, head] * ln T`` (a learnable fraction of the
maximum entropy); deviations beyond ``margin * ln T`` are penalized quadratically, summed over
positions, averaged over heads and layers and scaled by ``coeff`` (defaults 1e-5 and 0.2, the
reference implementation's). Unlike the reference example, which reads the first block's
thresholds for every layer, each layer here owns its thresholds.

Weights are saved as safetensors with the config as JSON metadata (never pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "NORMALIZATIONS",
    "AeroConfig",
    "AeroModel",
    "EntropyRegConfig",
    "SigmoidGELU",
    "bbc_token_sequences",
    "default_tokenizer",
    "entropy_penalty",
    "load_aero",
    "make_blocks",
    "perplexity",
    "save_aero",
    "train_aero",
    "vocab_size_of",
]

ACTIVATIONS = ("gelu", "relu", "none")
NORMALIZATIONS = ("none", "weight", "scaled")
MAX_ENTROPY_MODES = ("context", "row")
GELU_SIGMOID_COEF = 1.702  # must equal privacy.aero_2pc.GELU_SIGMOID_COEF (a test checks it)
METADATA_KEY = "confide.aero.config"


def vocab_size_of(vocab: Any) -> int:
    """The vocabulary size of a tokenizer (``len(tokenizer)``, added tokens included) or an int."""
    if isinstance(vocab, bool):
        raise TypeError("vocab must be a tokenizer or an int, not a bool")
    if isinstance(vocab, int):
        return vocab
    try:
        return len(vocab)
    except TypeError:
        name = type(vocab).__name__
        raise TypeError(f"vocab must be a tokenizer or an int, got {name}") from None


@dataclass(frozen=True)
class EntropyRegConfig:
    """Entropy regularization of attention (training only; see the module docstring).

    ``max_entropy`` is ``"context"`` (ln T for every row, as the reference implementation) or
    ``"row"`` (ln(i + 1) for row i: the exact maximum of a causal row).
    """

    enabled: bool = False
    coeff: float = 1e-5
    margin: float = 0.2
    init_fraction: float = 0.5
    max_entropy: str = "context"


@dataclass(frozen=True)
class AeroConfig:
    """The architecture (public: both MPC parties must know it) and initialization."""

    vocab_size: int
    max_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    layernorm: bool = True
    activation: str = "gelu"
    ffn: bool = True
    normalization: str = "none"
    tie_embeddings: bool = True
    ln_eps: float = 1e-5
    init_std: float = 0.02
    seed: int = 0
    entropy_reg: EntropyRegConfig = field(default_factory=EntropyRegConfig)

    def __post_init__(self) -> None:
        if isinstance(self.entropy_reg, Mapping):
            object.__setattr__(self, "entropy_reg", EntropyRegConfig(**self.entropy_reg))
        self.validate()

    @classmethod
    def baseline(cls, vocab: Any, **overrides: Any) -> AeroConfig:
        """LayerNorm + GELU + FFN: the usual decoder, the comparison point."""
        kwargs = {"layernorm": True, "activation": "gelu", "ffn": True, "normalization": "none"}
        return cls(vocab_size=vocab_size_of(vocab), **(kwargs | overrides))

    @classmethod
    def softmax_only(cls, vocab: Any, **overrides: Any) -> AeroConfig:
        """AERO's softmax-only decoder: no LayerNorm, no GELU, scaled branches, entropy reg."""
        kwargs = {"layernorm": False, "activation": "none", "ffn": True,
                  "normalization": "scaled", "entropy_reg": EntropyRegConfig(enabled=True)}
        return cls(vocab_size=vocab_size_of(vocab), **(kwargs | overrides))

    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff"):
            positive_int(name)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                             f"{self.normalization!r}")
        if not (self.ln_eps > 0 and self.init_std > 0):
            raise ValueError("ln_eps and init_std must be > 0")
        reg = self.entropy_reg
        if reg.max_entropy not in MAX_ENTROPY_MODES:
            raise ValueError(f"entropy_reg.max_entropy must be one of {MAX_ENTROPY_MODES}, got "
                             f"{reg.max_entropy!r}")
        if not (reg.coeff >= 0 and reg.margin >= 0):
            raise ValueError("entropy_reg.coeff and entropy_reg.margin must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the architecture keys are what ``privacy.mpc`` reads."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AeroConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown AeroConfig field(s) {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Modules


class SigmoidGELU(nn.Module):
    """GELU as x * sigmoid(1.702 x): the formula the private forward evaluates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(GELU_SIGMOID_COEF * x)


class PILinear(nn.Module):
    """A linear layer, optionally weight-normalized: W = g * v / ||v|| (per output row).

    Weight normalization (Salimans & Kingma 2016) is a static reparametrization: the model owner
    folds it into a plain matrix before private inference, so it costs nothing under MPC.
    """

    def __init__(self, d_in: int, d_out: int, *, weight_norm: bool, std: float) -> None:
        super().__init__()
        self.weight_norm = weight_norm
        v = torch.randn(d_out, d_in) * std
        if weight_norm:
            self.weight_v = nn.Parameter(v)
            self.weight_g = nn.Parameter(v.norm(dim=1))
        else:
            self.weight = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def effective_weight(self) -> torch.Tensor:
        if self.weight_norm:
            return self.weight_g.unsqueeze(1) * self.weight_v / self.weight_v.norm(dim=1,
                                                                                 keepdim=True)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: AeroConfig, layer: int) -> None:
        super().__init__()
        d, wn = cfg.d_model, cfg.normalization == "weight"
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.n_heads, self.d_head = cfg.n_heads, d // cfg.n_heads
        self.q = PILinear(d, d, weight_norm=wn, std=cfg.init_std)
        self.k = PILinear(d, d, weight_norm=wn, std=cfg.init_std)
        self.v = PILinear(d, d, weight_norm=wn, std=cfg.init_std)
        self.o = PILinear(d, d, weight_norm=wn, std=out_std)
        if cfg.normalization == "scaled":
            self.logit_scale = nn.Parameter(torch.ones(cfg.n_heads))
        if cfg.entropy_reg.enabled:
            # this layer's own thresholds (fractions of the maximum entropy), one per head
            self.entropy_threshold = nn.Parameter(
                torch.full((cfg.n_heads,), float(cfg.entropy_reg.init_fraction)))
        self.layer = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape

        def heads(proj: PILinear) -> torch.Tensor:
            return proj(x).view(b, t, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.q), heads(self.k), heads(self.v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        if hasattr(self, "logit_scale"):
            scores = scores * self.logit_scale.view(1, -1, 1, 1)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, d)
        return self.o(out), probs


class FeedForward(nn.Module):
    def __init__(self, cfg: AeroConfig) -> None:
        super().__init__()
        wn = cfg.normalization == "weight"
        self.fc1 = PILinear(cfg.d_model, cfg.d_ff, weight_norm=wn, std=cfg.init_std)
        self.fc2 = PILinear(cfg.d_ff, cfg.d_model, weight_norm=wn,
                            std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        # no module at all for activation="none": the FFN is linear (mergeable into one matrix)
        if cfg.activation == "gelu":
            self.act = SigmoidGELU()
        elif cfg.activation == "relu":
            self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if hasattr(self, "act"):
            h = self.act(h)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, cfg: AeroConfig, layer: int) -> None:
        super().__init__()
        if cfg.layernorm:
            self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        if cfg.ffn:
            if cfg.layernorm:
                self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
            self.ffn = FeedForward(cfg)
        if cfg.normalization == "scaled":
            init = 1.0 / math.sqrt(2 * cfg.n_layers)
            self.attn_scale = nn.Parameter(torch.tensor(init))
            if cfg.ffn:
                self.ffn_scale = nn.Parameter(torch.tensor(init))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attn(self.ln1(x) if hasattr(self, "ln1") else x)
        x = x + (a * self.attn_scale if hasattr(self, "attn_scale") else a)
        if hasattr(self, "ffn"):
            f = self.ffn(self.ln2(x) if hasattr(self, "ln2") else x)
            x = x + (f * self.ffn_scale if hasattr(self, "ffn_scale") else f)
        return x, probs


class AeroModel(nn.Module):
    """The decoder. ``forward(ids) -> logits``; ids are (T,) or (B, T) token ids."""

    def __init__(self, config: AeroConfig) -> None:
        super().__init__()
        self.config = config
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.max_len, config.d_model)
            nn.init.normal_(self.tok_emb.weight, std=config.init_std)
            nn.init.normal_(self.pos_emb.weight, std=config.init_std)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            if config.layernorm:
                self.ln_f = nn.LayerNorm(config.d_model, eps=config.ln_eps)
            if not config.tie_embeddings:
                self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
                nn.init.normal_(self.lm_head.weight, std=config.init_std)
        finally:
            torch.random.set_rng_state(gen_state)

    def _check(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.tok_emb.weight.device).long()
        if ids.dim() not in (1, 2):
            raise ValueError(f"ids must be (T,) or (B, T), got shape {tuple(ids.shape)}")
        t = ids.shape[-1]
        if not 1 <= t <= self.config.max_len:
            raise ValueError(f"sequence length {t} is outside [1, max_len={self.config.max_len}]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def forward_with_attentions(self, ids: torch.Tensor
                                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, attention probabilities per layer, each (B, H, T, T))."""
        ids = self._check(ids)
        single = ids.dim() == 1
        if single:
            ids = ids.unsqueeze(0)
        t = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t, device=ids.device))
        attentions = []
        for block in self.blocks:
            x, probs = block(x)
            attentions.append(probs)
        if hasattr(self, "ln_f"):
            x = self.ln_f(x)
        head = self.lm_head.weight if hasattr(self, "lm_head") else self.tok_emb.weight
        logits = x @ head.t()
        return (logits[0] if single else logits), attentions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attentions(ids)[0]

    def attention_entropies(self, ids: torch.Tensor) -> torch.Tensor:
        """Shannon entropy (nats) of every attention row: (layers, B, heads, T)."""
        _, attentions = self.forward_with_attentions(ids)
        return attention_entropy(attentions)

    def entropy_thresholds(self) -> torch.Tensor:
        """The learnable thresholds, (layers, heads), as fractions of the maximum entropy."""
        if not self.config.entropy_reg.enabled:
            raise ValueError("this model was built without entropy regularization")
        return torch.stack([block.attn.entropy_threshold for block in self.blocks])

    def entropy_penalty(self, attentions_or_entropies: Sequence[torch.Tensor] | torch.Tensor
                        ) -> torch.Tensor:
        """The regularizer for this model's thresholds and settings (0 when disabled)."""
        reg = self.config.entropy_reg
        if not reg.enabled:
            return torch.zeros((), device=self.tok_emb.weight.device)
        ent = attentions_or_entropies
        if not torch.is_tensor(ent):
            ent = attention_entropy(ent)
        return entropy_penalty(ent, self.entropy_thresholds(), margin=reg.margin,
                               coeff=reg.coeff, max_entropy=reg.max_entropy)


def attention_entropy(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entropies (layers, B, H, T) of attention probabilities [(B, H, T, T)] (0 log 0 = 0).

    The log is clamped so masked (exactly 0) probabilities get a finite gradient (entr's
    derivative is infinite at 0, which turns the backward pass into NaN).
    """
    return torch.stack([-(p * p.clamp_min(1e-12).log()).sum(dim=-1) for p in attentions])


def entropy_penalty(entropies: torch.Tensor, thresholds: torch.Tensor, *, margin: float = 0.2,
                    coeff: float = 1e-5, max_entropy: str = "context") -> torch.Tensor:
    """Entropy regularization loss.

    ``entropies`` (L, B, H, T) in nats, ``thresholds`` (L, H) as fractions of the maximum
    entropy (ln T, or ln(i + 1) per row with ``max_entropy="row"``). A row whose entropy is
    within ``margin * max`` of ``threshold * max`` costs nothing; outside, its squared deviation
    counts. Summed over batch and positions, averaged over heads and layers, times ``coeff``.
    """
    if entropies.dim() != 4 or thresholds.shape != (entropies.shape[0], entropies.shape[2]):
        raise ValueError(f"entropies must be (L, B, H, T) and thresholds (L, H); got "
                         f"{tuple(entropies.shape)} and {tuple(thresholds.shape)}")
    t = entropies.shape[-1]
    if max_entropy == "context":
        max_ent = torch.full((t,), math.log(t), device=entropies.device)
    elif max_entropy == "row":
        max_ent = torch.log(torch.arange(1, t + 1, device=entropies.device, dtype=torch.float32))
    else:
        raise ValueError(f"max_entropy must be one of {MAX_ENTROPY_MODES}, got {max_entropy!r}")
    target = thresholds[:, None, :, None] * max_ent
    deviation = entropies - target
    outside = deviation.abs() > margin * max_ent
    penalty = torch.where(outside, deviation, torch.zeros_like(deviation)).square()
    per_layer_head = penalty.sum(dim=(1, 3))  # (L, H)
    return coeff * per_layer_head.mean()


# --------------------------------------------------------------------------------------------
# Data, training, evaluation


def default_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer (30,522 tokens, on disk offline; ``node.models``).

    The cheaper of the two offline tokenizers for private inference: under MPC the one-hot
    input (T x V) and the embedding and output matrices (V x d) are opened once per forward
    each, so bytes grow with V (SmolLM2's has 49,152 tokens).
    """
    from confide.node.models import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(base="minilm"))


def bbc_token_sequences(tokenizer: Any, limit: int | None = None) -> list[list[int]]:
    """BBC News articles (``node.data.bbc_news``, offline) tokenized with ``tokenizer``."""
    from confide.node.data import bbc_news

    examples, _ = bbc_news()
    if limit is not None:
        examples = examples[:limit]
    # whole articles: training cuts them into blocks (make_blocks), so no truncation here
    return [list(tokenizer(ex.text, add_special_tokens=True, verbose=False)["input_ids"])
            for ex in examples]


def make_blocks(sequences: Iterable[Sequence[int]], block_len: int) -> torch.Tensor:
    """Concatenate the sequences and cut them into (N, block_len) training blocks."""
    if block_len < 2:
        raise ValueError("block_len must be >= 2 (an input and its next-token target)")
    flat = [int(tok) for seq in sequences for tok in seq]
    n = len(flat) // block_len
    if n == 0:
        raise ValueError(f"{len(flat)} tokens do not fill one block of {block_len}")
    return torch.tensor(flat[: n * block_len], dtype=torch.long).view(n, block_len)


def _lm_loss(model: AeroModel, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits, attentions = model.forward_with_attentions(batch[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return ce, attentions


def train_aero(model: AeroModel, sequences: Sequence[Sequence[int]], *, steps: int = 100,
               batch_size: int = 8, block_len: int | None = None, lr: float = 3e-4,
               weight_decay: float = 0.01, grad_clip: float | None = 1.0, seed: int = 0,
               progress: bool = False) -> list[dict[str, float]]:
    """Next-token training with AdamW (+ the entropy regularizer when enabled).

    ``block_len`` defaults to ``max_len + 1`` (inputs of max_len tokens). Returns one record per
    step: ``loss`` (total), ``ce`` and ``entropy_penalty``.
    """
    block_len = block_len or model.config.max_len + 1
    if block_len - 1 > model.config.max_len:
        raise ValueError(f"block_len {block_len} exceeds max_len + 1 = {model.config.max_len + 1}")
    blocks = make_blocks(sequences, block_len)
    device = model.tok_emb.weight.device
    rng = random.Random(seed)
    order: list[int] = []
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "emb" not in name else no_decay).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    iterator: Iterable[int] = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        iterator = bar = tqdm(iterator, desc="train aero", unit="step")
    history = []
    model.train()
    for _ in iterator:
        if len(order) < batch_size:
            fresh = list(range(len(blocks)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = blocks[idx].to(device)
        ce, attentions = _lm_loss(model, batch)
        reg = model.entropy_penalty(attentions)
        loss = ce + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        record = {"loss": loss.item(), "ce": ce.item(), "entropy_penalty": reg.item()}
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.eval()
    return history


@torch.no_grad()
def perplexity(model: AeroModel, sequences: Sequence[Sequence[int]], *,
               block_len: int | None = None, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over the sequences cut into blocks."""
    block_len = block_len or model.config.max_len + 1
    blocks = make_blocks(sequences, block_len).to(model.tok_emb.weight.device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        ce, _ = _lm_loss(model, batch)
        n = batch[:, 1:].numel()
        total += float(ce) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------
# Files


def save_aero(model: AeroModel, path: Path | str) -> Path:
    """Write the weights as safetensors with the config as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(model.config.to_dict()),
                                            "format": "pt"})
    return path


def load_aero(path: Path | str) -> AeroModel:
    """Rebuild a model saved by :func:`save_aero` (config from the metadata, strict keys)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not an AERO model file (no {METADATA_KEY} metadata)")
        config = AeroConfig.from_dict(json.loads(metadata[METADATA_KEY]))
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    model = AeroModel(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
