"""Cutting a transformers model into a U-shaped split: device head, server body, device tail.

SFPrompt (``node.methods.sfprompt``) trains a model that no single party holds whole::

    device                          server                          device
    ids --> DeviceHead ---------->  ServerBody  ---------------->  DeviceTail --> loss(labels)
            prompts ++ embeddings   middle layers                  last layers, final norm or
            first ``head_layers``   (frozen unless the job          pooler, output head
            layers                  trains it)

- ``DeviceHead.forward(input_ids, attention_mask) -> hidden`` (B, P+T, H): the soft prompts
  (P trainable vectors) are prepended at the *input embedding* level,
  ``inputs_embeds = cat(prompts, word_embeddings(ids))``, and the mask is extended with P ones
  (``DeviceHead.extend_mask``). The unsplit reference is therefore exactly the Hugging Face model
  called with ``inputs_embeds=head.embed(ids), attention_mask=head.extend_mask(mask)``.
- ``ServerBody.forward(hidden, attention_mask) -> hidden``: needs only the hidden states and the
  (B, P+T) 0/1 mask. Positions are public shape information: Llama positions are
  ``arange(P+T)`` (what transformers uses when no position ids are given; batches are padded
  on the right), rotary embeddings are recomputed from them by every party, and the causal or
  bidirectional 4D mask is rebuilt from the 2D one with transformers' own mask functions, so
  the split runs the very same attention kernels as the whole model. Never token ids or labels.
- ``DeviceTail.forward(hidden, attention_mask, labels) -> (loss, logits)``:
  BERT classification: ``pooler`` (tanh(dense(h[:, 0]))) -> dropout -> ``classifier``. The
  pooler reads position 0, which is the first soft prompt (the [CLS] token sits at position P):
  the prompt acts as a learned [CLS] vector; the pretrained pooler is unchanged.
  Llama causal LM: ``norm`` -> ``lm_head`` over all P+T positions (logits (B, P+T, V), as
  transformers returns them); labels (B, T) are padded with -100 on the prompt positions and
  shifted inside the tail, so position P-1 (the last prompt) predicts the first token and no
  prompt position is ever a target.
  Llama sequence classification: ``norm`` -> ``score`` on the last position whose mask is 1
  (transformers reads the last non-pad *token id*; the tail has no ids, the mask says the
  same for right-padded batches).

What is trainable (``split_model`` sets ``requires_grad``): the prompts; with ``train_tail``
every parameter of the tail except a causal LM's ``lm_head`` (vocabulary-sized and, for
SmolLM2, tied to the input embeddings: training it would ship the whole vocabulary matrix every
round; ``train_lm_head`` opts in); nothing of the head's embeddings or layers; nothing of the
body (the server decides; see ``node.split.body.LocalBody``).

The parts share the original model's submodules (no copies). ``device_parts`` and
``server_part`` strip the model of what the other side holds, so a device never keeps the body
and a server never keeps the embeddings or the output head; ``build_split`` builds them from a
``ModelConfig`` (seeded: every party gets the same weights). ``split_costs`` counts parameters and
estimates FLOPs per position for each part, for the device's share of the model and compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from confide.node.methods.sfprompt import SFPromptConfig
from confide.node.models import ModelConfig, base_model_and_tokenizer

__all__ = [
    "DeviceHead",
    "DeviceTail",
    "PartCost",
    "ServerBody",
    "SplitConfig",
    "SplitCosts",
    "SplitParts",
    "build_split",
    "device_parts",
    "server_part",
    "split_costs",
    "split_model",
]

ROLES = ("all", "device", "server")


@dataclass(frozen=True)
class SplitConfig:
    """Where to cut and what the device trains.

    ``head_layers``: transformer layers on the device before the body (>= 1). Neither one nor
    four layers hide the text: a nearest-neighbour lookup in the public embedding table turns
    the hidden states back into the tokens (``node.split.attacks``, ``confide bench split
    --attack``). ``tail_layers``: layers on the device after the body (0: the tail is only
    the final norm / pooler and the output head). ``num_prompts``: soft prompt vectors, drawn
    from the vocabulary embeddings with ``prompt_seed`` (the job's seed: the same on every
    device). ``train_tail``: train the tail's parameters as well as the prompts.
    ``train_lm_head``: also train a causal LM's vocabulary projection (off by default, see the
    module docstring).
    """

    head_layers: int = 1
    tail_layers: int = 1
    num_prompts: int = 8
    prompt_seed: int = 0
    train_tail: bool = True
    train_lm_head: bool = False

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for values no split can use."""
        for name, low in (("head_layers", 1), ("tail_layers", 0), ("num_prompts", 0),
                          ("prompt_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = (
                    " (the device must run at least one layer; even then the hidden states give "
                    "the text away: see node.split.attacks)" if name == "head_layers" else ""
                )
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}{hint}")
        for name in ("train_tail", "train_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.num_prompts == 0 and not self.train_tail:
            raise ValueError(
                "nothing to train: num_prompts is 0 and train_tail is false; use prompts, "
                "a trainable tail, or both"
            )

    @classmethod
    def from_method(cls, config: SFPromptConfig, seed: int) -> SplitConfig:
        """The split an SFPrompt job asks for; ``seed`` is the job's ``ModelConfig.seed``."""
        return cls(
            head_layers=config.head_layers,
            tail_layers=config.tail_layers,
            num_prompts=config.num_prompts,
            prompt_seed=seed,
            train_tail=config.train_tail,
            train_lm_head=config.train_lm_head,
        )


# --------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class _Anatomy:
    """Where the pieces of a supported model live."""

    family: str  # "bert" | "llama"
    task: str  # "sequence-classification" | "causal-lm"
    container: nn.ModuleList  # the transformer layers
    rotary: nn.Module | None


def _anatomy(model: nn.Module) -> _Anatomy:
    if isinstance(model, BertForSequenceClassification):
        if model.config.is_decoder or model.bert.pooler is None:
            raise ValueError(
                "only encoder BERT classifiers with a pooler can be split (is_decoder=False, "
                "add_pooling_layer=True)"
            )
        return _Anatomy("bert", "sequence-classification", model.bert.encoder.layer, None)
    if isinstance(model, LlamaForCausalLM | LlamaForSequenceClassification):
        task = "causal-lm" if isinstance(model, LlamaForCausalLM) else "sequence-classification"
        return _Anatomy("llama", task, model.model.layers, model.model.rotary_emb)
    hint = ""
    if hasattr(model, "peft_config"):
        hint = " (a PEFT-wrapped model: split the base model, SFPrompt trains prompts, not LoRA)"
    raise ValueError(
        f"cannot split {type(model).__name__}{hint}: supported are BertForSequenceClassification "
        "(tiny-bert, minilm), LlamaForCausalLM and LlamaForSequenceClassification (tiny-llama, "
        "smollm2)"
    )


def _check_cut(num_layers: int, cfg: SplitConfig) -> None:
    if cfg.head_layers + cfg.tail_layers >= num_layers:
        raise ValueError(
            f"head_layers={cfg.head_layers} + tail_layers={cfg.tail_layers} leaves no layer for "
            f"the server: the model has {num_layers} layers; use at most {num_layers - 1} "
            "layers on the device in total"
        )


class _LayerStack(nn.Module):
    """A run of consecutive transformer layers, called as the whole model would call them."""

    def __init__(self, family: str, config: Any, layers: Iterable[nn.Module],
                 rotary: nn.Module | None) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.layers = nn.ModuleList(layers)
        # Buffers only (inverse frequencies): every Llama part holds one.
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 0:
            return hidden
        if self.family == "bert":
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
            for layer in self.layers:
                hidden = layer(hidden, mask)
            return hidden
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
            )
        return hidden

    def attention_width(self) -> int:
        """Query width (heads x head dim) of one layer: what the attention matmuls scale with."""
        if self.family == "bert":
            return int(self.config.num_attention_heads * (
                self.config.hidden_size // self.config.num_attention_heads
            ))
        head_dim = getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads
        )
        return int(self.config.num_attention_heads * head_dim)


