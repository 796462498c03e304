"""The node's side of Minions: its private documents, its local model, its citation policy.

Documents are the UTF-8 text files ``<data dir>/docs/*.txt`` (sorted by name; re-read when a
file changes). The coordinator knows them only as opaque ids (``d0``, ``d1``, ... in that
order) with their sizes and chunk counts: no file name, no text. A MINION task's instructions
(JSON, validated against ``INSTRUCTIONS_SCHEMA``, never executed) ask the node
to describe its documents, run jobs on their chunks, chat about them, or answer directly; the
local model (``--local-model``: ``smollm2`` by default, ``tiny``, ``path:DIR`` or
``openai:URL#model``, loaded on first use) does the reading, and the reply goes back as the
task's update payload (JSON). Before anything leaves, the node applies the citation policy of
the request, or the node owner's stricter ``max_citations``: the node enforces it because the
documents are its own.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from confide.agents.minions.config import DEFAULT_CHUNK_CHARS, DEFAULT_CONTEXT_CHARS, AskCancelled
from confide.agents.minions.policy import CITATION_MODES
from confide.agents.minions.worker import LocalWorker
from confide.agents.model import ChatModel

log = logging.getLogger(__name__)

DOCS_FOLDER = "docs"
#: a reply larger than this is a bug, not an answer
MAX_REPLY_BYTES = 1 << 20


class MinionCancelled(Exception):
    """The coordinator cancelled the task (or the session ended)."""


def read_documents(folder: Path) -> list[str]:
    """The texts of ``folder/*.txt``, sorted by file name; empty files are skipped."""
    if not folder.is_dir():
        return []
    texts = []
    for path in sorted(folder.glob("*.txt")):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        if text.strip():
            texts.append(text)
    return texts


class MinionWorker:
    def __init__(self, data_dir: Path, local_model: str = "smollm2", *,
                 model: ChatModel | None = None, device: str = "auto",
                 chunk_chars: int = DEFAULT_CHUNK_CHARS,
                 context_chars: int = DEFAULT_CONTEXT_CHARS,
                 max_citations: str = "allow") -> None:
        if max_citations not in CITATION_MODES:
            raise ValueError(f"max_citations must be one of {', '.join(CITATION_MODES)}")
        self.folder = Path(data_dir) / DOCS_FOLDER
        self.local_model = local_model
        self.device = device
        self.chunk_chars = chunk_chars
        self.context_chars = context_chars
        self.max_citations = max_citations
        #: jobs in flight at once: a server-backed local model serves several, an in-process
        #: transformers model one at a time (its calls are serialized anyway)
        self.workers = 4 if local_model.startswith("openai:") else 1
        self._model = model
        self._model_lock = threading.Lock()
        self._stamp: tuple = ()
        self._worker: LocalWorker | None = None

    def model(self) -> ChatModel:
        with self._model_lock:
            if self._model is None:
                from confide.agents.backends import backend_from_spec

                log.info("loading the local model %s for Minions", self.local_model)
                self._model = backend_from_spec(self.local_model, device=self.device)
            return self._model

    def _docs_stamp(self) -> tuple:
        if not self.folder.is_dir():
            return ()
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                     for p in sorted(self.folder.glob("*.txt")) if p.is_file())

    def worker(self) -> LocalWorker:
        """The documents as chunked now (rebuilt when a file is added, edited or removed)."""
        stamp = self._docs_stamp()
        if self._worker is None or stamp != self._stamp:
            self._worker = LocalWorker(read_documents(self.folder), load_model=self.model,
                                       chunk_chars=self.chunk_chars,
                                       context_chars=self.context_chars,
                                       max_citations=self.max_citations,
                                       workers=self.workers)
            self._stamp = stamp
        return self._worker

    def handle(self, instructions: bytes,
               cancelled: threading.Event | None = None) -> tuple[bytes, dict[str, float]]:
        """Run one MINION task: the reply (UTF-8 JSON) and metrics for the TaskResult.
        Raises ValueError for invalid instructions, MinionCancelled when cancelled."""
        stop = cancelled.is_set if cancelled is not None else None
        try:
            reply = self.worker().handle(instructions, should_stop=stop)
        except AskCancelled as exc:
            raise MinionCancelled(str(exc)) from None
        payload = json.dumps(reply, ensure_ascii=False).encode()
        if len(payload) > MAX_REPLY_BYTES:
            raise ValueError(f"reply of {len(payload)} bytes exceeds {MAX_REPLY_BYTES}")
        usage = reply.get("usage") or {}
        metrics = {"local_prompt_tokens": float(usage.get("prompt_tokens", 0)),
                   "local_completion_tokens": float(usage.get("completion_tokens", 0))}
        if "calls" in reply:
            metrics["local_calls"] = float(reply["calls"])
        return payload, metrics