def _check_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor, width: int,
                  what: str) -> None:
    if not hidden.is_floating_point() or hidden.dim() != 3 or hidden.shape[-1] != width:
        raise ValueError(
            f"{what} expects floating hidden states of shape (batch, length, {width}), got "
            f"{hidden.dtype} {tuple(hidden.shape)}"
        )
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{what} expects an attention mask of shape {tuple(hidden.shape[:2])} (batch, "
            f"length), got {tuple(attention_mask.shape)}"
        )


# --------------------------------------------------------------------------------------------
# The three parts


class DeviceHead(nn.Module):
    """Embeddings, soft prompts and the first ``head_layers`` layers (on the device)."""

    def __init__(self, anatomy: _Anatomy, model: PreTrainedModel, num_layers: int,
                 num_prompts: int, prompt_seed: int) -> None:
        super().__init__()
        self.family = anatomy.family
        self.task = anatomy.task
        self.num_prompts = num_prompts
        self.hidden_size = int(model.config.hidden_size)
        if anatomy.family == "bert":
            # word + position + token-type embeddings, LayerNorm, dropout: all run on the
            # prompt-extended input, as BertModel runs them on ``inputs_embeds``.
            self.embeddings = model.bert.embeddings
            word = self.embeddings.word_embeddings
            self.max_positions: int | None = int(model.config.max_position_embeddings)
        else:
            self.embeddings = model.model.embed_tokens
            word = self.embeddings
            self.max_positions = None  # rotary positions have no table to run off
        self.stack = _LayerStack(anatomy.family, model.config,
                                 list(anatomy.container[:num_layers]), anatomy.rotary)
        self.prompts = nn.Parameter(_initial_prompts(word, num_prompts, prompt_seed))

    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings if self.family == "bert" else self.embeddings

    @property
    def max_tokens(self) -> int | None:
        """The most tokens a sequence may have next to the prompts (BERT: position table)."""
        return None if self.max_positions is None else self.max_positions - self.num_prompts

    def extend_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, P+T): ones for the prompt positions, same dtype."""
        ones = attention_mask.new_ones((attention_mask.shape[0], self.num_prompts))
        return torch.cat([ones, attention_mask], dim=1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` of the prompt-extended sequence: cat(prompts, word_embeddings(ids))."""
        words = self.word_embeddings()(input_ids)
        prompts = self.prompts.to(words.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return torch.cat([prompts, words], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.max_tokens is not None and input_ids.shape[1] > self.max_tokens:
            raise ValueError(
                f"{input_ids.shape[1]} tokens + {self.num_prompts} prompts exceed the model's "
                f"{self.max_positions} positions; truncate to at most {self.max_tokens} tokens"
            )
        hidden = self.embed(input_ids)
        if self.family == "bert":
            hidden = self.embeddings(inputs_embeds=hidden)
        return self.stack(hidden, self.extend_mask(attention_mask))


class ServerBody(nn.Module):
    """The middle layers (on the server): hidden states and a 2D mask in, hidden states out."""

    def __init__(self, anatomy: _Anatomy, model: PreTrainedModel, start: int, stop: int) -> None:
        super().__init__()
        self.family = anatomy.family
        self.hidden_size = int(model.config.hidden_size)
        self.first_layer = start
        self.stack = _LayerStack(anatomy.family, model.config,
                                 list(anatomy.container[start:stop]), anatomy.rotary)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _check_inputs(hidden, attention_mask, self.hidden_size, "the server body")
        return self.stack(hidden, attention_mask)


class DeviceTail(nn.Module):
    """The last ``tail_layers`` layers, the final norm or pooler and the output head (device)."""

    def __init__(self, anatomy: _Anatomy, model: PreTrainedModel, start: int,
                 num_prompts: int) -> None:
        super().__init__()
        self.family = anatomy.family
        self.task = anatomy.task
        self.num_prompts = num_prompts
        self.hidden_size = int(model.config.hidden_size)
        self.stack = _LayerStack(anatomy.family, model.config,
                                 list(anatomy.container[start:]), anatomy.rotary)
        self.num_labels: int | None
        if anatomy.family == "bert":
            self.pooler = model.bert.pooler
            self.dropout = model.dropout
            self.classifier = model.classifier
            self.num_labels = int(model.classifier.out_features)
        else:
            self.norm = model.model.norm
            if anatomy.task == "causal-lm":
                self.lm_head = model.lm_head
                self.num_labels = None
            else:
                self.score = model.score
                self.num_labels = int(model.score.out_features)

    def output_head_names(self) -> tuple[str, ...]:
        """Submodules that map the last hidden state to logits (and are not layers)."""
        if self.family == "bert":
            return ("pooler", "classifier")
        return ("norm", "lm_head") if self.task == "causal-lm" else ("norm", "score")

    def sequence_level(self) -> tuple[nn.Module, ...]:
        """Linear maps applied once per sequence rather than once per position."""
        if self.family == "bert":
            return (self.pooler.dense, self.classifier)
        return () if self.task == "causal-lm" else (self.score,)

    def full_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Causal LM: (B, T) token labels -> (B, P+T) with -100 on the prompt positions."""
        pad = labels.new_full((labels.shape[0], self.num_prompts), -100)
        return torch.cat([pad, labels], dim=1)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        _check_inputs(hidden, attention_mask, self.hidden_size, "the device tail")
        hidden = self.stack(hidden, attention_mask)
        if self.family == "bert":
            logits = self.classifier(self.dropout(self.pooler(hidden)))
            loss = None if labels is None else nn.functional.cross_entropy(
                logits.view(-1, self.num_labels), labels.view(-1)
            )
            return loss, logits
        hidden = self.norm(hidden)
        if self.task == "causal-lm":
            logits = self.lm_head(hidden)
            loss = None
            if labels is not None:
                # transformers' ForCausalLMLoss: float logits, pad-then-shift, mean over targets
                shifted = nn.functional.pad(self.full_labels(labels), (0, 1), value=-100)[:, 1:]
                loss = nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1).to(logits.device),
                    ignore_index=-100,
                )
            return loss, logits
        positions = torch.arange(attention_mask.shape[1], device=hidden.device)
        last = (positions * (attention_mask != 0).to(positions.dtype)).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.score(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(
            logits.view(-1, self.num_labels), labels.view(-1)
        )
        return loss, logits


def _initial_prompts(word: nn.Embedding, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of the vocabulary embeddings (never the padding row), seeded."""
    weight = word.weight.detach()
    vocab = weight.shape[0]
    pad = word.padding_idx
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    drawable = vocab - (1 if pad is not None else 0)
    index = torch.randint(0, max(drawable, 1), (count,), generator=generator)
    if pad is not None:
        index = index + (index >= pad).to(index.dtype)  # skip the padding row
    return weight[index.to(weight.device)].clone().to(torch.float32)


# --------------------------------------------------------------------------------------------
# Splitting


def split_model(
    model: PreTrainedModel, cfg: SplitConfig
) -> tuple[DeviceHead, ServerBody, DeviceTail]:
    """Cut ``model`` into head / body / tail sharing its submodules, and set what trains.

    The model stays whole (its parts are shared, not copied): calling it still works, which is
    what the equality tests use. ``device_parts`` / ``server_part`` drop the other side.
    """
    cfg.validate()
    anatomy = _anatomy(model)
    n = len(anatomy.container)
    _check_cut(n, cfg)
    if anatomy.family == "bert" and cfg.num_prompts >= model.config.max_position_embeddings:
        raise ValueError(
            f"num_prompts={cfg.num_prompts} leaves no position for tokens: BERT has "
            f"{model.config.max_position_embeddings} positions"
        )
    head = DeviceHead(anatomy, model, cfg.head_layers, cfg.num_prompts, cfg.prompt_seed)
    body = ServerBody(anatomy, model, cfg.head_layers, n - cfg.tail_layers)
    tail = DeviceTail(anatomy, model, n - cfg.tail_layers, cfg.num_prompts)
    for param in model.parameters():
        param.requires_grad_(False)
    for part in (head, body, tail):
        for param in part.parameters():
            param.requires_grad_(False)
    head.prompts.requires_grad_(cfg.num_prompts > 0)
    if cfg.train_tail:
        for name, param in tail.named_parameters():
            if name.startswith("lm_head.") and not cfg.train_lm_head:
                continue
            param.requires_grad_(param.is_floating_point())
    return head, body, tail


def _strip(model: PreTrainedModel, anatomy: _Anatomy, keep_layers: set[int],
           keep_ends: bool) -> None:
    """Remove from ``model`` what its new owner does not hold (the model is unusable after)."""
    for index in sorted(set(range(len(anatomy.container))) - keep_layers, reverse=True):
        del anatomy.container[index]
    if keep_ends:
        return
    if anatomy.family == "bert":
        model.bert.embeddings = nn.Identity()
        model.bert.pooler = None
        model.classifier = nn.Identity()
    else:
        model.model.embed_tokens = nn.Identity()
        model.model.norm = nn.Identity()
        if anatomy.task == "causal-lm":
            model.lm_head = nn.Identity()
        else:
            model.score = nn.Identity()


def device_parts(model: PreTrainedModel, cfg: SplitConfig) -> tuple[DeviceHead, DeviceTail]:
    """The device's head and tail; the body layers are removed from ``model`` (it is consumed:
    do not call it afterwards), so they are freed once the caller drops the model."""
    head, body, tail = split_model(model, cfg)
    anatomy = _anatomy(model)
    n = len(anatomy.container)
    keep = set(range(cfg.head_layers)) | set(range(n - cfg.tail_layers, n))
    del body
    _strip(model, anatomy, keep, keep_ends=True)
    return head, tail


def server_part(model: PreTrainedModel, cfg: SplitConfig) -> ServerBody:
    """The server's body; embeddings, head and tail layers and the output head are removed
    from ``model`` (it is consumed)."""
    head, body, tail = split_model(model, cfg)
    anatomy = _anatomy(model)
    n = len(anatomy.container)
    del head, tail
    _strip(model, anatomy, set(range(cfg.head_layers, n - cfg.tail_layers)), keep_ends=False)
    return body


@dataclass
class SplitParts:
    """What ``build_split`` hands to one party (None: held by the other side)."""

    head: DeviceHead | None
    body: ServerBody | None
    tail: DeviceTail | None
    tokenizer: PreTrainedTokenizerBase | None


def build_split(
    model_cfg: ModelConfig,
    split_cfg: SplitConfig,
    role: str = "all",
    cache_dir: Path | str | None = None,
) -> SplitParts:
    """Build the seeded base of ``model_cfg`` and keep what ``role`` holds.

    ``"device"``: head, tail and the tokenizer; ``"server"``: the body only (no tokenizer: the
    server never sees text); ``"all"``: everything (tests, single-process runs). Every party
    building the same ``ModelConfig`` gets the same weights, prompts included
    (``split_cfg.prompt_seed``). The full model exists briefly while it is cut.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    model_cfg.validate()
    split_cfg.validate()
    model, tokenizer = base_model_and_tokenizer(model_cfg, cache_dir)
    if role == "device":
        head, tail = device_parts(model, split_cfg)
        return SplitParts(head, None, tail, tokenizer)
    if role == "server":
        return SplitParts(None, server_part(model, split_cfg), None, None)
    head, body, tail = split_model(model, split_cfg)
    return SplitParts(head, body, tail, tokenizer)


# --------------------------------------------------------------------------------------------
# Costs


@dataclass(frozen=True)
class PartCost:
    """Size and compute of one part, per position of a (P+T)-long sequence.

    ``forward_flops``: 2 x (multiply-adds of every linear map) + the attention matmuls
    (QK^T and AV: 4 x L x query width per layer); linear maps applied once per sequence
    (pooler, classifier, score) are divided by L; embedding lookups, norms, activations and
    softmax are not counted. ``train_flops``: forward + backward; the backward of a linear map
    costs 2x its forward for the input gradient (always needed: the prompts sit below
    everything) plus 2x for the weight gradient when the weight trains; attention's backward
    costs 2x its forward.
    """

    params: int
    trainable_params: int
    forward_flops: float
    train_flops: float


@dataclass(frozen=True)
class SplitCosts:
    """``split_costs`` result: the three parts and the device's shares of the whole."""

    seq_len: int
    head: PartCost
    body: PartCost
    tail: PartCost
    total_params: int  # unique parameters of the whole model (a tied weight counts once)
    device_params: int  # unique parameters the device holds (head + tail)

    @property
    def device_param_share(self) -> float:
        return self.device_params / self.total_params

    @property
    def device_flop_share(self) -> float:
        device = self.head.forward_flops + self.tail.forward_flops
        return device / (device + self.body.forward_flops)

    @property
    def device_train_flop_share(self) -> float:
        """The device's part of one SFPrompt training step (head + tail, forward and
        backward) against the whole step's (the server's frozen body included)."""
        device = self.head.train_flops + self.tail.train_flops
        return device / (device + self.body.train_flops)

    @property
    def device_vs_full_finetuning(self) -> float:
        """The device's training FLOPs per position against full fine-tuning of the whole
        model on the device (3x its forward: the paper's comparison, 0.46% for ViT)."""
        forward = self.head.forward_flops + self.body.forward_flops + self.tail.forward_flops
        return (self.head.train_flops + self.tail.train_flops) / (3.0 * forward)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["device_param_share"] = self.device_param_share
        out["device_flop_share"] = self.device_flop_share
        out["device_train_flop_share"] = self.device_train_flop_share
        out["device_vs_full_finetuning"] = self.device_vs_full_finetuning
        return out


def _part_cost(part: nn.Module, stack: _LayerStack, seq_len: int,
               per_sequence: tuple[nn.Module, ...] = ()) -> PartCost:
    params = {id(p): p for p in part.parameters()}
    per_seq_ids = {id(m) for m in per_sequence}
    forward = 0.0
    train = 0.0
    for module in part.modules():
        if not isinstance(module, nn.Linear):
            continue
        macs = module.in_features * module.out_features
        scale = 1.0 / seq_len if id(module) in per_seq_ids else 1.0
        forward += 2.0 * macs * scale
        train += (2.0 + 2.0 + (2.0 if module.weight.requires_grad else 0.0)) * macs * scale
    attention = 4.0 * seq_len * stack.attention_width() * len(stack.layers)
    forward += attention
    train += 3.0 * attention
    return PartCost(
        params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        forward_flops=forward,
        train_flops=train,
    )


def split_costs(head: DeviceHead, body: ServerBody, tail: DeviceTail, seq_len: int) -> SplitCosts:
    """Parameters and FLOPs per position of each part for sequences of ``seq_len`` positions
    (prompts included), and the device's shares. Call it with the trainable flags set as
    training will run (``split_model`` sets them; a trained body adds its weight gradients)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    device_ids = {id(p): p for part in (head, tail) for p in part.parameters()}
    all_ids = dict(device_ids)
    all_ids.update({id(p): p for p in body.parameters()})
    return SplitCosts(
        seq_len=seq_len,
        head=_part_cost(head, head.stack, seq_len),
        body=_part_cost(body, body.stack, seq_len),
        tail=_part_cost(tail, tail.stack, seq_len, tail.sequence_level()),
        total_params=sum(p.numel() for p in all_ids.values()),
        device_params=sum(p.numel() for p in device_ids.values()),
    )
